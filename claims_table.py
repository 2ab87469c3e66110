"""The claims grid's rows and its tables (claims.py runs the grid): claims.md, mean and spread over seeds of every
view's Spearman(home, t_f) over the learned factors, DCI-D, the full-z probe per factor, the reconstruction MSE and
the one-sentence answer computed from them; compare.md, one table over several claims folders."""
import json
import os

import numpy as np

import config

VIEWS = ("probe_map", "importance", "usage", "edit")
MODES, PARTITIONS, KS = ("base", "stop_grad"), ("uniform", "fitted"), (4, 8)


def grid_rows():
    """Row ids of the full grid, e.g. 'stop_grad-fitted-k8', and the two controls 'pdae' and 'disdiff'."""
    return [f"{m}-{p}-k{k}" for m in MODES for p in PARTITIONS for k in KS] + ["pdae", "disdiff"]


def mean_spread(values):
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if not len(v):
        return "n/a"
    fmt = (lambda x: f"{x:.2g}") if abs(v.mean()) < 0.05 else (lambda x: f"{x:.2f}")
    return f"{fmt(v.mean())} ± {fmt(v.std())}" if len(v) > 1 else fmt(v.mean())


def covered(runs, view):
    """The runs whose Spearman in a view exists (>= 3 learned factors with a home), the factors all of them
    cover, and the spread (min, max) of those runs' homes."""
    with_rho = [r for r in runs if view in r and r[view]["rho"] is not None and np.isfinite(r[view]["rho"])]
    common = sorted(set.intersection(*[set(r[view]["factors"]) for r in with_rho])) if with_rho else []
    spreads = [r[view]["spread"] for r in with_rho if r[view]["spread"]]
    lo = min(s[0] for s in spreads) if spreads else float("nan")
    hi = max(s[1] for s in spreads) if spreads else float("nan")
    return with_rho, common, lo, hi


def aggregate(claims):
    """{row: {figure: mean ± spread}} over seeds."""
    table = {}
    for row in claims["rows"]:
        runs = [r for r in claims["runs"].values() if r["row"] == row]
        if not runs:
            continue
        entry = dict(seeds=len(runs), steps=runs[0]["steps"], batch_size=runs[0]["batch_size"],
                     dm_steps=runs[0]["dm_steps"], dci_d=mean_spread([r["dci_d"] for r in runs]),
                     mse=mean_spread([r["mse"] for r in runs]),
                     probe={f: mean_spread([r["probe"][f] for r in runs]) for f in runs[0]["probe"]})
        for view in VIEWS:
            with_rho, factors, lo, hi = covered(runs, view)
            rhos = [r[view]["rho"] for r in with_rho]
            entry[view] = dict(rho=mean_spread(rhos), rho_mean=float(np.mean(rhos)) if rhos else None,
                               rho_seeds=len(with_rho), rho_all=mean_spread([r[view]["rho_all"] for r in runs if view in r]),
                               n_factors=len(factors), factors=factors, homes=[lo, hi])
        entry["learned"] = {r["seed"]: r["learned"] for r in sorted(runs, key=lambda r: r["seed"])}
        table[row] = entry
    return table


def answer(claims, table):
    """The one-sentence answer, computed from the table (never written by hand)."""
    n_factors = len(claims.get("loss_times", {}))
    hits = []
    for row, e in table.items():
        for view in ("probe_map", "usage"):
            v = e.get(view, {})
            if row.startswith("stop_grad") and v.get("rho_mean") is not None and v["rho_mean"] >= 0.8 \
                    and v["n_factors"] == n_factors and v["rho_seeds"] == e["seeds"]:
                hits.append(f"{row} ({view})")
    if hits:
        return "The home subset rises with the loss time over every factor (Spearman >= 0.8, stop_grad, mean " \
               f"over seeds) in: {', '.join(hits)}."
    return "In no stop_grad row does the home subset rise with the loss time over every factor, fine ones " \
           "included (Spearman >= 0.8, mean over seeds), in the probe view or in the usage view: see which " \
           "factors each Spearman covers, and the learned factors per seed."


def scope(claims, table):
    """One computed paragraph: which rows and seeds of the grid this table holds, at which budget."""
    dm, _, _ = config.make_config("dm", ["--preset", claims["preset"], *claims.get("overrides", {}).get("dm", [])])
    runs = list(claims["runs"].values())
    seeds = sorted({r["seed"] for r in runs})
    budgets = sorted({(r["dm_steps"], r["steps"], r["batch_size"]) for r in runs})
    missing = [row for row in grid_rows() if row not in table]
    options = ", ".join(map(flag_text, preset_options(claims)))
    return (f"**Scope.** {len(table)} of the {len(grid_rows())} grid rows, {len(runs)} runs over seeds "
            f"{', '.join(map(str, seeds)) or 'none'}; {dm.image_size}-px built-in data; budgets (DDPM steps x "
            f"{dm.batch_size}, stage-2 steps x batch): "
            + "; ".join(f"{a} / {b} x {c}" for a, b, c in budgets)
            + (f". Not run: {', '.join(missing)}." if missing else ".")
            + (f" Options beyond the `{claims['preset']}` preset: {options}." if options else ""))


def flag_text(option):
    """("loss_gamma", 1.0) -> "--loss-gamma 1.0"; a switched-on bool is the bare flag."""
    name, value = option
    return f"--{name.replace('_', '-')}" + ("" if value is True else f" {value}")


def preset_options(claims):
    """(option, value) of every option beyond the preset (budgets aside) that this grid ran with: the options
    beyond the paper, a U-Net width, a precision (named once when both stages have it)."""
    overrides = claims.get("overrides", {})
    extra = [(k, v) for k, v in overrides.get("diti_fields", {}).items() if k not in ("steps", "batch_size")]
    dm_flags = dict(zip(overrides.get("dm", [])[::2], overrides.get("dm", [])[1::2]))    # ["--steps", "4000", ...]
    dm_extra = [(flag[2:].replace("-", "_"), v) for flag, v in dm_flags.items() if flag != "--steps"]
    return extra + [(k, v) for k, v in dm_extra if k not in dict(extra)]


def write_markdown(claims, path):
    table = aggregate(claims)
    names = list(claims.get("loss_times", {}))
    lines = [f"# Does DiTi order attributes by granularity? (preset `{claims['preset']}`, eval "
             f"`{claims['eval_preset']}`)", "", scope(claims, table), "",
             "Regenerate (each command resumes; together they give this table):", "",
             *[f"    python claims.py {c}" for c in claims.get("commands", [])], "",
             "Loss times t_f: " + ", ".join(f"{n} {t}" for n, t in claims.get("loss_times", {}).items()), "",
             "pdae and disdiff are the controls: their units (PDAE's z cut into 8 chunks, DisDiff's factors) have no "
             "time order, so a Spearman in their rows is what chance gives.", "",
             "Spearman(home, t_f) over the learned factors (full-z probe >= 0.9), mean ± std over the seeds where it "
             "exists (>= 3 learned factors; 'k of n seeds' when not all): [n factors covered; homes min-max].", "",
             "| row | seeds | stage-2 steps x batch | probe | importance | usage | edit | DCI-D | recon MSE |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row, e in table.items():
        cells = [f"{e[v]['rho']} [{e[v]['n_factors']}; {e[v]['homes'][0]:.1f}-{e[v]['homes'][1]:.1f}]"
                 + (f", {e[v]['rho_seeds']} of {e['seeds']} seeds" if e[v]["rho_seeds"] < e["seeds"] else "")
                 if v in e and e[v]["rho"] != "n/a" else "n/a" for v in VIEWS]
        lines.append(f"| {row} | {e['seeds']} | {e['steps']} x {e['batch_size']} | " + " | ".join(cells)
                     + f" | {e['dci_d']} | {e['mse']} |")
    lines += ["", "The same Spearman over every factor with a home (learned or not), mean ± std over seeds:", "",
              "| row | " + " | ".join(VIEWS) + " |", "|---|" + "---|" * len(VIEWS)]
    for row, e in table.items():
        lines.append(f"| {row} | " + " | ".join(e[v]["rho_all"] if v in e else "n/a" for v in VIEWS) + " |")
    lines += ["", "Full-z probe per factor (chance = 0, perfect = 1), mean ± std over seeds:", "",
              "| row | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row, e in table.items():
        lines.append(f"| {row} | " + " | ".join(e["probe"].get(n, "n/a") for n in names) + " |")
    lines += ["", "Learned factors (full-z probe >= 0.9), per seed:", ""]
    for row, e in table.items():
        lines.append(f"- {row}: " + "; ".join(f"seed {s}: {', '.join(f) or 'none'}" for s, f in e["learned"].items()))
    lines += ["", "**Answer.** " + answer(claims, table), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


DATA_OPTIONS = ("fine_loss_time", "texture_cell", "texture_region", "image_size")   # options that move t_f


def compare(dirs, path, rows=None):
    """One table over several claims folders (say, the same row at growing budgets): per run, its budget, the
    options beyond the preset, the learned factors and the full-z probe per factor."""
    runs, t_f, commands = [], {}, []
    for d in dirs:
        claims = json.load(open(os.path.join(d, "claims.json")))
        commands += [f"    python claims.py {c}" for c in claims.get("commands", [])]
        options = preset_options(claims)
        extra = " ".join(map(flag_text, options)) or "-"
        own_data = any(k in DATA_OPTIONS for k, _ in options)   # its loss times are not the default data's
        t_f.update({n: t for n, t in claims["loss_times"].items() if not own_data or n not in t_f})
        times = claims["loss_times"]
        runs += [(r["row"], r["dm_steps"], r["steps"], r["seed"], extra, d, r, sorted(times, key=lambda n: -times[n]))
                 for r in claims["runs"].values() if rows is None or r["row"] in rows]
    runs.sort(key=lambda x: x[:5])
    names = max((x[-1] for x in runs), key=len, default=[])
    lines = ["# The same rows at other budgets and options", "",
             "Full-z probe per factor (chance = 0, perfect = 1); learned: >= 0.9. Factors by loss time t_f of the "
             "default data (in brackets), coarse first; a run with " + ", ".join(flag_text((k, True)) for k in
             DATA_OPTIONS) + " has its own (its folder's claims.md lists them).", "",
             "| row | DDPM steps | stage-2 steps x batch | seed | options | learned | "
             + " | ".join(f"{n} ({t_f[n]})" for n in names) + " | folder |",
             "|---|---|---|---|---|---|" + "---|" * len(names) + "---|"]
    for row, dm_steps, steps, seed, extra, d, r, _ in runs:
        probe = " | ".join(f"{r['probe'][n]:.2f}" if n in r["probe"] else "n/a" for n in names)
        lines.append(f"| {row} | {dm_steps} | {steps} x {r['batch_size']} | {seed} | {extra} | {len(r['learned'])} | "
                     f"{probe} | {d} |")
    lines += ["", "Regenerate (a longer run may start from a shorter one's checkpoint copied into its folder: "
              "resume is exact):", "", *commands]
    with open(path, "w") as f:
        f.write("\n".join(lines + [""]))
    return path
