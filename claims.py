"""Does DiTi order attributes by granularity? A grid of runs on the built-in data, answered with a table.

    python claims.py --out runs/claims                      # the grid at the preset's budget, seeds 0 and 1
    python claims.py --out runs/claims --seeds 0,1,2 --rows stop_grad-uniform-k8,stop_grad-fitted-k8

Grid (SPEC §7, issue 12): mode {base, stop_grad} x partition {uniform, fitted to the factors' TV curves}
x k {4, 8} x seeds, plus PDAE (k = 1, its z cut into 8 chunks for the maps) and DisDiff (SPEC §8, the
comparison: its factors are the units), one frozen DDPM per seed shared by every row of that seed. Each finished
run is written to claims.json at once, so an interrupted grid resumes where it stopped (a half-trained run
resumes from its checkpoint). claims.md is the readable table (claims_table.py): mean and spread over seeds of
every view's Spearman(home, t_f) over the learned factors, DCI-D, the full-z probe per factor and the
reconstruction MSE.
"""
import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import sys
import time

import numpy as np
import torch

import checkpoint
import config
import data
import editing
import evaluate
import gains
import train
from claims_table import MODES, PARTITIONS, VIEWS, compare, grid_rows, write_markdown


def row_stage(row):
    """The train.py stage of a grid row: 'disdiff' or 'diti'."""
    return "disdiff" if row == "disdiff" else "diti"


def row_config(row, preset, seed, out):
    """The stage-2 config of a grid row."""
    cfg, _, _ = config.make_config(row_stage(row), ["--preset", preset])
    if row == "disdiff":
        return dataclasses.replace(cfg, seed=seed, out=out)
    if row == "pdae":
        return dataclasses.replace(cfg, k=1, mode="base", partition="uniform", seed=seed, out=out)
    mode, partition, k = row.split("-")
    if mode not in MODES or partition not in PARTITIONS or not k.startswith("k"):
        raise config.UserError(f"unknown grid row '{row}': rows look like stop_grad-fitted-k8, pdae or disdiff")
    return dataclasses.replace(cfg, mode=mode, partition=partition, k=int(k[1:]), seed=seed, out=out)


def finished(cfg, kind):
    path = os.path.join(cfg.out, "ckpt.pt")
    if not os.path.isfile(path):
        return False
    ck = checkpoint.load_checkpoint(path, kind)
    checkpoint.check_same_data(ck, cfg, path)     # a DDPM of another --fine-loss-time is never reused,
    if kind == "dm":                              # nor one of another width
        checkpoint.check_same_model(ck, dict(unet=dataclasses.asdict(config.unet_config(cfg))), path)
    return ck["step"] >= cfg.steps


def train_stage(fn, cfg, kind):
    """Train to cfg.steps, resuming a half-finished run; a finished one is reused."""
    if not finished(cfg, kind):
        fn(cfg, resume=True)
    return os.path.join(cfg.out, "ckpt.pt")


def summarise(method, names):
    """The figures of one evaluated run that the table needs."""
    out = dict(probe=dict(zip(names, np.asarray(method["probe"]["rescaled"], float).tolist())),
               learned=method["probe"]["learned"],
               dci_d=method["dci"]["disentanglement"],
               mse=method.get("reconstruction", {}).get("mse"))
    for view in VIEWS:
        if view in method:
            o = method[view]["ordering"]
            out[view] = dict(rho=o["learned"]["rho"], factors=o["learned"]["factors"], spread=o["learned"]["spread"],
                             rho_all=o["all"]["rho"], homes=np.asarray(method[view]["homes"], float).tolist())
    return out


def save_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=float)
    os.replace(tmp, path)


def union(old, new):
    """The items of both lists, in order, each once (a later call may add rows, seeds, commands)."""
    return list(dict.fromkeys(list(old) + list(new)))


@contextlib.contextmanager
def locked(path):
    """Hold an exclusive lock on path + '.lock' (POSIX) while reading, merging and writing claims.json."""
    with open(path + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def merge_from_disk(path, claims):
    """Take in the runs another claims.py (say, one per seed, side by side) has written since we read the file."""
    if os.path.isfile(path):
        disk = json.load(open(path))
        claims["runs"] = {**disk.get("runs", {}), **claims["runs"]}
        for key in ("seeds", "rows", "commands"):
            claims[key] = union(disk.get(key, []), claims.get(key, []))


def shared_classifier(seed_dir, eval_cfg, dm_cfg):
    """One factor classifier per seed (trained on real images), copied into each run's eval folder."""
    splits = data.load_synthetic(dm_cfg.image_size, dm_cfg.seed, **train.synthetic_options(dataclasses.asdict(dm_cfg)))
    path = os.path.join(seed_dir, "factor_classifier.pt")
    editing.load_or_train_classifier(path, splits["train"], splits["test"], eval_cfg.classifier_steps,
                                     seed=eval_cfg.seed)
    return path


def stage2_fields(cfg, overrides):
    """The stage-2 overrides this row's config has: --steps for every row, the DiTi options for DiTi rows only."""
    return {k: v for k, v in overrides.get("diti_fields", {}).items() if hasattr(cfg, k)}


def stage2_config(row, preset, seed, out, overrides):
    """The row's stage-2 config with the grid's overrides applied."""
    cfg = row_config(row, preset, seed, out)
    return dataclasses.replace(cfg, **stage2_fields(cfg, overrides))


def run_grid(out, preset, eval_preset, seeds, rows, overrides, command=""):
    """Train and evaluate every (seed, row) not yet in claims.json; returns the claims dict."""
    path = os.path.join(out, "claims.json")
    claims = json.load(open(path)) if os.path.isfile(path) else dict(runs={})
    claims.update(preset=preset, eval_preset=eval_preset, seeds=union(claims.get("seeds", []), seeds),
                  rows=union(claims.get("rows", []), rows), overrides=overrides,
                  commands=union(claims.get("commands", []), [command] if command else []))
    todo = [(s, r) for s in seeds for r in rows if f"seed{s}/{r}" not in claims["runs"]]
    print(f"claims grid: {len(seeds)} seeds x {len(rows)} rows, {len(todo)} runs to go -> {path}")
    for n, (seed, row) in enumerate(todo):
        t0 = time.time()
        seed_dir = os.path.join(out, f"seed{seed}")
        print(f"[{n + 1}/{len(todo)}] seed {seed} {row}")
        dm_cfg, _, _ = config.make_config("dm", ["--preset", preset] + overrides.get("dm", []))
        dm_cfg = dataclasses.replace(dm_cfg, seed=seed, out=os.path.join(seed_dir, "dm"))
        dm_path = train_stage(train.train_dm, dm_cfg, "dm")
        eval_cfg = config.eval_config(eval_preset, seed=seed)
        cfg = dataclasses.replace(stage2_config(row, preset, seed, os.path.join(seed_dir, row), overrides), dm=dm_path)
        kind = row_stage(row)
        ckpt = train_stage(train.TRAINERS[kind], cfg, kind)
        classifier = shared_classifier(seed_dir, eval_cfg, dm_cfg)
        os.makedirs(os.path.join(cfg.out, "eval"), exist_ok=True)
        shutil.copy(classifier, os.path.join(cfg.out, "eval", "factor_classifier.pt"))
        units = 8 if row == "pdae" else None
        result = evaluate.evaluate({row: ckpt}, cfg.out, eval_preset, eval_cfg, units)
        names = result["data"]["factors"]
        claims.setdefault("loss_times", dict(zip(names, result["data"]["loss_times"])))
        claims["runs"][f"seed{seed}/{row}"] = dict(summarise(result["methods"][row], names), seed=seed, row=row,
                                                   steps=cfg.steps, batch_size=cfg.batch_size,
                                                   dm_steps=dm_cfg.steps, seconds=time.time() - t0)
        with locked(path):                        # processes side by side (one per seed or row) share the file
            merge_from_disk(path, claims)
            save_json(path, claims)
            write_markdown(claims, os.path.join(out, "claims.md"))
    return claims


def parser():
    p = argparse.ArgumentParser(description="Run the claims grid and write claims.json / claims.md.")
    p.add_argument("--out", default="runs/claims")
    p.add_argument("--preset", default="claims", help="training budget (a train.py preset)")
    p.add_argument("--eval-preset", default=None, help="evaluation sizes (default: the training preset's)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--rows", default="all", help="comma-separated row ids, or all")
    p.add_argument("--dm-steps", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="stage-2 steps")
    p.add_argument("--batch-size", type=int, default=None, help="stage-2 batch (the claims preset's is 32)")
    p.add_argument("--encoder-grid", type=int, default=None,
                   help="beyond the paper: keep E's last feature map at least this wide (train.py diti --encoder-grid)")
    p.add_argument("--encoder-heads", action="store_true",
                   help="beyond the paper: one small encoder per subset, no shared trunk (train.py diti --encoder-heads)")
    p.add_argument("--loss-gamma", type=float, default=None,
                   help="beyond the paper: PDAE's gamma of the stage-2 loss weight (paper 0.1; 1 weights small t most)")
    p.add_argument("--exact-eps", action="store_true",
                   help="beyond the paper: the frozen eps_theta replaced by the data's exact E[eps | x_t] (train.py diti --exact-eps)")
    p.add_argument("--open-z-path", action="store_true",
                   help="beyond the paper: G's ResBlocks start with their last conv not zero (train.py diti --open-z-path)")
    p.add_argument("--position-embedding", action="store_true",
                   help="beyond the paper: G gets a learned position map (train.py diti --position-embedding true)")
    p.add_argument("--encoder-init", default=None, metavar="ENCODER_PT",
                   help="beyond the paper: E starts from this encoder.pt of gains.py --supervised-encoder (a diagnostic)")
    p.add_argument("--encoder-hold", type=int, default=None, metavar="STEPS",
                   help="beyond the paper: E gets no update for this many steps, G learns to read it first (a diagnostic)")
    p.add_argument("--encoder-lr-scale", type=float, default=None, metavar="SCALE",
                   help="beyond the paper: E learns at lr x SCALE, G at lr (train.py diti --encoder-lr-scale)")
    p.add_argument("--t-max", type=int, default=None,
                   help="beyond the paper: stage-2 t drawn below this only (train.py diti --t-max; a diagnostic)")
    p.add_argument("--fine-loss-time", type=int, default=None,
                   help="beyond the paper: make the fine factors stronger, lost at about this t (train.py dm --fine-loss-time)")
    p.add_argument("--texture-cell", type=int, default=None,
                   help="beyond the paper: the texture's checker in cells of this many pixels (train.py dm --texture-cell)")
    p.add_argument("--texture-region", default=None,
                   help="beyond the paper: the texture's checker on the object (SPEC's) or over the whole image "
                        "(train.py dm --texture-region)")
    p.add_argument("--image-size", type=int, default=None,
                   help="the data's and U-Net's size in px (train.py dm --image-size; the claims preset's is 16; at 32 "
                        "E reads every factor >= 0.88 when told the labels, at 16 the size only 0.80)")
    p.add_argument("--base-channels", type=int, default=None,
                   help="the U-Net's width (train.py dm --base-channels; the claims preset's is 16)")
    p.add_argument("--precision", default=None,
                   help="fp32 or bf16 for every training stage (default: the preset's; fp32 at claims and quick)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--eps-errors", default=None, metavar="CKPT",
                   help="print, for a stage-2 checkpoint on the built-in data, the eps error by t of its DDPM, of "
                        "the run and of the exact denoiser; train nothing")
    p.add_argument("--compare", default=None,
                   help="comma-separated claims folders: write one table of their runs to <out>/compare.md, train nothing")
    return p


def overrides_of(a):
    """The parsed flags as the grid's overrides: train.py dm flags, and the stage-2 config fields."""
    return dict(dm=(["--steps", str(a.dm_steps)] if a.dm_steps else [])
                + (["--fine-loss-time", str(a.fine_loss_time)] if a.fine_loss_time else [])
                + (["--texture-cell", str(a.texture_cell)] if a.texture_cell else [])
                + (["--texture-region", a.texture_region] if a.texture_region else [])
                + (["--image-size", str(a.image_size)] if a.image_size else [])
                + (["--base-channels", str(a.base_channels)] if a.base_channels else [])
                + (["--precision", a.precision] if a.precision else []),
                diti_fields={**(dict(steps=a.steps) if a.steps else {}),
                             **(dict(batch_size=a.batch_size) if a.batch_size else {}),
                             **(dict(precision=a.precision) if a.precision else {}),
                             **(dict(encoder_grid=a.encoder_grid) if a.encoder_grid else {}),
                             **(dict(loss_gamma=a.loss_gamma) if a.loss_gamma is not None else {}),
                             **(dict(encoder_heads=True) if a.encoder_heads else {}),
                             **(dict(t_max=a.t_max) if a.t_max else {}),
                             **(dict(encoder_init=a.encoder_init) if a.encoder_init else {}),
                             **(dict(encoder_hold=a.encoder_hold) if a.encoder_hold else {}),
                             **(dict(encoder_lr_scale=a.encoder_lr_scale) if a.encoder_lr_scale else {}),
                             **(dict(exact_eps=True) if a.exact_eps else {}),
                             **(dict(open_z_path=True) if a.open_z_path else {}),
                             **(dict(position_embedding=True) if a.position_embedding else {})})


def main(argv=None):
    a = parser().parse_args(argv)
    if a.eps_errors:
        if not os.path.isfile(a.eps_errors):
            raise config.UserError(f"{a.eps_errors} does not exist: pass a stage-2 checkpoint (RUN/ckpt.pt)")
        print(gains.eps_error_table(a.eps_errors, gains.eps_errors(a.eps_errors)))
        return
    if a.compare:
        dirs = a.compare.split(",")
        for d in dirs:
            if not os.path.isfile(os.path.join(d, "claims.json")):
                raise config.UserError(f"{d}/claims.json does not exist: run claims.py --out {d} first")
        os.makedirs(a.out, exist_ok=True)
        print(f"claims: {compare(dirs, os.path.join(a.out, 'compare.md'), None if a.rows == 'all' else a.rows.split(','))}")
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.image_size is not None and (a.image_size < 16 or a.image_size % 16):
        raise config.UserError(f"--image-size must be a multiple of 16 (the encoder halves the image four times), "
                               f"got {a.image_size}")
    rows = grid_rows() if a.rows == "all" else a.rows.split(",")
    overrides = overrides_of(a)
    config.make_config("dm", ["--preset", a.preset, *overrides["dm"]])      # validate the DDPM's flags and
    for row in rows:                                      # every row before training anything
        config.check_config(stage2_config(row, a.preset, 0, "", overrides))
    os.makedirs(a.out, exist_ok=True)
    claims = run_grid(a.out, a.preset, a.eval_preset or a.preset, [int(s) for s in a.seeds.split(",")], rows,
                      overrides, command=" ".join(argv if argv is not None else sys.argv[1:]))
    print(f"claims: {write_markdown(claims, os.path.join(a.out, 'claims.md'))}")


if __name__ == "__main__":
    sys.exit(train.cli(main))
