"""Training. Stage 1 pre-trains the DDPM; stage 2 trains DiTi's encoder and shift decoder against it (frozen).

    python train.py dm    --preset quick --out runs/quick/dm
    python train.py diti  --preset quick --dm runs/quick/dm/ckpt.pt --k 8 --mode base --out runs/quick/diti
    python train.py diti  --preset quick --dm runs/quick/dm/ckpt.pt --k 1 --out runs/quick/pdae   # PDAE

Every config field is a flag (`--batch-size 32`; config.py); presets set many at once. Runs resume with --resume.
Works under `torchrun --nproc_per_node N train.py ...` (gloo on CPU, nccl on CUDA); the global batch stays
the configured batch and each row of it gets the same t and eps as in one process (see fit).
"""
import copy
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import diffusion
import synthetic
from checkpoint import (check_same_data, check_same_model, config_diff, load_checkpoint, rng_state,
                        save_checkpoint, set_rng_state)
from config import STAGES, DiTiConfig, DMConfig, UserError, make_config, unet_config
from diti import DiTi, Partition, diti_loss, make_partition
from plots import bar_plot, save_grid
from runtime import autocast, average_gradients, dist_setup, gather_rows, mean_over_ranks, pick_device
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


def frozen_eps(unet, dm_config, exact):
    """The frozen eps_theta of stage 2: the U-Net, or with `exact` (DiTi --exact-eps, beyond the paper) the exact
    denoiser of the built-in data that the DDPM was trained on, reading G's features from the same U-Net."""
    if not exact:
        return unet
    if dm_config["data"] != "synthetic":
        raise UserError(f"--exact-eps needs the built-in data (the DDPM was trained on '{dm_config['data']}'): "
                        f"drop --exact-eps, or pass --dm a DDPM trained on --data synthetic")
    device = next(unet.parameters()).device
    return synthetic.ExactDenoiser(unet, synthetic_generator(dm_config)).to(device)


def synthetic_generator(dm_config):
    """The built-in data's renderer for a DDPM config (a dict), as the data loader builds it."""
    fine_loss_time = synthetic_options(dm_config)["fine_loss_time"]
    return synthetic.Synthetic(dm_config["image_size"], dm_config["seed"], fine_loss_time=fine_loss_time)


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
                open_z_path=cfg.open_z_path)


def tv_curves_for(dm_config):
    """The exact TV_t curves of the built-in data's factors (for the fitted partition)."""
    if dm_config["data"] != "synthetic":
        raise UserError("--partition fitted needs the built-in data's known factors: use uniform, paper or staged")
    return data.attribute_loss_curves(synthetic_generator(dm_config))[0]


# ----------------------------------------------------------------------------------------------------------
# The training loop shared by every stage

class LossByTime:
    """Running mean of the per-sample loss in `buckets` time-step bins (decayed so recent steps dominate)."""

    def __init__(self, T=1000, buckets=20, decay=0.99):
        self.T, self.decay = T, decay
        self.sum, self.count = torch.zeros(buckets, dtype=torch.float64), torch.zeros(buckets, dtype=torch.float64)

    def add(self, per_sample, t):
        b = (t.cpu() * len(self.sum) // self.T)
        self.sum *= self.decay
        self.count *= self.decay
        self.sum.index_add_(0, b, per_sample.detach().double().cpu())
        self.count.index_add_(0, b, torch.ones_like(b, dtype=torch.float64))

    def means(self):
        return (self.sum / self.count.clamp_min(1e-12)).numpy()

    def save_png(self, path, title):
        width = self.T // len(self.sum)
        return bar_plot(self.means(), [str(i * width) for i in range(len(self.sum))], path, title=title,
                        xlabel="t (bucket start)", ylabel="loss")


def ema_decay_at(decay, step):
    """EMA decay with a warm-up, min(decay, (1 + step) / (10 + step)), so that short runs (the CPU presets) do
    not average in their random initialisation; from a few thousand steps on it is the configured decay."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, all weights in one fused call; buffers copied."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def draw_noise(gen, x0, T, rank, world):
    """t (B / world,) and eps (B / world, C, H, W) for this rank's rows of the global batch of B rows. Both are
    drawn for all B rows from `gen`, seeded alike on every rank, and sliced like the batch stream (rows rank,
    rank + world, ...), so row i gets the same t and eps under any number of processes."""
    B = x0.shape[0] * world
    t = torch.randint(0, T, (B,), generator=gen, device=gen.device)
    eps = torch.randn((B, *x0.shape[1:]), generator=gen, device=gen.device)
    return t[rank::world].to(x0.device), eps[rank::world].to(x0.device)


def fit(cfg, kind, model, loss_fn, stream, device, rank, world, resume, extra, make_opt=None, lr_at=None):
    """Adam + EMA + atomic checkpoints + exact resume + data parallelism over `world` processes.
    loss_fn(model, x0, t, eps) -> (loss, per_sample, t, logs), with x0 this rank's rows of the batch and t, eps
    their time-steps and noise (see draw_noise: the same for a row under any number of processes).
    `extra` goes into every checkpoint (configs, the frozen model's path). Returns the EMA model.
    Optional: make_opt(params) -> optimizer instead of Adam(lr=cfg.lr); lr_at(step) -> lr set before each step."""
    ckpt_path, ck = os.path.join(cfg.out, "ckpt.pt"), None
    if os.path.exists(ckpt_path):                                   # checked first: a wrong command fails at once
        if not resume:
            raise UserError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out")
        ck = load_checkpoint(ckpt_path, kind=kind)
        check_same_model(ck, extra, ckpt_path)
        check_same_data(ck, cfg, ckpt_path)
    elif resume and rank == 0:
        print(f"no checkpoint at {ckpt_path} yet: starting at step 0")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_opt(params) if make_opt else torch.optim.Adam(params, lr=cfg.lr)
    if world > 1:
        for tensor in [*model.parameters(), *model.buffers()]:     # every rank starts from rank 0's weights
            dist.broadcast(tensor.data, 0)
    ema = copy.deepcopy(model).requires_grad_(False)
    noise = torch.Generator(device=device).manual_seed(cfg.seed)    # t and eps: identical on every rank
    hist, start, log, saved = LossByTime(), 0, [], None
    if ck is not None:
        try:
            model.load_state_dict(ck["model"]), ema.load_state_dict(ck["ema"])
        except RuntimeError:
            raise UserError(f"{ckpt_path} holds a model of another shape than these flags build "
                            f"({config_diff(ck['config'], asdict(cfg)) or 'same flags'}): resume with the flags "
                            f"it was trained with, or choose another --out")
        opt.load_state_dict(ck["opt"])
        for group in opt.param_groups:
            group["lr"] = cfg.lr                                     # the command line's --lr applies
        start, log, saved = ck["step"], ck["log"], ck["step"]
        hist.sum, hist.count = ck["hist"]
        if len(ck["rng"]) != world and rank == 0:
            print(f"warning: {ckpt_path} was written by {len(ck['rng'])} process(es), this run has {world}: "
                  f"continuing (batches, t and eps repeat; dropout's random draws will not)")
        set_rng_state(ck["rng"][rank % len(ck["rng"])], stream, noise)
        if rank == 0:
            print(f"resumed {ckpt_path} at step {start}")

    def checkpoint(step):
        """Every rank calls this (the RNG states are gathered); rank 0 writes."""
        if not all(torch.isfinite(p).all() for p in params):
            raise UserError(f"the {kind} weights became inf/nan at step {step}: stopped without saving; "
                            f"{last_good()} (lower --lr or use --precision fp32, then --resume)")
        rng = [rng_state(stream, noise)]
        if world > 1:
            rng = [None] * world
            dist.all_gather_object(rng, rng_state(stream, noise))
        if rank == 0:
            save_checkpoint(ckpt_path, dict(kind=kind, step=step, model=model.state_dict(), ema=ema.state_dict(),
                                            opt=opt.state_dict(), log=log, hist=(hist.sum, hist.count), rng=rng,
                                            config=asdict(cfg), **extra))
            with open(os.path.join(cfg.out, "log.json"), "w") as f:     # the losses so far, to read
                json.dump(log, f)

    def last_good():
        if saved is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint {ckpt_path} (step {saved}) is intact"

    pending = []       # the last steps' (step, log names, [loss, *logs], per-sample losses, t), on the device

    def read_pending():
        """Read the pending steps' figures off the device in one go (a read per step makes the CPU wait for the
        GPU every step), stop at the first non-finite loss, and log them in order."""
        if not pending:
            return
        figures = torch.stack([p[2] for p in pending]).tolist()
        per_sample, t = (torch.stack([p[i] for p in pending]).cpu() for i in (3, 4))
        for i, (step, names, _, _, _) in enumerate(pending):
            loss_value, *values = figures[i]
            if not math.isfinite(loss_value):
                raise UserError(f"the {kind} loss became {loss_value} at step {step + 1}: stopped; {last_good()} "
                                f"(lower --lr or use --precision fp32, then --resume)")
            hist.add(per_sample[i], t[i])
            log.append(dict(step=step + 1, loss=loss_value, **dict(zip(names, values))))
        pending.clear()

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=kind, disable=rank != 0,
               dynamic_ncols=True)
    tick = time.time()
    for step in bar:
        x0 = next(stream).to(device, non_blocking=True)                 # (B / world, 3, H, W)
        t, eps = draw_noise(noise, x0, hist.T, rank, world)
        with autocast(device, cfg.precision):
            loss, per_sample, t, logs = loss_fn(model, x0, t, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            average_gradients(params, world)
        if lr_at:
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
        opt.step()
        ema_update(ema, model, ema_decay_at(cfg.ema_decay, step))
        figures = torch.stack([loss.detach().double()] + [torch.as_tensor(v, dtype=torch.float64, device=device)
                                                          .detach().reshape(()) for v in logs.values()])
        pending.append((step, list(logs), mean_over_ranks(figures, world),    # the whole batch's loss and logs
                        gather_rows(per_sample.detach(), world), gather_rows(t, world)))
        last = (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps
        if (step + 1) % 10 == 0 or last:
            read_pending()
        if rank == 0 and (step + 1) % 10 == 0:
            rate = 10 * cfg.batch_size / (time.time() - tick)
            bar.set_postfix(loss=f"{log[-1]['loss']:.4f}", img_s=f"{rate:.0f}")
            tick = time.time()
        if last:
            checkpoint(step + 1)
            saved = step + 1
    if rank == 0 and cfg.steps > start:
        hist.save_png(os.path.join(cfg.out, "loss_by_t.png"), f"{kind}: loss per time-step bucket")
    return ema


def make_stream(cfg, dataset, rank, world):
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} must divide evenly over {world} processes")
    stream = data.BatchStream(dataset, cfg.batch_size, seed=cfg.seed, flip=cfg.flip)
    return stream.shard(rank, world) if world > 1 else stream


def synthetic_options(dm_config):
    """The built-in data's options held in a DDPM config (a dict); {} for real data. Older checkpoints lack
    fine_loss_time: they were trained on the default data."""
    if dm_config["data"] != "synthetic":
        return {}
    return dict(n_train=dm_config["n_train"], fine_loss_time=dm_config.get("fine_loss_time", DMConfig.fine_loss_time))


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
    dm_cfg = dm_ckpt["config"]
    unet = frozen_eps(unet, dm_cfg, cfg.exact_eps)
    dataset = load_train_split(dm_cfg, rank, world)
    stream = make_stream(cfg, dataset, rank, world)
    sched = diffusion.linear_schedule().to(device)
    model = build_diti(dm_ckpt, cfg).to(device)
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
    return fit(cfg, "diti", model, loss_fn, stream, device, rank, world, resume, extra)


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
