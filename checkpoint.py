"""Checkpoints: written atomically, loadable with weights_only=True, holding everything an exact resume needs
(weights, EMA, optimiser, the loss log, every random state), and the checks that a resume or a reused DDPM
matches the flags of the command that continues it. loop.fit writes them; every later stage reads them.
"""
import os
import random

import numpy as np
import torch

from config import DMConfig, UserError


def save_checkpoint(path, payload):
    """Write to a temporary file in the same folder, then rename: a crash never leaves a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, kind=None):
    """Load with weights_only=True; errors say which file and what to do."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist: train it first or fix the path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}); it is truncated or not a "
                        f"diti checkpoint: delete it and retrain, or point at another file")
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise UserError(f"{path} is not a diti checkpoint: point at a file written by train.py")
    if kind is not None and ckpt["kind"] != kind:
        hint = ("--dm takes the DDPM checkpoint written by `train.py dm`" if kind == "dm" else
                f"it was written by `train.py {ckpt['kind']}`: choose another --out")
        raise UserError(f"{path} is a '{ckpt['kind']}' checkpoint but a '{kind}' one is needed here: {hint}")
    return ckpt


def rng_state(stream, noise):
    """Everything random a resumed run must continue: global RNGs, the batch stream, fit's noise generator."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = dict(torch=torch.get_rng_state(), numpy=[keys.tolist(), pos, has_gauss, cached],
                 python=list(random.getstate()[1]), data=stream.state_dict(), noise=noise.get_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, stream, noise):
    """Restore rng_state. A run written on another device type (say CUDA, resumed on a CPU) cannot continue its
    noise generator's stream: it goes on from a seed taken from the saved state, and says so."""
    torch.set_rng_state(state["torch"])
    if state["noise"].numel() == noise.get_state().numel():
        noise.set_state(state["noise"])
    else:
        noise.manual_seed(int(state["noise"].long().sum()))
        print(f"warning: this checkpoint's t and eps generator was written on another device than {noise.device}: "
              f"resuming with a fresh seed for it (not bit-exact)")
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate((3, tuple(state["python"]), None))
    stream.load_state_dict(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def config_diff(old, new):
    """'name: old -> new' for the fields that differ between two config dicts (lists and tuples alike)."""
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v
    return ", ".join(f"{k}: {old.get(k)} -> {new.get(k)}" for k in sorted(set(old) | set(new))
                     if norm(old.get(k)) != norm(new.get(k)))


DATA_FIELDS = ("data", "data_dir", "image_size", "n_train", "fine_loss_time", "texture_cell", "texture_region", "seed")


def check_same_data(ck, cfg, ckpt_path):
    """On resume or reuse of a DDPM: it must have been trained on the data these flags load."""
    if ck["kind"] != "dm":
        return
    old = {k: ck["config"].get(k, getattr(DMConfig, k)) for k in DATA_FIELDS}   # an older checkpoint: the default
    diff = config_diff(old, {k: getattr(cfg, k) for k in DATA_FIELDS})
    if diff:
        raise UserError(f"{ckpt_path} was trained on other data ({diff}): pass the flags it was trained with, "
                        f"or choose another --out")


def check_same_model(ck, extra, ckpt_path):
    """On resume: the U-Net (for stage 2: the frozen DDPM's) and the partition must be those of the checkpoint."""
    if "unet" in ck and "unet" in extra and config_diff(ck["unet"], extra["unet"]):
        diff = config_diff(ck["unet"], extra["unet"])
        if "dm_path" in ck:
            raise UserError(f"{ckpt_path} was trained against the DDPM {ck['dm_path']}, whose U-Net differs from "
                            f"that of --dm {extra.get('dm_path')} ({diff}): pass the --dm it was trained with, "
                            f"or choose another --out")
        raise UserError(f"{ckpt_path} was trained with another U-Net ({diff}): resume with the flags it was trained "
                        f"with, or choose another --out")
    if "partition" in ck and "partition" in extra and list(ck["partition"]) != list(extra["partition"]):
        raise UserError(f"{ckpt_path} was trained with the partition ends {tuple(ck['partition'])}, these flags give "
                        f"{tuple(extra['partition'])}: resume with the same --k/--z-dim/--partition, or choose "
                        f"another --out")
