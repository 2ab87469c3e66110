"""Training. Stage 1 pre-trains the DDPM; stage 2 trains DiTi's encoder and shift decoder against it (frozen).

    python train.py dm    --preset quick --out runs/quick/dm
    python train.py diti  --preset quick --dm runs/quick/dm/ckpt.pt --k 8 --mode base --out runs/quick/diti
    python train.py diti  --preset quick --dm runs/quick/dm/ckpt.pt --k 1 --out runs/quick/pdae   # PDAE

Every config field is a flag (`--batch-size 32`); presets set many at once. Runs resume with --resume.
Works under `torchrun --nproc_per_node N train.py ...` (gloo on CPU, nccl on CUDA); the global batch stays
the configured batch.
"""
import argparse
import copy
import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import diffusion
from diti import DiTi, diti_loss, make_partition
from plots import bar_plot, save_grid
from unet import UNet, UNetConfig


class UserError(Exception):
    """A problem with the command, its inputs or the machine; shown as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------------
# Configuration: one dataclass per stage, named presets, every field a flag

@dataclass
class DMConfig:
    """Stage 1: DDPM pre-training."""
    data: str = "synthetic"            # synthetic | celeba | folder
    data_dir: str = ""
    image_size: int = 32
    n_train: int = 20000               # synthetic data only
    base_channels: int = 32
    channel_mult: tuple = (1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple = (8,)
    dropout: float = 0.0
    batch_size: int = 64
    lr: float = 2e-4
    steps: int = 3000
    ema_decay: float = 0.999
    flip: bool = False
    seed: int = 0
    out: str = "runs/dm"
    device: str = "auto"               # auto | cpu | cuda | mps
    precision: str = "auto"            # auto | fp32 | bf16
    ckpt_every: int = 500
    sample_steps: int = 50             # DDIM steps for the sample grid at the end


@dataclass
class DiTiConfig:
    """Stage 2: DiTi (and PDAE, k = 1) on a frozen DDPM; data and U-Net come from the DDPM checkpoint."""
    dm: str = ""                       # path of the stage-1 checkpoint
    k: int = 8
    z_dim: int = 64
    partition: str = "uniform"         # uniform | paper | staged
    stages: tuple = (50, 100, 300, 500, 1000)
    stage_dims: tuple = (10, 25, 327, 100, 50)
    mode: str = "base"                 # base | stop_grad
    batch_size: int = 64
    lr: float = 1e-4
    steps: int = 2000
    ema_decay: float = 0.999
    flip: bool = False
    seed: int = 0
    out: str = "runs/diti"
    device: str = "auto"
    precision: str = "auto"
    ckpt_every: int = 500


PRESETS = {
    # 32 px, sized for a 2-core CPU: a usable DDPM and a DiTi model in a few minutes each.
    "quick": dict(dm=dict(), diti=dict()),
    # A few seconds each: what the tests and the smoke run use.
    "tiny": dict(dm=dict(n_train=512, base_channels=16, channel_mult=(1, 2), attn_resolutions=(), batch_size=16,
                         steps=30, ckpt_every=10, sample_steps=5),
                 diti=dict(k=4, z_dim=16, batch_size=16, steps=30, ckpt_every=10)),
    # The paper's CelebA-64 scale (SPEC §2-3), for a GPU.
    "celeba64": dict(dm=dict(data="celeba", image_size=64, base_channels=64, channel_mult=(1, 2, 2, 2),
                             num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, batch_size=128, lr=1e-4,
                             steps=300000, ema_decay=0.9999, flip=True, ckpt_every=5000, sample_steps=100),
                     diti=dict(k=64, z_dim=512, partition="paper", batch_size=128, lr=1e-4, steps=300000,
                               ema_decay=0.9999, flip=True, ckpt_every=5000)),
}
STAGES = {"dm": DMConfig, "diti": DiTiConfig}


def parse_value(text, default, name):
    """Read a flag's text as the type of the field's default."""
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if isinstance(default, tuple):
            return tuple(int(v) for v in text.split(",") if v.strip())
        return type(default)(text)
    except ValueError:
        raise UserError(f"--{name.replace('_', '-')} {text!r} is not a valid {type(default).__name__}")


def make_config(stage, argv):
    """Build a stage's config: defaults, then the preset, then each --flag."""
    cls = STAGES[stage]
    parser = argparse.ArgumentParser(prog=f"train.py {stage}", description=cls.__doc__)
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    for f in fields(cls):
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None)
    args = parser.parse_args(argv)
    if args.preset not in PRESETS:
        raise UserError(f"unknown preset '{args.preset}': choose one of {', '.join(PRESETS)}")
    cfg = cls(**PRESETS[args.preset].get(stage, {}))
    for f in fields(cls):
        text = getattr(args, f.name)
        if text is not None:
            setattr(cfg, f.name, parse_value(text, getattr(cfg, f.name), f.name))
    return cfg, args.resume, args.preset


def unet_config(cfg):
    return UNetConfig(image_size=cfg.image_size, base_channels=cfg.base_channels, channel_mult=cfg.channel_mult,
                      num_res_blocks=cfg.num_res_blocks, attn_resolutions=cfg.attn_resolutions, dropout=cfg.dropout)


# ----------------------------------------------------------------------------------------------------------
# Device, precision, distributed

def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but this machine has no CUDA GPU: use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps was asked for but MPS is not available: use --device cpu or auto")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise UserError(f"unknown device '{name}': choose auto, cpu, cuda or mps")
    return torch.device(name)


def autocast(device, precision):
    """bf16 autocast where asked for ('auto' = bf16 on CUDA and CPU, fp32 on MPS); a no-op for fp32."""
    if precision not in ("auto", "fp32", "bf16"):
        raise UserError(f"unknown precision '{precision}': choose auto, fp32 or bf16")
    use = precision == "bf16" or (precision == "auto" and device.type in ("cuda", "cpu"))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use)


def dist_setup(device_name):
    """(rank, world). Under torchrun, joins the process group (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and device_name != "cpu" else "gloo"
        dist.init_process_group(backend)
    return (dist.get_rank() if world > 1 else 0), world


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: atomic, weights_only loadable, holding everything an exact resume needs

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
        raise UserError(f"{path} is a '{ckpt['kind']}' checkpoint but a '{kind}' one is needed here "
                        f"(stage 2 takes the DDPM checkpoint from `train.py dm` as --dm)")
    return ckpt


def rng_state(stream):
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = dict(torch=torch.get_rng_state(), numpy=[keys.tolist(), pos, has_gauss, cached],
                 python=list(random.getstate()[1]), data=stream.state_dict())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, stream):
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate((3, tuple(state["python"]), None))
    stream.load_state_dict(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def build_diti(dm_ckpt, cfg):
    """The trainable E and G for a stage-2 config, on the DDPM checkpoint's U-Net."""
    unet_cfg = build_unet(dm_ckpt).cfg
    try:
        part = make_partition(cfg.partition, cfg.z_dim, cfg.k, cfg.stages, cfg.stage_dims)
    except ValueError as e:
        raise UserError(str(e))
    return DiTi(unet_cfg, part)


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


@torch.no_grad()
def ema_update(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def fit(cfg, kind, model, loss_fn, stream, device, rank, world, resume, extra):
    """Adam + EMA + atomic checkpoints + exact resume. loss_fn(batch) -> (loss, per_sample, t, logs).
    `extra` goes into every checkpoint (configs, the frozen model's path). Returns the EMA model."""
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    ema = copy.deepcopy(model).requires_grad_(False)
    hist, start, log = LossByTime(), 0, []
    if resume and os.path.exists(ckpt_path):
        ck = load_checkpoint(ckpt_path, kind=kind)
        model.load_state_dict(ck["model"]), ema.load_state_dict(ck["ema"]), opt.load_state_dict(ck["opt"])
        start, log = ck["step"], ck["log"]
        hist.sum, hist.count = ck["hist"]
        set_rng_state(ck["rng"][rank] if isinstance(ck["rng"], list) else ck["rng"], stream)
        if rank == 0:
            print(f"resumed {ckpt_path} at step {start}")
    elif os.path.exists(ckpt_path) and not resume:
        raise UserError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out")
    trained = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    def checkpoint(step):
        rng = rng_state(stream)
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, rng)
            rng = gathered
        if rank == 0:
            save_checkpoint(ckpt_path, dict(kind=kind, step=step, model=model.state_dict(), ema=ema.state_dict(),
                                            opt=opt.state_dict(), log=log, hist=(hist.sum, hist.count), rng=rng,
                                            config=asdict(cfg), **extra))

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=kind, disable=rank != 0,
               dynamic_ncols=True)
    tick = time.time()
    for step in bar:
        x0 = next(stream).to(device, non_blocking=True)
        with autocast(device, cfg.precision):
            loss, per_sample, t, logs = loss_fn(trained, x0)
        if not torch.isfinite(loss):
            raise UserError(f"the {kind} loss became {loss.item()} at step {step + 1}: stopped; the last good "
                            f"checkpoint {ckpt_path} is intact (lower --lr or use --precision fp32, then --resume)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, model, cfg.ema_decay)
        hist.add(per_sample, t)
        log.append(dict(step=step + 1, loss=loss.item(), **logs))
        if rank == 0 and (step + 1) % 10 == 0:
            rate = 10 * cfg.batch_size / (time.time() - tick)
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.0f}")
            tick = time.time()
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
            checkpoint(step + 1)
    if rank == 0 and cfg.steps > start:
        hist.save_png(os.path.join(cfg.out, "loss_by_t.png"), f"{kind}: loss per time-step bucket")
        with open(os.path.join(cfg.out, "log.json"), "w") as f:
            json.dump(log, f)
    return ema


def make_stream(cfg, dataset, rank, world):
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} must divide evenly over {world} processes")
    stream = data.BatchStream(dataset, cfg.batch_size, seed=cfg.seed, flip=cfg.flip)
    return stream.shard(rank, world) if world > 1 else stream


def load_train_split(name, data_dir, size, seed, n_train):
    kw = dict(n_train=n_train) if name == "synthetic" else {}
    return data.load_data(name, data_dir or None, size=size, seed=seed, **kw)["train"]


# ----------------------------------------------------------------------------------------------------------
# Stage 1: the DDPM

def train_dm(cfg, resume=False):
    device = pick_device(cfg.device)
    rank, world = dist_setup(cfg.device)
    seed_everything(cfg.seed + rank)
    dataset = load_train_split(cfg.data, cfg.data_dir, cfg.image_size, cfg.seed, cfg.n_train)
    stream = make_stream(cfg, dataset, rank, world)
    sched = diffusion.linear_schedule().to(device)
    unet_cfg = unet_config(cfg)
    unet = UNet(unet_cfg).to(device)
    if rank == 0:
        n = sum(p.numel() for p in unet.parameters())
        print(f"DDPM: {n / 1e6:.2f}M parameters, {len(dataset)} images, device {device}, out {cfg.out}")

    def loss_fn(model, x0):
        t = torch.randint(0, sched.T, (x0.shape[0],), device=device)
        eps = torch.randn_like(x0)
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
    dataset = load_train_split(dm_cfg["data"], dm_cfg["data_dir"], dm_cfg["image_size"], dm_cfg["seed"],
                               dm_cfg["n_train"])
    stream = make_stream(cfg, dataset, rank, world)
    sched = diffusion.linear_schedule().to(device)
    model = build_diti(dm_ckpt, cfg).to(device)
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        print(f"DiTi: k={cfg.k} d={cfg.z_dim} mode={cfg.mode}, {n / 1e6:.2f}M trainable parameters, "
              f"frozen DDPM {cfg.dm}, device {device}, out {cfg.out}")

    def loss_fn(trained, x0):
        loss, per_sample, t = diti_loss(getattr(trained, "module", trained), unet, sched, x0, cfg.mode)
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
    return model.to(device).eval(), unet, ckpt


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in STAGES:
        raise UserError(f"say which stage to train: python train.py {{{'|'.join(STAGES)}}} [--preset ...] [--flags]")
    cfg, resume, _ = make_config(argv[0], argv[1:])
    {"dm": train_dm, "diti": train_diti}[argv[0]](cfg, resume)


if __name__ == "__main__":
    try:
        main()
    except (UserError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact (continue with --resume)", file=sys.stderr)
        sys.exit(130)
