"""Representations: what a method offers evaluate.py's views. A method is seen through a `Representation`:
encode(x0) -> z, the units z is cut into (DiTi subsets, PDAE chunks, DisDiff factors) with the time-steps each
unit is meant for, and optionally an `editing.Decoder` for the views that decode. DiTi and PDAE checkpoints
are read here; disdiff.py builds its own.
"""
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import config
import data
import diffusion
import editing
import train
from diti import uniform_partition


@dataclass
class Representation:
    """encode(x0 (B, C, H, W) in [-1, 1]) -> z (B, d); units: index arrays into z; t_ranges: (first, last)
    time-steps of each unit (the ranges the usage view stratifies over); decoder: an editing.Decoder or
    None (then the decoder-based views are skipped); info: the training budget, shown in the report, and
    'dm_config', the frozen DDPM's config (it names the data the method is scored on)."""
    name: str
    encode: Callable
    units: list
    t_ranges: list
    decoder: editing.Decoder = None
    info: dict = field(default_factory=dict)


def subsets(partition):
    """A partition's subsets as index arrays, with their t ranges."""
    units = [np.arange(s, e) for s, e in zip(partition.starts(), partition.ends)]
    return units, [partition.t_range(i) for i in range(partition.k)]


def diti_representation(path, device, name, units_k=None):
    """A DiTi/PDAE checkpoint as a Representation. A one-subset model (PDAE) is cut into units_k equal
    chunks with uniform t ranges, so its maps compare with k-subset DiTi runs (SPEC §7)."""
    model, unet, ckpt = train.load_diti(path, device)
    part = model.partition
    units, t_ranges = subsets(uniform_partition(part.d, units_k) if part.k == 1 and units_k else part)
    cfg, dm = ckpt["config"], ckpt["dm_config"]
    info = dict(checkpoint=path, kind="diti", mode=cfg["mode"], k=part.k, d=part.d, partition=cfg["partition"],
                steps=ckpt["step"], batch_size=cfg["batch_size"], lr=cfg["lr"], dm_steps=dm["steps"],
                dm_batch_size=dm["batch_size"], units=len(units), dm_config=dm)
    loss_png = os.path.join(os.path.dirname(path), "loss_by_t.png")    # SPEC §5: the loss per t bucket
    if os.path.isfile(loss_png):
        info["loss_by_t_png"] = loss_png
    sched = diffusion.linear_schedule().to(device)
    return Representation(name, model.encode, units, t_ranges, editing.diti_decoder(model, unet, sched), info)


def load_representation(path, device, name, units_k=None):
    """Dispatch on the checkpoint's kind. A DisDiff checkpoint needs disdiff.representation(path, device,
    name) returning a Representation (built by disdiff.py)."""
    kind = checkpoint.load_checkpoint(path)["kind"]
    if kind == "diti":
        return diti_representation(path, device, name, units_k)
    if kind != "disdiff":
        raise config.UserError(f"{path} is a '{kind}' checkpoint: evaluate a stage-2 (diti or disdiff) checkpoint")
    import disdiff
    return disdiff.representation(path, device, name)


@torch.no_grad()
def encode_images(rep, images, batch_size, device, desc="encode"):
    """uint8 images (N, H, W, 3) -> z (N, d) numpy, batched, with the (EMA) encoder."""
    out = [rep.encode(data.to_tensor(images[s]).to(device)).float().cpu()
           for s in tqdm(editing.chunks(len(images), batch_size), desc=f"{desc} ({rep.name})", leave=False)]
    return torch.cat(out).numpy()
