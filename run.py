"""The main job: DDPM pre-training, DiTi (base and stop_grad), PDAE and DisDiff on the frozen DDPM, then the
evaluation of all four and the report.

    python run.py                                   # --preset quick --out runs/quick
    python run.py --preset tiny --out /tmp/smoke    # the smoke run (about a minute)
    python run.py --fresh                           # retrain every stage instead of reusing finished ones

A stage whose checkpoint reached the configured steps is reused, an unfinished one resumes. Layout of --out:
dm/, diti/, diti_stop_grad/, pdae/, disdiff/ (checkpoints and training plots), eval/ (figures), run.json (preset,
training wall times), report.json, report.md.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import asdict

import torch

import checkpoint
import config
import evaluate
import train
from config import UserError

# the main job's stage-2 runs: name -> (train.py stage, the fields it sets beyond the preset)
STAGE2 = {"diti": ("diti", dict(mode="base")), "diti_stop_grad": ("diti", dict(mode="stop_grad")),
          "pdae": ("diti", dict(k=1, mode="base")), "disdiff": ("disdiff", dict())}
IGNORED = {"steps", "out", "dm", "device", "precision", "ckpt_every"}   # may change without retraining


def stage_configs(preset, out, device):
    """The DDPM config and the three stage-2 configs of a preset, writing under out."""
    dm = config.DMConfig(**config.PRESETS[preset].get("dm", {}))
    dm.out, dm.device = os.path.join(out, "dm"), device
    stage2 = {}
    for name, (stage, overrides) in STAGE2.items():
        cfg = config.STAGES[stage](**{**config.PRESETS[preset].get(stage, {}), **overrides})
        cfg.dm, cfg.out, cfg.device = os.path.join(dm.out, "ckpt.pt"), os.path.join(out, name), device
        stage2[name] = cfg
    return dm, stage2


def plain(value):
    """Tuples and lists compare equal after a JSON round trip."""
    return json.loads(json.dumps(value))


def stage_state(cfg, kind):
    """'new', 'finished' or 'unfinished' for <cfg.out>/ckpt.pt. A checkpoint trained with other settings (other
    than its step count) is an error, so a changed preset never mixes with an old run."""
    path = os.path.join(cfg.out, "ckpt.pt")
    if not os.path.exists(path):
        return "new"
    ckpt = checkpoint.load_checkpoint(path, kind)
    changed = [k for k, v in asdict(cfg).items() if k not in IGNORED and plain(ckpt["config"].get(k)) != plain(v)]
    if changed:
        raise UserError(f"{path} was trained with other settings ({', '.join(changed)}): pass --fresh to retrain, "
                        f"or choose another --out")
    if ckpt["step"] > cfg.steps:
        raise UserError(f"{path} is at step {ckpt['step']}, past the configured {cfg.steps}: pass --fresh to "
                        f"retrain, or choose another --out")
    return "finished" if ckpt["step"] == cfg.steps else "unfinished"


def run_stage(name, cfg, kind, train_fn, seconds):
    """Train one stage unless its checkpoint is finished; adds its wall time to seconds[name]. Returns whether
    it trained."""
    state = stage_state(cfg, kind)
    if state == "finished":
        print(f"{name}: reusing {os.path.join(cfg.out, 'ckpt.pt')} (step {cfg.steps})")
        return False
    print(f"{name}: {'resuming' if state == 'unfinished' else 'training'} ({cfg.steps} steps x {cfg.batch_size})")
    start = time.perf_counter()
    train_fn(cfg, resume=state == "unfinished")
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
    return True


def remove_checkpoint(cfg):
    path = os.path.join(cfg.out, "ckpt.pt")
    if os.path.exists(path):
        os.remove(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="quick", help=f"one of {', '.join(config.PRESETS)}")
    p.add_argument("--out", default=None, help="run dir (default runs/<preset>)")
    p.add_argument("--fresh", action="store_true", help="retrain every stage")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for training and evaluation (default: torch's choice to train, 1 to evaluate)")
    args = p.parse_args(argv)
    if args.preset not in config.PRESETS:
        raise UserError(f"unknown preset '{args.preset}': choose one of {', '.join(config.PRESETS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join("runs", args.preset)
    os.makedirs(out, exist_ok=True)
    run_path = os.path.join(out, "run.json")
    saved = json.load(open(run_path)) if os.path.isfile(run_path) and not args.fresh else {}
    seconds = saved.get("train_seconds", {})

    dm_cfg, stage2 = stage_configs(args.preset, out, args.device)
    if args.fresh:
        for cfg in (dm_cfg, *stage2.values()):
            remove_checkpoint(cfg)
    start = time.perf_counter()
    if run_stage("dm", dm_cfg, "dm", train.train_dm, seconds):
        for cfg in stage2.values():         # a changed DDPM invalidates everything trained on it
            remove_checkpoint(cfg)
    for name, cfg in stage2.items():
        stage = STAGE2[name][0]
        run_stage(name, cfg, stage, train.TRAINERS[stage], seconds)
    run_info = dict(preset=args.preset, train_seconds=seconds, configs=dict(dm=asdict(dm_cfg), **{
        n: asdict(c) for n, c in stage2.items()}))
    with open(run_path, "w") as f:
        json.dump(plain(run_info), f, indent=1)

    cfg = config.eval_config(args.preset, device=args.device, threads=args.threads or 1)
    checkpoints = {n: os.path.join(c.out, "ckpt.pt") for n, c in stage2.items()}
    evaluate.evaluate(checkpoints, out, args.preset, cfg,
                      extra=dict(run=dict(preset=args.preset, train_seconds=seconds)))
    print(f"main job done in {time.perf_counter() - start:.0f} s; report: {os.path.join(out, 'report.md')}")
    return os.path.join(out, "report.md")


if __name__ == "__main__":
    sys.exit(train.cli(main))
