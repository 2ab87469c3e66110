"""report.json and report.md from the dict evaluate.py builds: every number keyed by method, and a page a
person reads, with the preset and budget beside every figure and a plain sentence, computed from the
numbers, saying whether the paper's ordering (a factor's home rises with its loss time t_f) appears.

    python report.py runs/quick          # write report.md again from report.json (after editing this file)
"""
import json
import math
import os
import sys

import numpy as np

import config
import train

VIEWS = (("probe_map", "per-unit probe"), ("importance", "sparse-probe importance"), ("usage", "decoder usage"),
         ("edit", "edit change rate"))


def to_json(obj):
    """numpy -> lists and floats, nan/inf -> None, tuples -> lists, keys -> str."""
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_json(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def relative_paths(obj, root):
    """Every '.png' path under root, made relative to root (so report.md's links work from its folder)."""
    if isinstance(obj, dict):
        return {k: relative_paths(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [relative_paths(v, root) for v in obj]
    if isinstance(obj, str) and obj.endswith(".png"):
        return os.path.relpath(os.path.abspath(obj), os.path.abspath(root))
    return obj


def write(result, out_dir):
    """Write <out_dir>/report.json and report.md; returns the JSON-ready dict."""
    clean = relative_paths(to_json(result), out_dir)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(clean, f, indent=1)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown(clean))
    return clean


# ----------------------------------------------------------------------------------------------------------
# Formatting helpers

def num(v, digits=2):
    return "n/a" if v is None else f"{v:.{digits}f}"


def get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def budget(info):
    """'DDPM 3000 x 64, stage 2 2000 x 64 (k=8, d=64, base)': steps x batch of both stages."""
    if not info or "dm_steps" not in info:
        return info.get("budget", "") if info else ""
    return (f"DDPM {info['dm_steps']} x {info['dm_batch_size']}, stage 2 {info['steps']} x {info['batch_size']} "
            f"(k={info['k']}, d={info['d']}, {info['mode']})")


def ordering_cell(view):
    """'0.80 over 6 [a, b, ...] (homes 1.2-3.4); all 0.30' for one view's ordering."""
    o = get(view, "ordering")
    if o is None:
        return "n/a"
    learned, every = o["learned"], o["all"]
    spread = "" if not learned["spread"] else f" (homes {learned['spread'][0]:.1f}-{learned['spread'][1]:.1f})"
    return (f"{num(learned['rho'])} over {len(learned['factors'])} [{', '.join(learned['factors'])}]{spread}; "
            f"all {num(every['rho'])} over {len(every['factors'])}")


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


# ----------------------------------------------------------------------------------------------------------
# The sentences

def view_verdicts(method, threshold):
    """{view label: 'appears' | 'absent' | 'not measurable'} from Spearman over learned factors."""
    verdicts = {}
    for key, label in VIEWS:
        o = get(method, key, "ordering", "learned")
        if o is None:
            continue
        rho = o["rho"]
        verdicts[label] = "not measurable" if rho is None else ("appears" if rho >= threshold else "absent")
    return verdicts


def ordering_sentences(result):
    """Plain sentences, computed from the numbers, on whether the paper's claims show at this budget."""
    cfg, out = result["eval_config"], []
    threshold = cfg["ordering_rho"]
    out.append(f"Rule: the ordering *appears* in a view when Spearman(home, t_f) over the learned factors (full-z "
               f"probe >= {cfg['learned']}) is >= {threshold}; with fewer than 3 learned factors it is not measurable.")
    for name, m in result["methods"].items():
        v = view_verdicts(m, threshold)
        if not v:
            out.append(f"- **{name}**: no view has loss times to order against.")
            continue
        phrases = {"appears": "appears in", "absent": "is absent from", "not measurable": "is not measurable in"}
        parts = [f"{phrase} {', '.join(lab for lab, x in v.items() if x == s)}" for s, phrase in phrases.items()
                 if s in v.values()]
        control = " (PDAE is the control: its chunks have no time order, so an ordering here is chance)" \
            if name == "pdae" else ""
        out.append(f"- **{name}**: the ordering {'; '.join(parts)}{control}.")
    diti = [n for n in result["methods"] if n.startswith("diti")]
    shown = [n for n in diti if "appears" in view_verdicts(result["methods"][n], threshold).values()]
    if diti:
        out.append(f"So at preset `{result['preset']}` the paper's ordering "
                   + (f"appears for {', '.join(shown)} in at least one view." if shown else
                      "does not appear for any DiTi run in any view."))
    loss_times = get(result, "data", "loss_times")
    if loss_times is not None:
        fine = [f for f, t in zip(result["data"]["factors"], loss_times) if t < cfg["fine_t"]]
        for name, m in result["methods"].items():
            got = [f for f in fine if f in get(m, "probe", "learned") or []]
            out.append(f"- Fine factors (t_f < {cfg['fine_t']}: {', '.join(fine) or 'none'}) learned by {name}: "
                       f"{', '.join(got) or 'none'}" + ("" if got else " - its few-shot and map numbers for them "
                                                        "measure nothing yet."))
    for name, m in result["methods"].items():
        for factor, fs in (get(m, "few_shot", "factors") or {}).items():
            n = max(fs["full"], key=int)
            (full, sd_full), (early, sd_early) = fs["full"][n][:2], fs["early"][n][:2]
            out.append(f"- Few-shot ({name}, {factor}, {n}-shot): early units {100 * early:.1f} "
                       f"{few_shot_verdict(full, sd_full, early, sd_early, cfg['few_shot_runs'])} full z "
                       f"{100 * full:.1f} (paper: early subsets win by 2-5 points on fine factors).")
    return "\n".join(out)


def few_shot_verdict(full, sd_full, early, sd_early, runs):
    """'beat' / 'fell behind' only when the means differ by more than two standard errors over the draws."""
    se = ((sd_full ** 2 + sd_early ** 2) / max(runs, 1)) ** 0.5
    if abs(early - full) <= 2 * se:
        return "matched (within 2 standard errors)"
    return "beat" if early > full else "fell behind"


# ----------------------------------------------------------------------------------------------------------
# The page

def markdown(result):
    methods, cfg = result["methods"], result["eval_config"]
    names = list(methods)
    eval_budget = (f"eval `{result['preset']}`: probes {result['data']['n_train']} train / {result['data']['n_test']} "
                   f"test, DDIM {cfg['ddim_steps']} steps, {cfg['edit_pairs']} edit pairs, usage "
                   f"{cfg['usage_pairs']} pairs per factor and t range")
    lines = [f"# DiTi evaluation: preset `{result['preset']}`", "",
             f"Data: {result['data']['name']} {result['data']['image_size']} px, {len(result['data']['factors'])} "
             f"factors; device {result['device']}; {eval_budget}. PDAE's z is cut into {result['units']} chunks.", ""]
    lines += ["## Does the paper's ordering appear?", "", ordering_sentences(result), ""]

    lines += ["## Methods side by side", ""]
    rows = [["budget"] + [budget(m["info"]) for m in methods.values()]]
    train_time = get(result, "run", "train_seconds") or {}
    rows.append(["wall time: train / eval (s)"] + [
        f"{num(train_time.get(n), 0)} / {num(get(result, 'timings', n), 0)}" for n in names])
    rows.append(["mean probe accuracy (raw; rescaled, chance 0)"] + [
        f"{num(get(m, 'probe', 'mean_accuracy'), 3)}; {num(get(m, 'probe', 'mean_rescaled'), 3)}"
        for m in methods.values()])
    if any(get(m, "probe", "mean_ap") is not None for m in methods.values()):
        rows.append(["mean AP (binary probe)"] + [num(get(m, "probe", "mean_ap"), 3) for m in methods.values()])
    rows.append(["learned factors (full-z >= %g)" % cfg["learned"]] + [
        ", ".join(get(m, "probe", "learned") or []) or "none" for m in methods.values()])
    rows.append(["DCI D / C (units as code units)"] + [
        f"{num(get(m, 'dci', 'disentanglement'))} / {num(get(m, 'dci', 'completeness'))}" for m in methods.values()])
    rows.append(["MIG / DCI-D on first PCs (SPEC §8)"] + [
        f"{num(get(m, 'mig'))} / {num(get(m, 'dci_pca', 'disentanglement'))}" for m in methods.values()])
    for key, label in VIEWS:
        rows.append([f"Spearman(home, t_f), {label}: learned; all"]
                    + [ordering_cell(m.get(key)) for m in methods.values()])
    rows.append([f"reconstruction MSE, DDIM {cfg['ddim_steps']} steps (DDPM alone)"] + [
        f"{num(get(m, 'reconstruction', 'mse'), 4)} ({num(get(m, 'reconstruction', 'ddpm_only_mse'), 4)})"
        for m in methods.values()])
    rows.append(["edit specificity: own granularity / others (diff)"] + [
        f"{num(get(m, 'specificity', 'own'))} / {num(get(m, 'specificity', 'other'))} "
        f"({num(get(m, 'specificity', 'specificity'))})" for m in methods.values()])
    lines += [table(["measure"] + names, rows), ""]

    lines += factor_section(result)
    lines += figure_section(result, eval_budget)
    lines += few_shot_section(result)
    lines += timing_section(result)
    return "\n".join(lines) + "\n"


def factor_section(result):
    d = result["data"]
    if d.get("loss_times") is None:
        return []
    header = ["factor", "t_f"] + [f"{n} probe" for n in result["methods"]]
    clf = get(result, "classifier", "rescaled")
    header += ["classifier"] if clf is not None else []
    order = np.argsort(d["loss_times"], kind="stable")
    rows = []
    for f in order:
        row = [d["factors"][f], d["loss_times"][f]]
        row += [num((get(m, "probe", "rescaled") or [None] * (f + 1))[f]) for m in result["methods"].values()]
        row += [num(clf[f])] if clf is not None else []
        rows.append(row)
    clf_note = (f" Classifier: a small CNN trained {result['classifier']['steps']} steps x "
                f"{result['classifier']['batch_size']} on real train images, rescaled test accuracy; the edit view "
                f"covers only factors it reads (>= {result['eval_config']['learned']}).") if clf is not None else ""
    out = ["## Factors, loss times and full-z probes", "",
           f"Probe values are rescaled test accuracy (chance 0, perfect 1).{clf_note} "
           f"![TV_t curves]({d['tv_curves_png']})", "", table(header, rows), ""]
    return out


def figure_section(result, eval_budget):
    out = ["## Figures", ""]
    for name, m in result["methods"].items():
        out.append(f"**{name}** ({result['preset']}; {budget(m['info'])}; {eval_budget}):")
        if m["info"].get("loss_by_t_png"):
            out.append(f"- [training loss per t bucket]({m['info']['loss_by_t_png']}) (SPEC §5)")
        for key, label in (*VIEWS, ("reconstruction", "inputs (top) vs reconstructions"),
                           ("counterfactual", "counterfactuals"), ("manipulation", "manipulation")):
            png = get(m, key, "png")
            if png:
                note = ""
                if key == "manipulation":
                    note = f" toward {m[key]['target']}; rows {', '.join(m[key]['rows'])}; " \
                           f"columns: input, scales {m[key]['scales']}"
                elif key == "counterfactual":
                    note = f" ({m[key]['rows']})"
                out.append(f"- [{label}]({png}){note}")
        out.append("")
    return out


def few_shot_section(result):
    rows = []
    for name, m in result["methods"].items():
        fs = get(m, "few_shot") or {}
        for factor, r in (fs.get("factors") or {}).items():
            for n in r["full"]:
                rows.append([name, factor, n, f"{100 * r['full'][n][0]:.1f} +- {100 * r['full'][n][1]:.1f}",
                             f"{100 * r['early'][n][0]:.1f} +- {100 * r['early'][n][1]:.1f} (units "
                             f"{fs['early_units'][0]}-{fs['early_units'][-1]})"])
    if not rows:
        return []
    runs = result["eval_config"]["few_shot_runs"]
    return ["## Few-shot with intervention (SPEC §5)", "",
            f"Accuracy % over {runs} runs, fine factors only; logistic regression on all of z vs the early units.", "",
            table(["method", "factor", "n", "full z", "early units"], rows), ""]


def timing_section(result):
    parts = sorted({p for m in result["methods"].values() for p in m.get("timings", {})})
    rows = [[name] + [num(m.get("timings", {}).get(p), 1) for p in parts] for name, m in result["methods"].items()]
    out = ["## Evaluation timings (s)", "", table(["method"] + parts, rows), ""]
    if get(result, "classifier", "train_seconds"):
        out += [f"Factor classifier training: {result['classifier']['train_seconds']:.1f} s (cached afterwards).", ""]
    out += [f"Total evaluation: {num(get(result, 'timings', 'total'), 1)} s.", ""]
    return out


def main(argv=None):
    """Re-render <run dir>/report.md from its report.json."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isfile(os.path.join(argv[0], "report.json")):
        raise config.UserError("give a run folder holding report.json, e.g. python report.py runs/quick")
    path = os.path.join(argv[0], "report.md")
    with open(path, "w") as f:
        f.write(markdown(json.load(open(os.path.join(argv[0], "report.json")))))
    print(path)


if __name__ == "__main__":
    sys.exit(train.cli(main))
