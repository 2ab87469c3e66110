"""Configuration: one dataclass per stage, named presets, every field a flag (`--batch-size 32`).

    cfg, resume, preset = make_config("diti", ["--preset", "quick", "--k", "4"])

Bad values are refused here, in one line (UserError), before any work is done.
"""
import argparse
import os
from dataclasses import dataclass, fields, replace

from synthetic import TEXTURE_REGIONS
from unet import UNetConfig


class UserError(Exception):
    """A problem with the command, its inputs or the machine; shown as one line, exit code 2."""


@dataclass
class DMConfig:
    """Stage 1: DDPM pre-training."""
    data: str = "synthetic"            # synthetic | celeba | folder
    data_dir: str = ""
    image_size: int = 32
    n_train: int = 20000               # synthetic data only
    fine_loss_time: int = 0            # synthetic, beyond the paper (0 = off): fine factors made stronger, lost at ~t
    texture_cell: int = 1              # synthetic, beyond the paper: the texture's checker cell in pixels (1: SPEC's)
    texture_region: str = "object"     # synthetic, beyond the paper: the checker on the object (SPEC's) or the image
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
    partition: str = "uniform"         # uniform | paper | staged | fitted (to the built-in TV curves)
    stages: tuple = (50, 100, 300, 500, 1000)
    stage_dims: tuple = (10, 25, 327, 100, 50)
    mode: str = "base"                 # base | stop_grad
    encoder_grid: int = 1              # beyond the paper (1 = off): E's last map at least this wide (diti.Encoder)
    encoder_heads: bool = False        # beyond the paper: one small encoder per subset, no shared trunk (diti.SubsetEncoders)
    loss_gamma: float = 0.1            # PDAE's gamma in weight_t = SNR_t^gamma / (1 + SNR_t); beyond the paper if not 0.1
    exact_eps: bool = False            # beyond the paper, built-in data only: the frozen eps_theta replaced by the
                                       # exact E[eps | x_t] (synthetic.ExactDenoiser), a perfectly trained DDPM
    open_z_path: bool = False          # beyond the paper: G's ResBlocks start with their last conv not zero, so z
                                       # reaches G's output from step 0 (unet.ShiftDecoder; G is still 0 at step 0)
    position_embedding: bool = False   # beyond the paper: G gets a learned map of where each pixel is (unet.ShiftDecoder)
    t_max: int = 0                     # beyond the paper (0 = off): stage-2 t drawn from {0..t_max-1} only, a probe
                                       # of whether the loss can teach the factors lost below t_max (train_diti)
    encoder_init: str = ""             # beyond the paper, a diagnostic: E starts from this encoder.pt (written by
                                       # gains.py --supervised-encoder, an E that already reads every factor)
    encoder_hold: int = 0              # beyond the paper, a diagnostic: E gets no update for this many steps, so G
                                       # first learns to read the E it starts from (loop.fit's hold)
    encoder_lr_scale: float = 1.0      # beyond the paper (1 = off): E learns at lr x this, G at lr, so G can keep up
                                       # with what E writes (train_diti's optimiser)
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


@dataclass
class DisDiffConfig:
    """The comparison method DisDiff (SPEC §8; disdiff.py) on a frozen DDPM; data and U-Net come from its checkpoint."""
    dm: str = ""                       # path of the stage-1 checkpoint
    factors: int = 6                   # N chunks of z (authors: 6 x 32)
    z_dim: int = 60                    # divisible by factors
    dis_lambda: float = 0.05           # lambda of L_dis
    stabilise: str = "cap"             # none (the authors' form) | clip | cap | clip+cap; measured in disdiff.py
    w_cap: float = 1.0                 # the cap on w for stabilise cap / clip+cap
    batch_size: int = 64
    lr: float = 2.56e-4                # AdamW
    weight_decay: float = 0.01
    warmup: int = 200                  # linear lr warm-up steps (authors: 10k)
    steps: int = 2000
    ema_decay: float = 0.999
    flip: bool = False
    seed: int = 0
    out: str = "runs/disdiff"
    device: str = "auto"
    precision: str = "auto"
    ckpt_every: int = 500


PRESETS = {
    # 16 px, sized for a 2-core CPU: the whole main job (DDPM, three DiTi/PDAE runs, DisDiff, evaluation) in
    # about 20 minutes. A 16-px step of this U-Net costs about a seventh of a 32-px step of the default one; the
    # fine factors stay the first lost (synthetic.py). It shows the pipeline and what such a budget learns; the
    # claim is tested at `claims`. fp32 wherever it runs: at 16 px a step is bound by kernel launches, and bf16
    # autocast ran at 0.72-0.81x of fp32 on an H200 (results/gpu/README.md), 0.07-0.16x on this CPU.
    "quick": dict(dm=dict(image_size=16, base_channels=16, attn_resolutions=(), batch_size=32, lr=1e-3,
                          steps=2000, ema_decay=0.99, ckpt_every=500, sample_steps=20, precision="fp32"),
                  diti=dict(batch_size=32, lr=1e-3, steps=600, ema_decay=0.99, ckpt_every=200, precision="fp32"),
                  # a DisDiff step runs the decoder on B * (N + 1) rows: a smaller batch keeps its cost near DiTi's
                  disdiff=dict(batch_size=8, lr=1e-3, steps=600, warmup=60, ema_decay=0.99, ckpt_every=200,
                               precision="fp32")),
    # The budget for the claim (issue 12; claims.py): the quick U-Net at 16 px, a DDPM and a stage 2 several times
    # longer (SPEC §7.1 saw five of seven factors learned at 2000 DDPM + 4000 stage-2 steps). Sized so that the
    # two rows that matter most, for two seeds, run in about an hour and a half on one core here. fp32 as quick.
    "claims": dict(dm=dict(image_size=16, base_channels=16, attn_resolutions=(), batch_size=32, lr=1e-3,
                           steps=4000, ema_decay=0.995, ckpt_every=500, sample_steps=20, precision="fp32"),
                   diti=dict(batch_size=32, lr=1e-3, steps=4000, ema_decay=0.995, ckpt_every=500, precision="fp32"),
                   disdiff=dict(batch_size=8, lr=1e-3, steps=4000, warmup=200, ema_decay=0.995, ckpt_every=500,
                                precision="fp32")),
    # A few seconds each: what the tests and the smoke run use.
    "tiny": dict(dm=dict(n_train=512, base_channels=16, channel_mult=(1, 2), attn_resolutions=(), batch_size=16,
                         steps=30, ckpt_every=10, sample_steps=5),
                 diti=dict(k=4, z_dim=16, batch_size=16, steps=30, ckpt_every=10),
                 disdiff=dict(factors=4, z_dim=16, batch_size=8, warmup=5, steps=20, ckpt_every=10)),
    # The paper's CelebA-64 scale (SPEC §2-3), for a GPU.
    "celeba64": dict(dm=dict(data="celeba", image_size=64, base_channels=64, channel_mult=(1, 2, 2, 2),
                             num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, batch_size=128, lr=1e-4,
                             steps=300000, ema_decay=0.9999, flip=True, ckpt_every=5000, sample_steps=100),
                     diti=dict(k=64, z_dim=512, partition="paper", batch_size=128, lr=1e-4, steps=300000,
                               ema_decay=0.9999, flip=True, ckpt_every=5000),
                     disdiff=dict(factors=6, z_dim=192, batch_size=128, warmup=10000, steps=300000,
                                  ema_decay=0.9999, flip=True, ckpt_every=5000)),
}
STAGES = {"dm": DMConfig, "diti": DiTiConfig, "disdiff": DisDiffConfig}


# ----------------------------------------------------------------------------------------------------------
# Evaluation (evaluate.py): the sizes of every view, with presets matching PRESETS

@dataclass
class EvalConfig:
    n_probe_train: int = 5000          # train images encoded for the probes
    n_test: int = 2000                 # test images encoded for the probes
    batch_size: int = 256              # images per encoder / decoder pass
    probe_epochs: int = 15             # full-z probe (SPEC §5: 15 epochs, Adam 1e-3, batch 128)
    unit_probe_epochs: int = 5         # one probe per unit (probes.probe_per_unit)
    sparse_l1: float = 0.01            # importance view and DCI (probes.fit_sparse_probe)
    sparse_steps: int = 200
    usage_pairs: int = 3               # pairs per factor and t range for the usage view
    ddim_steps: int = 10               # DDIM steps for inversion and every decode
    edit_pairs: int = 16               # test pairs for reconstruction and edit specificity
    classifier_steps: int = 300        # the factor classifier of the edit view
    cf_pairs: int = 2                  # counterfactual pairs drawn
    cf_alphas: int = 5
    cf_slerp: bool = False             # x_T = slerp(x_T1, x_T2, alpha) instead of x_T1
    manip_factor: str = "hue"
    manip_value: int = 1
    manip_images: int = 2
    manip_scales: tuple = (0.0, 0.25, 0.5, 1.0)
    shots: tuple = (5, 10, 20, 50)     # SPEC §5 few-shot
    few_shot_runs: int = 10
    fine_t: int = 150                  # fine factors: t_f below this
    early_fraction: float = 0.25       # few-shot "early subsets": this first fraction of the units
    learned: float = 0.9               # a factor is learned when its full-z probe (rescaled) reaches this
    ordering_rho: float = 0.8          # "the ordering appears" when Spearman over learned factors reaches this
    seed: int = 0
    device: str = "auto"
    threads: int = 1                   # torch threads on CPU (on a busy 2-core machine, 2 threads made the
                                       # decoder passes 15-50x slower than 1)


EVAL_PRESETS = {
    "quick": dict(),
    "tiny": dict(n_probe_train=400, n_test=200, probe_epochs=3, unit_probe_epochs=2, sparse_steps=40,
                 usage_pairs=2, ddim_steps=3, edit_pairs=6, classifier_steps=20, cf_pairs=1, cf_alphas=3,
                 manip_images=1, manip_scales=(0.0, 1.0), shots=(5, 10), few_shot_runs=2),
    "claims": dict(n_probe_train=20000, n_test=4000, usage_pairs=16, ddim_steps=20, edit_pairs=128,
                   classifier_steps=1500),
    "celeba64": dict(n_probe_train=162770, n_test=19962, usage_pairs=0, ddim_steps=50, edit_pairs=16,
                     classifier_steps=0, manip_factor="Smiling"),
}


def eval_config(preset, **overrides):
    """EvalConfig for a training preset (a preset without its own sizes gets the quick sizes)."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}")
    return replace(EvalConfig(**EVAL_PRESETS.get(preset, {})), **overrides)


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

    def one_line_error(message):                     # argparse would print its usage, then exit 2 itself
        raise UserError(f"{message}: see python train.py {stage} --help")
    parser.error = one_line_error
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
    check_config(cfg)
    return cfg, args.resume, args.preset


COUNTS = ("batch_size", "steps", "ckpt_every", "image_size", "n_train", "base_channels", "num_res_blocks",
          "sample_steps", "k", "z_dim", "factors")


def check_config(cfg):
    """Reject values no run can use before any work is done (later errors would be tracebacks)."""
    for name in COUNTS:
        if getattr(cfg, name, 1) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise UserError(f"unknown --precision '{cfg.precision}': choose auto, fp32 or bf16")
    if not 0 <= cfg.ema_decay <= 1:
        raise UserError(f"--ema-decay must lie in [0, 1], got {cfg.ema_decay}")
    if not 0 <= getattr(cfg, "fine_loss_time", 0) < 1000:
        raise UserError(f"--fine-loss-time must be 0 (off) or a time-step below 1000 (below 150 keeps the fine "
                        f"factors fine), got {cfg.fine_loss_time}")
    if not 1 <= getattr(cfg, "texture_cell", 1) <= 4:
        raise UserError(f"--texture-cell must be 1 (SPEC's 1-pixel checker) to 4 pixels, got {cfg.texture_cell}")
    if getattr(cfg, "texture_region", "object") not in TEXTURE_REGIONS:
        raise UserError(f"--texture-region must be object (SPEC's) or image, got '{cfg.texture_region}'")
    if not 0 <= getattr(cfg, "loss_gamma", 0.1) <= 1:
        raise UserError(f"--loss-gamma must lie in [0, 1] (the paper's is 0.1), got {cfg.loss_gamma}")
    if not 0 <= getattr(cfg, "t_max", 0) <= 1000:
        raise UserError(f"--t-max must be 0 (off: every t) or a time-step in 1..1000, got {cfg.t_max}")
    if getattr(cfg, "encoder_hold", 0) < 0:
        raise UserError(f"--encoder-hold must be a number of steps >= 0 (0 = off), got {cfg.encoder_hold}")
    if not getattr(cfg, "encoder_lr_scale", 1.0) > 0:
        raise UserError(f"--encoder-lr-scale must be > 0 (1 = off; use --encoder-hold to stop E), got {cfg.encoder_lr_scale}")
    if getattr(cfg, "encoder_init", "") and not os.path.isfile(cfg.encoder_init):
        raise UserError(f"--encoder-init {cfg.encoder_init} does not exist: write it with gains.py --supervised-encoder "
                        "STEPS --out DIR (DIR/encoder.pt) or fix the path")
    if hasattr(cfg, "channel_mult"):
        levels = 2 ** (len(cfg.channel_mult) - 1)    # the U-Net halves the image once per extra level
        if not cfg.channel_mult or cfg.image_size % levels:
            raise UserError(f"--image-size {cfg.image_size} must be divisible by {levels} for --channel-mult "
                            f"{','.join(map(str, cfg.channel_mult))}")


def unet_config(cfg):
    return UNetConfig(image_size=cfg.image_size, base_channels=cfg.base_channels, channel_mult=cfg.channel_mult,
                      num_res_blocks=cfg.num_res_blocks, attn_resolutions=cfg.attn_resolutions, dropout=cfg.dropout)
