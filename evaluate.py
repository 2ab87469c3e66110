"""Evaluation that measures the paper's claims (SPEC §5, §7, §7.1) for every method of a run dir.

    python evaluate.py --run runs/quick                    # every checkpoint of a run -> report.json, report.md
    python evaluate.py --ckpt runs/quick/diti/ckpt.pt      # one checkpoint (report next to it)
    python evaluate.py --run runs/quick --units 8 --usage-pairs 8

A method is seen through a `representation.Representation` (z, its units and their time-steps, a decoder);
the sizes of every view are a `config.EvalConfig`. Views: attribute probes; four unit x factor maps (per-unit
probe, sparse-probe importance, decoder usage, edit change rate), each with its homes and Spearman(home, t_f);
DCI and MIG; few-shot with intervention; DDIM reconstruction, counterfactuals and manipulation (editing.py).
"""
import argparse
import dataclasses
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields

import numpy as np
import torch

import checkpoint
import config
import data
import editing
import metrics
import probes
import report
import runtime
import train
from config import EvalConfig, eval_config
from editing import timed
from plots import heatmap
from representation import encode_images, load_representation

METHODS = ("diti", "diti_stop_grad", "pdae", "disdiff")     # the run-dir folders evaluate.py looks for


# ----------------------------------------------------------------------------------------------------------
# The data every method is scored on

@dataclass
class EvalData:
    train: data.Dataset                # probe train split (a seeded subset)
    test: data.Dataset                 # probe test split
    valid: data.Dataset = None         # CelebA's validation split, when there is one
    generator: object = None           # synthetic.Synthetic (pairs, loss times), None for real data
    loss_times: np.ndarray = None      # (F,) t_f (SPEC §7), None for real data
    curves: np.ndarray = None          # (F, T) median TV_t
    full_train: data.Dataset = None    # the whole train split (the edit view's classifier trains on it)
    classifier_rescaled: np.ndarray = None   # (F,) the classifier's rescaled test accuracy


def subset(dataset, n, rng):
    idx = np.sort(rng.choice(len(dataset), min(n, len(dataset)), replace=False))
    return dataclasses.replace(dataset, images=np.asarray(dataset.images[idx]), labels=dataset.labels[idx])


def load_eval_data(dm_config, cfg):
    """The run's dataset (from the DDPM config), subsampled to the eval sizes; loss times for synthetic data."""
    name, size = dm_config["data"], dm_config["image_size"]
    splits = data.load_data(name, dm_config.get("data_dir") or None, size=size, seed=dm_config["seed"],
                            **train.synthetic_options(dm_config))
    if splits["train"].labels is None or "test" not in splits:
        raise config.UserError(f"evaluation needs labelled train and test splits; dataset '{name}' has none")
    rng = np.random.default_rng(cfg.seed)
    ev = EvalData(subset(splits["train"], cfg.n_probe_train, rng), subset(splits["test"], cfg.n_test, rng),
                  full_train=splits["train"])
    if "valid" in splits:
        ev.valid = subset(splits["valid"], cfg.n_test, rng)
    if "generator" in splits:
        ev.generator = splits["generator"]
        ev.curves, ev.loss_times = data.attribute_loss_curves(ev.generator)
    return ev


# ----------------------------------------------------------------------------------------------------------
# Probes and the unit x factor maps (SPEC §5, §7, §7.1)

def attribute_probe(z_train, z_test, ev, cfg, z_valid=None):
    """SPEC §5 probes: multiclass accuracy (rescaled: chance 0, perfect 1) per factor; for binary attributes
    also AP / mean AP (the paper's Table 1 protocol); for continuous ones Pearson r and MSE."""
    y_valid = None if ev.valid is None else ev.valid.labels
    kw = dict(epochs=cfg.probe_epochs, seed=cfg.seed)
    if ev.train.kind == "regression":
        r = probes.fit_probe(z_train, ev.train.labels, z_valid, y_valid, z_test, ev.test.labels, "regression", **kw)
        return dict(pearson=r["pearson"], mean_pearson=r["mean_pearson"], mse=r["mse"])
    r = probes.fit_probe(z_train, ev.train.labels, z_valid, y_valid, z_test, ev.test.labels, "multiclass",
                          num_values=ev.train.num_values, **kw)
    out = dict(accuracy=r["accuracy"], rescaled=r["rescaled"], mean_accuracy=float(r["accuracy"].mean()),
               mean_rescaled=float(r["rescaled"].mean()), weights=r["weights"])
    if ev.train.kind == "binary":
        b = probes.fit_probe(z_train, ev.train.labels, z_valid, y_valid, z_test, ev.test.labels, "binary", **kw)
        out.update(ap=b["ap"], mean_ap=b["mean_ap"])
    return out


def ordering(homes, loss_times, learned, names):
    """SPEC §7.1: Spearman(home, t_f) over the learned factors that have a home, and over every factor with
    a home; beside each, the factors it covers and the spread (min, max) of their homes."""
    homes = np.asarray(homes, float)
    has_home = np.isfinite(homes)
    out = {}
    for key, keep in (("learned", has_home & np.asarray(learned, bool)), ("all", has_home)):
        idx = np.flatnonzero(keep)
        rho = metrics.spearman(homes[idx], np.asarray(loss_times)[idx]) if len(idx) >= 3 else float("nan")
        spread = [float(homes[idx].min()), float(homes[idx].max())] if len(idx) else None
        out[key] = dict(rho=rho, factors=[names[i] for i in idx], spread=spread)
    return out


def map_view(matrix, ev, learned, title, path):
    """A factor x unit matrix with its homes (metrics.home), their ordering against t_f, and a heat map."""
    names = ev.train.factor_names
    matrix = np.asarray(matrix, float)
    homes = metrics.home(matrix)
    view = dict(matrix=matrix, homes=homes)
    if ev.loss_times is not None:
        view["ordering"] = ordering(homes, ev.loss_times, learned, names)
        rows = [f"{n} ({t})" for n, t in zip(names, ev.loss_times)]
    else:
        rows = names
    heatmap(matrix, rows, list(range(matrix.shape[1])), path, title=title, vmax=max(float(matrix.max()), 1e-12))
    view["png"] = path
    return view


def probe_views(z_train, z_test, units, ev, cfg, learned, prefix):
    """SPEC §7 per-unit probe map and SPEC §7.1 sparse-probe importance, as map_views."""
    kw = dict(num_values=ev.train.num_values)
    probe = probes.probe_per_unit(z_train, ev.train.labels, None, None, z_test, ev.test.labels, units,
                                   epochs=cfg.unit_probe_epochs, seed=cfg.seed, **kw)
    importance = probes.sparse_probe_importance(z_train, ev.train.labels, units, cfg.sparse_l1,
                                                 cfg.sparse_steps, **kw)
    return (map_view(probe, ev, learned, "per-unit probe (rescaled accuracy)", f"{prefix}_probe_map.png"),
            map_view(importance, ev, learned, "sparse-probe importance (share of |W|)", f"{prefix}_importance.png"))


def few_shot_view(z_train, z_test, units, ev, cfg):
    """SPEC §5 few-shot with intervention: n-shot logistic regression on all of z against the early units
    only (the first early_fraction of them), for the fine factors (t_f < fine_t; CelebA: smiling, lipstick)."""
    names = ev.train.factor_names
    if ev.loss_times is not None:
        fine = [f for f in range(len(names)) if ev.loss_times[f] < cfg.fine_t]
    else:
        fine = [names.index(n) for n in ("Smiling", "Wearing_Lipstick") if n in names]
    n_early = max(1, round(len(units) * cfg.early_fraction))
    early = np.concatenate(units[:n_early])
    out = dict(early_units=list(range(n_early)), early_dims=len(early), factors={})
    for f in fine:
        kw = dict(factor=f, shots=cfg.shots, runs=cfg.few_shot_runs, seed=cfg.seed)
        out["factors"][names[f]] = dict(full=probes.few_shot(z_train, ev.train.labels, z_test, ev.test.labels, **kw),
                                        early=probes.few_shot(z_train, ev.train.labels, z_test, ev.test.labels,
                                                               dims=early, **kw))
    return out


def disentanglement(z_train, z_test, units, ev, cfg):
    """DCI with the units as code units (probes.dci_from_probes), and the DisDiff protocol (SPEC §8): each
    unit reduced to its first principal component (fitted on train and test together, so both splits share
    the projection), then MIG and DCI on those numbers."""
    kw = dict(l1=cfg.sparse_l1, steps=cfg.sparse_steps, num_values=ev.train.num_values)
    y_train, y_test = ev.train.labels, ev.test.labels
    dci = probes.dci_from_probes(z_train, y_train, z_test, y_test, units, **kw)
    pcs = metrics.first_principal_components(np.concatenate([z_train, z_test]), units)
    pc_train, pc_test = pcs[:len(z_train)], pcs[len(z_train):]
    dci_pca = probes.dci_pca(pc_train, y_train, pc_test, y_test, **kw)
    return dict(dci={k: dci[k] for k in ("disentanglement", "completeness", "informativeness")},
                dci_pca={k: dci_pca[k] for k in ("disentanglement", "completeness", "informativeness")},
                mig=metrics.mig(pc_test, y_test))


# ----------------------------------------------------------------------------------------------------------
# One method, every view

@torch.no_grad()
def edit_pairs(rep, ev, cfg, device):
    """cfg.edit_pairs random test pairs (A, B): images x_A, x_B, codes z_A, z_B, labels y_A, y_B."""
    order = np.random.default_rng([cfg.seed, 7]).permutation(len(ev.test))[:2 * cfg.edit_pairs]
    a, b = np.sort(order[:cfg.edit_pairs]), order[cfg.edit_pairs:]
    x_A, x_B = (data.to_tensor(ev.test.images[i]).to(device) for i in (a, b))
    return dict(x_A=x_A, x_B=x_B, z_A=rep.encode(x_A), z_B=rep.encode(x_B), y_A=ev.test.labels[a],
                y_B=ev.test.labels[b])


def manipulation_target(probe, ev, cfg, z_train):
    """SPEC §4 manipulation direction toward value v of one factor: w = W_f[v] - mean_v W_f, from the full-z
    probe (weights act on the per-dim standardised z), with the train mean and std of z."""
    names = ev.train.factor_names
    f = names.index(cfg.manip_factor) if cfg.manip_factor in names else 0
    v = min(cfg.manip_value, ev.train.num_values[f] - 1)
    W = probe["weights"][f]
    std = np.where(z_train.std(0) > 1e-8, z_train.std(0), 1.0)
    label = f"{names[f]}={ev.generator.value_names[f][v] if ev.generator else v}"
    return dict(direction=W[v] - W.mean(0), mean=z_train.mean(0), std=std, label=label)


def evaluate_method(rep, ev, cfg, classifier, out_dir, device):
    """Every view of one method -> a dict (report.json's methods[name])."""
    seconds, prefix = {}, os.path.join(out_dir, rep.name)
    with timed(seconds, "encode"):
        z_train = encode_images(rep, ev.train.images, cfg.batch_size, device, "encode train")
        z_test = encode_images(rep, ev.test.images, cfg.batch_size, device, "encode test")
        z_valid = None if ev.valid is None else encode_images(rep, ev.valid.images, cfg.batch_size, device)
    with timed(seconds, "probe"):
        probe = attribute_probe(z_train, z_test, ev, cfg, z_valid)
    out = dict(info=rep.info, units=[[int(u[0]), int(u[-1]) + 1] for u in rep.units], t_ranges=rep.t_ranges)
    out["probe"] = {k: v for k, v in probe.items() if k != "weights"}
    if "rescaled" not in probe:
        return dict(out, timings=seconds)
    learned = probe["rescaled"] >= cfg.learned
    out["probe"]["learned"] = [n for n, ok in zip(ev.train.factor_names, learned) if ok]
    with timed(seconds, "probe_map"):
        out["probe_map"], out["importance"] = probe_views(z_train, z_test, rep.units, ev, cfg, learned, prefix)
    with timed(seconds, "dci"):
        out.update(disentanglement(z_train, z_test, rep.units, ev, cfg))
    with timed(seconds, "few_shot"):
        out["few_shot"] = few_shot_view(z_train, z_test, rep.units, ev, cfg)
    if rep.decoder is not None and ev.generator is not None and cfg.usage_pairs > 0:
        with timed(seconds, "usage"):
            pairs = editing.usage_pairs(ev.generator, cfg.usage_pairs, len(rep.t_ranges), cfg.seed, device)
            grid = editing.decoder_usage(rep, pairs, cfg.seed)
            out["usage"] = map_view(grid.sum(1), ev, learned, "decoder usage (loss gain)", f"{prefix}_usage.png")
            out["usage"]["grid"] = grid
    if rep.decoder is not None:
        views = editing.decoding_views(rep.decoder, rep.units, edit_pairs(rep, ev, cfg, device), classifier,
                                       manipulation_target(probe, ev, cfg, z_train), cfg, prefix, seconds)
        if "change_rates" in views:
            reliable = learned & (ev.classifier_rescaled >= cfg.learned)
            out["edit"] = map_view(views.pop("change_rates"), ev, reliable, "edit change rate (swap unit, classify)",
                                   f"{prefix}_edit.png")
            out["edit"]["covers"] = "factors learned by the model and read by the classifier (rescaled >= threshold)"
            groups = editing.granularity_groups(ev.loss_times, rep.t_ranges)
            out["specificity"] = editing.specificity(out["edit"]["matrix"], groups,
                                                     editing.unit_ranges(len(rep.units)))
        out.update(views)
    return dict(out, timings=seconds)


# ----------------------------------------------------------------------------------------------------------
# A run dir (or one checkpoint) -> report.json, report.md

def find_checkpoints(run_dir):
    """{method: ckpt path} for the METHODS folders of a run dir that hold a ckpt.pt."""
    found = {m: os.path.join(run_dir, m, "ckpt.pt") for m in METHODS}
    return {m: p for m, p in found.items() if os.path.isfile(p)}


def default_units(checkpoints, preset):
    """PDAE's chunk count: the k of the DiTi runs being compared, else the preset's k."""
    for path in checkpoints.values():
        ck = checkpoint.load_checkpoint(path)
        if ck["kind"] == "diti" and len(ck["partition"]) > 1:
            return len(ck["partition"])
    return config.PRESETS[preset].get("diti", {}).get("k", config.DiTiConfig.k)


@contextmanager
def torch_threads(n):
    """Run the with-block with n torch threads (None: leave as is), then restore the count."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def shared_views(ev, cfg, fig_dir):
    """What every method shares on synthetic data: the TV_t curves (SPEC §7) and the factor classifier of the
    edit view (cached in fig_dir). Returns (report entries, classifier or None)."""
    out, classifier = {}, None
    if ev.generator is None:
        return out, classifier
    out["tv_curves_png"] = data.plot_tv_curves(ev.curves, ev.train.factor_names, os.path.join(fig_dir, "tv_curves.png"),
                                               ev.loss_times)
    if cfg.classifier_steps > 0:
        classifier, acc, seconds = editing.load_or_train_classifier(
            os.path.join(fig_dir, "factor_classifier.pt"), ev.full_train, ev.test, cfg.classifier_steps, seed=cfg.seed)
        ev.classifier_rescaled = metrics.rescaled_accuracy(acc, ev.train.num_values)
        out["classifier"] = dict(accuracy=acc, rescaled=ev.classifier_rescaled, steps=cfg.classifier_steps,
                                 batch_size=64, train_seconds=seconds)
    return out, classifier


def evaluate(checkpoints, out_dir, preset="quick", cfg=None, units=None, extra=None):
    """Evaluate {method: ckpt path}; write <out_dir>/report.json and report.md; return the report dict."""
    cfg = cfg or eval_config(preset)
    if not checkpoints:
        raise config.UserError("no checkpoints to evaluate: train first (python run.py) or pass --ckpt")
    device = runtime.pick_device(cfg.device)
    fig_dir = os.path.join(out_dir, "eval")
    os.makedirs(fig_dir, exist_ok=True)
    units = units or default_units(checkpoints, preset)
    start = time.perf_counter()
    with torch_threads(cfg.threads if device.type == "cpu" else None):
        reps = {m: load_representation(p, device, m, units) for m, p in checkpoints.items()}
        reps = {m: rep for m, rep in reps.items() if rep is not None}
        if not reps:
            raise config.UserError(f"none of {', '.join(checkpoints.values())} can be evaluated")
        dm_config = next(iter(reps.values())).info["dm_config"]
        ev = load_eval_data(dm_config, cfg)
        shared, classifier = shared_views(ev, cfg, fig_dir)
        result = dict(preset=preset, eval_config=dataclasses.asdict(cfg), device=str(device), units=units,
                      data=dict(name=dm_config["data"], image_size=dm_config["image_size"], n_train=len(ev.train),
                                n_test=len(ev.test), factors=ev.train.factor_names, num_values=ev.train.num_values,
                                loss_times=ev.loss_times, tv_curves_png=shared.get("tv_curves_png")),
                      classifier=shared.get("classifier"), methods={}, timings={}, **(extra or {}))
        for name, rep in reps.items():
            print(f"evaluating {name}")
            t0 = time.perf_counter()
            result["methods"][name] = evaluate_method(rep, ev, cfg, classifier, fig_dir, device)
            result["timings"][name] = time.perf_counter() - t0
    result["timings"]["total"] = time.perf_counter() - start
    return report.write(result, out_dir)


def parse_overrides(args):
    """EvalConfig fields given as flags (--usage-pairs 8, --manip-scales 0,0.5,1)."""
    overrides = {}
    for f in fields(EvalConfig):
        text = getattr(args, f.name)
        if text is None:
            continue
        default = EvalConfig.__dataclass_fields__[f.name].default
        if isinstance(default, tuple):
            cast = type(default[0]) if default else float
            overrides[f.name] = tuple(cast(v) for v in text.split(",") if v.strip())
        else:
            overrides[f.name] = config.parse_value(text, default, f.name)
    return overrides


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", help="a run dir (as written by run.py)")
    p.add_argument("--ckpt", help="one stage-2 checkpoint")
    p.add_argument("--name", help="method name for --ckpt (default: its folder's name)")
    p.add_argument("--out", help="where report.json/md go (default: the run dir, or the checkpoint's folder)")
    p.add_argument("--preset", default=None, help="eval sizes (default: the run's preset, else quick)")
    p.add_argument("--units", type=int, default=None, help="chunks to cut a PDAE z into (default: DiTi's k)")
    for f in fields(EvalConfig):
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None)
    args = p.parse_args(argv)
    if bool(args.run) == bool(args.ckpt):
        raise config.UserError("pass either --run <run dir> or --ckpt <checkpoint>")
    if args.run:
        checkpoints, out = find_checkpoints(args.run), args.out or args.run
        saved = os.path.join(args.run, "run.json")
        run_info = json.load(open(saved)) if os.path.isfile(saved) else {}
        run_preset = run_info.get("preset", "quick")
    else:
        name = args.name or os.path.basename(os.path.dirname(os.path.abspath(args.ckpt)))
        checkpoints, out, run_preset, run_info = {name: args.ckpt}, args.out or os.path.dirname(args.ckpt), "quick", {}
    preset = args.preset or run_preset
    cfg = eval_config(preset, **parse_overrides(args))
    extra = dict(run=dict(preset=run_preset, train_seconds=run_info.get("train_seconds", {})))
    evaluate(checkpoints, out, preset, cfg, args.units, extra)
    print(f"report: {os.path.join(out, 'report.md')}")


if __name__ == "__main__":
    sys.exit(train.cli(main))
