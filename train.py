"""Training. Stage 1 pre-trains the DDPM; stage 2 trains DiTi's encoder and shift decoder against it (frozen).

    python train.py dm    --preset quick --out runs/quick/dm
    python train.py diti  --preset quick --dm runs/quick/dm/ckpt.pt --k 8 --mode base --out runs/quick/diti
    python train.py diti  --preset quick --dm runs/quick/dm/ckpt.pt --k 1 --out runs/quick/pdae   # PDAE

Every config field is a flag (`--batch-size 32`; config.py); presets set many at once. Runs resume with --resume.
Works under `torchrun --nproc_per_node N train.py ...` (gloo on CPU, nccl on CUDA); the global batch stays
the configured batch and each row of it gets the same t and eps as in one process (loop.py).
"""
import os
import random
import sys
import warnings
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

import data
import diffusion
import synthetic
from checkpoint import load_checkpoint
from config import STAGES, DiTiConfig, DMConfig, UserError, make_config, unet_config
from diti import DiTi, Partition, diti_loss, make_partition
from loop import fit, make_stream
from plots import save_grid
from runtime import autocast, dist_setup, pick_device
from unet import UNet, UNetConfig


# ----------------------------------------------------------------------------------------------------------
# Seeds and the models of a stage: the U-Net of a checkpoint, the frozen eps_theta, DiTi's E and G

def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def build_unet(ckpt_or_cfg):
    cfg = ckpt_or_cfg["unet"] if isinstance(ckpt_or_cfg, dict) else asdict(ckpt_or_cfg)
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    return UNet(UNetConfig(**cfg))


def load_frozen_unet(path, device):
    """The stage-1 EMA U-Net, frozen (eval mode, no gradients), and the DDPM config it was trained with."""
    ckpt = load_checkpoint(path, kind="dm")
    unet = build_unet(ckpt)
    unet.load_state_dict(ckpt["ema"])
    unet.to(device).eval().requires_grad_(False)
    return unet, ckpt


def check_encoder_size(dm_ckpt, path):
    """Stage 2's E halves the DDPM's image four times (diti.Encoder): refuse a DDPM whose size it cannot take."""
    size = dm_ckpt["config"]["image_size"]
    if size % 16:
        raise UserError(f"{path} was trained at {size} px, but the encoder needs an image size divisible by 16: "
                        f"train the DDPM with --image-size {max(16, size // 16 * 16)} or {size // 16 * 16 + 16}")


def frozen_eps(unet, dm_config, exact):
    """The frozen eps_theta of stage 2: the U-Net, or with `exact` (DiTi --exact-eps, beyond the paper) the exact
    denoiser of the built-in data that the DDPM was trained on, reading G's features from the same U-Net."""
    if not exact:
        return unet
    if dm_config["data"] != "synthetic":
        raise UserError(f"--exact-eps needs the built-in data (the DDPM was trained on '{dm_config['data']}'): "
                        f"drop --exact-eps, or pass --dm a DDPM trained on --data synthetic")
    device = next(unet.parameters()).device
    try:
        return synthetic.ExactDenoiser(unet, synthetic_generator(dm_config)).to(device)
    except ValueError as e:                   # a factor layout it cannot sum apart (--texture-region image)
        raise UserError(f"--exact-eps cannot use this DDPM's data ({e}): drop --exact-eps, or pass --dm a DDPM "
                        f"trained with --texture-region object")


def synthetic_generator(dm_config):
    """The built-in data's renderer for a DDPM config (a dict), as the data loader builds it."""
    options = synthetic_options(dm_config)
    del options["n_train"]
    return synthetic.Synthetic(dm_config["image_size"], dm_config["seed"], **options)


def build_diti(dm_ckpt, cfg):
    """The trainable E and G for a stage-2 config, on the DDPM checkpoint's U-Net. A stage-2 checkpoint
    carries its partition's end dims, which are used as they are (a fitted partition is not refitted)."""
    unet_cfg = build_unet(dm_ckpt).cfg
    if "partition" in dm_ckpt:
        part = Partition(tuple(dm_ckpt["partition"]))
    else:
        try:
            part = make_partition(cfg.partition, cfg.z_dim, cfg.k, cfg.stages, cfg.stage_dims,
                                  tv_curves=tv_curves_for(dm_ckpt["config"]) if cfg.partition == "fitted" else None)
        except ValueError as e:
            raise UserError(str(e))
    return DiTi(unet_cfg, part, encoder_grid=cfg.encoder_grid, encoder_heads=cfg.encoder_heads,
                open_z_path=cfg.open_z_path, position_embedding=cfg.position_embedding)


def tv_curves_for(dm_config):
    """The exact TV_t curves of the built-in data's factors (for the fitted partition)."""
    if dm_config["data"] != "synthetic":
        raise UserError("--partition fitted needs the built-in data's known factors: use uniform, paper or staged")
    return data.attribute_loss_curves(synthetic_generator(dm_config))[0]


def synthetic_options(dm_config):
    """The built-in data's options held in a DDPM config (a dict); {} for real data. Older checkpoints lack
    the options beyond the paper (fine_loss_time, texture_cell, texture_region): they used the default data."""
    if dm_config["data"] != "synthetic":
        return {}
    beyond = ("fine_loss_time", "texture_cell", "texture_region")
    return dict(n_train=dm_config["n_train"], **{k: dm_config.get(k, getattr(DMConfig, k)) for k in beyond})


def load_train_split(dm_config, rank=0, world=1):
    """The training images of a DDPM config (a dict). Under torchrun rank 0 loads first (building any cache)
    while the others wait."""
    if rank > 0:
        dist.barrier()
    dataset = data.load_data(dm_config["data"], dm_config["data_dir"] or None, size=dm_config["image_size"],
                             seed=dm_config["seed"], **synthetic_options(dm_config))["train"]
    if rank == 0 and world > 1:
        dist.barrier()
    return dataset


# ----------------------------------------------------------------------------------------------------------
# Stage 1: the DDPM

def train_dm(cfg, resume=False):
    device = pick_device(cfg.device)
    rank, world = dist_setup(cfg.device)
    seed_everything(cfg.seed + rank)
    dataset = load_train_split(asdict(cfg), rank, world)
    stream = make_stream(cfg, dataset, rank, world)
    sched = diffusion.linear_schedule().to(device)
    unet_cfg = unet_config(cfg)
    unet = UNet(unet_cfg).to(device)
    if rank == 0:
        n = sum(p.numel() for p in unet.parameters())
        print(f"DDPM: {n / 1e6:.2f}M parameters, {len(dataset)} images, device {device}, out {cfg.out}")

    def loss_fn(model, x0, t, eps):
        per_sample = (eps - model(diffusion.q_sample(sched, x0, t, eps), t)).float().pow(2).flatten(1).mean(1)
        return per_sample.mean(), per_sample.detach(), t, {}

    ema = fit(cfg, "dm", unet, loss_fn, stream, device, rank, world, resume, dict(unet=asdict(unet_cfg)))
    if rank == 0:
        path = save_samples(ema, sched, cfg, device)
        print(f"checkpoint {os.path.join(cfg.out, 'ckpt.pt')}; samples {path}")
    return ema


@torch.no_grad()
def save_samples(unet, sched, cfg, device, n=64):
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    x_T = torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=gen).to(device)
    with autocast(device, cfg.precision):
        x0 = diffusion.ddim_sample(lambda x, t: (unet(x, t).float(), None), sched, x_T, cfg.sample_steps, progress=True)
    return save_grid(data.to_uint8(x0.cpu()), os.path.join(cfg.out, "samples.png"))


# ----------------------------------------------------------------------------------------------------------
# Stage 2: DiTi / PDAE

def train_diti(cfg, resume=False):
    device = pick_device(cfg.device)
    rank, world = dist_setup(cfg.device)
    seed_everything(cfg.seed + rank)
    if cfg.mode not in ("base", "stop_grad"):
        raise UserError(f"unknown --mode '{cfg.mode}': choose base or stop_grad")
    if not cfg.dm:
        raise UserError("stage 2 needs the frozen DDPM: pass --dm <path of the stage-1 ckpt.pt>")
    unet, dm_ckpt = load_frozen_unet(cfg.dm, device)
    check_encoder_size(dm_ckpt, cfg.dm)
    dm_cfg = dm_ckpt["config"]
    unet = frozen_eps(unet, dm_cfg, cfg.exact_eps)
    dataset = load_train_split(dm_cfg, rank, world)
    stream = make_stream(cfg, dataset, rank, world)
    sched = diffusion.linear_schedule().to(device)
    model = build_diti(dm_ckpt, cfg).to(device)
    if cfg.encoder_init:                              # beyond the paper; a resumed run then loads its own E
        load_encoder_init(model.encoder, cfg.encoder_init)
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        print(f"DiTi: k={cfg.k} d={cfg.z_dim} mode={cfg.mode}, {n / 1e6:.2f}M trainable parameters, "
              f"frozen DDPM {cfg.dm}, device {device}, out {cfg.out}")

    def loss_fn(model, x0, t, eps):
        if cfg.t_max:                                     # beyond the paper: t in {0..t_max-1}, uniform up to rounding
            t = t * cfg.t_max // sched.T
        loss, per_sample, t = diti_loss(model, unet, sched, x0, cfg.mode, t, eps, cfg.loss_gamma)
        return loss, per_sample, t, {}

    extra = dict(dm_path=os.path.abspath(cfg.dm), dm_config=dm_cfg, unet=dm_ckpt["unet"],
                 partition=list(model.partition.ends))
    hold = (list(model.encoder.parameters()), cfg.encoder_hold) if cfg.encoder_hold else None
    return fit(cfg, "diti", model, loss_fn, stream, device, rank, world, resume, extra, hold=hold,
               make_opt=(lambda params: diti_optimiser(model, params, cfg)) if cfg.encoder_lr_scale != 1 else None)


def diti_optimiser(model, params, cfg):
    """Adam over E and G with E's lr cfg.lr x cfg.encoder_lr_scale (--encoder-lr-scale, beyond the paper; at 1
    fit's one-group Adam is used). Each group keeps its lr_scale, so a resume with another --lr keeps the ratio."""
    encoder = {id(p) for p in model.encoder.parameters()}
    groups = [dict(params=[p for p in params if id(p) in encoder], lr_scale=cfg.encoder_lr_scale),
              dict(params=[p for p in params if id(p) not in encoder], lr_scale=1.0)]
    return torch.optim.Adam([dict(g, lr=cfg.lr * g["lr_scale"]) for g in groups if g["params"]], lr=cfg.lr)


def load_encoder_init(encoder, path):
    """Start E from the encoder.pt of gains.py --supervised-encoder (--encoder-init, a diagnostic)."""
    state = load_checkpoint(path, kind="encoder")["encoder"]
    try:
        encoder.load_state_dict(state)
    except RuntimeError:
        raise UserError(f"{path} holds another encoder than this run's (image size, --z-dim, --encoder-grid, "
                        "--encoder-heads): write one for this run with gains.py --supervised-encoder") from None


def load_diti(path, device="cpu"):
    """(EMA DiTi model, frozen U-Net, checkpoint) from a stage-2 checkpoint."""
    ckpt = load_checkpoint(path, kind="diti")
    cfg = DiTiConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items()})
    model = build_diti(ckpt, cfg)
    model.load_state_dict(ckpt["ema"])
    unet = build_unet(ckpt)
    unet_path = ckpt["dm_path"]
    unet, _ = load_frozen_unet(unet_path, device)
    unet = frozen_eps(unet, ckpt["dm_config"], cfg.exact_eps)
    return model.to(device).eval(), unet, ckpt


# ----------------------------------------------------------------------------------------------------------
# DisDiff, the comparison method: the stage lives in disdiff.py, which imports this module

def train_disdiff(cfg, resume=False):
    sys.modules.setdefault("train", sys.modules[__name__])   # run as a script: one module, one UserError class
    from disdiff import train_disdiff as run
    return run(cfg, resume)


TRAINERS = {"dm": train_dm, "diti": train_diti, "disdiff": train_disdiff}     # stage -> its training function


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in STAGES:
        raise UserError(f"say which stage to train: python train.py {{{'|'.join(STAGES)}}} [--preset ...] [--flags]")
    cfg, resume, _ = make_config(argv[0], argv[1:])
    TRAINERS[argv[0]](cfg, resume)


def cli(entry=None, argv=None):
    """A script's main() as a command (train.py, run.py, evaluate.py, claims.py): a problem with the input or
    the machine is one line on stderr and exit code 2 (never a traceback); warnings are one line each."""
    warnings.formatwarning = lambda message, category, *args, **kw: f"warning: {message}\n"
    try:
        (entry or main)(argv)
        return 0
    except (UserError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:                              # disk full, no permission, ...
        print(f"error: {e}: check the path and the disk", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact (continue with --resume)", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(cli())
