"""DisDiff (Yang et al., NeurIPS 2023), the comparison method of SPEC §8, on the same frozen pixel-space DDPM
as DiTi (the authors' first-stage decoder is the identity here).

z = E(x_0) is cut into N equal chunks, the factors. One shift decoder G, shared by the factors, runs once per
factor k with condition z_k and a factor embedding added to its time embedding; the N shifts add up to the
PDAE shift. A disentangling loss asks that moving x_0 by G_c changes chunk c of the re-encoded image most.

    python train.py disdiff --preset quick --dm runs/quick/dm/ckpt.pt --out runs/quick/disdiff
    python train.py disdiff ... --stabilise none      # the authors' form: x_0 unclipped, w uncapped

The hazard (SPEC §8) and the default. x0_c - x0_hat = (1 - abar_t) / sqrt(abar_t) G_c, so the authors' weight is
w = (1 - abar_t)^2 / abar_t mean(G_c^2), 2.5e4 mean(G_c^2) at t = 999. Measured (tiny DDPM at 400 steps, N = 6,
d = 24, batch 8, 500 steps, fp32; hazard_by_t.json of each run): with `none`, w at t >= 900 averaged 190-240
(max 611) and L_dis there 35-43 (max 110), a hundred times L_r; the loss was L_dis, and L_r stalled (0.30 over
steps 401-500, held-out L1 at t >= 650: 0.21). `clip` (re-encode x_0 clipped to [-1, 1]; w <= 4) and `cap`
(w <= w_cap = 1) were both stable, with L_r equal to a lambda = 0 run (0.165 over steps 401-500, held-out 0.085).
Clipping also shrinks w where x_0 is saturated: L_dis fell to ~1% of the loss (w <= 0.04), near-PDAE; `cap`
keeps the authors' form wherever w <= 1 (t < ~600 there) and L_dis live (~0.08, a third of L_r). Default: cap.

Evaluation sees a DisDiff model as any other representation: `encode(x0)` -> z and `units`, one index array
per factor.
"""
import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import checkpoint
import config
import loop
import runtime
from diffusion import at, ddim_invert, ddim_sample, linear_schedule, pdae_weight, predict_x0, q_sample, shift_coef
from diti import Encoder
from unet import ShiftDecoder

STABILISE = ("none", "clip", "cap", "clip+cap")   # none = the authors' form (SPEC §8 hazards)


class DisDiff(nn.Module):
    """The trainable parts: encoder E (x_0 -> z, d = N * width), the shared shift decoder G (condition: one
    chunk of width d / N) and the factor embedding k -> Linear(Embedding(N)(k)). The frozen U-Net is passed in,
    not held, so checkpoints hold only what this stage learns."""

    def __init__(self, unet_cfg, z_dim, factors=6, encoder_size=None):
        super().__init__()
        if factors < 1 or z_dim % factors:
            raise ValueError(f"z_dim={z_dim} cannot be cut into {factors} equal factors: choose a z_dim divisible "
                             f"by --factors (e.g. {factors * max(1, z_dim // factors)})")
        emb_dim = 4 * unet_cfg.base_channels
        self.factors, self.width = factors, z_dim // factors
        self.encoder = Encoder(encoder_size or unet_cfg.image_size, z_dim, unet_cfg.in_channels)
        self.decoder = ShiftDecoder(unet_cfg, self.width)
        self.factor_embed = nn.Sequential(nn.Embedding(factors, emb_dim), nn.Linear(emb_dim, emb_dim))

    @property
    def units(self):
        """The N factors as index arrays into z: factor k is dims [k * width, (k + 1) * width)."""
        return [np.arange(k * self.width, (k + 1) * self.width) for k in range(self.factors)]

    def encode(self, x0):
        return self.encoder(x0)                                     # (B, d)

    def chunks(self, z):
        return z.unflatten(1, (self.factors, self.width))           # (B, d) -> (B, N, width)

    @torch.no_grad()
    def factor_swap(self, unet, sched, x0_a, x0_b, k, steps=50):
        """SPEC §8 editing: A with factor k (an int or a list of factors) taken from the donor B. x_T is A's DDIM
        inversion under A's own shift; decoding uses the sum of G_k over factors with the swapped z.
        Returns images (B, C, H, W) in [-1, 1]."""
        z_a, z_b = self.chunks(self.encode(x0_a)), self.chunks(self.encode(x0_b))
        z = z_a.clone()
        z[:, k] = z_b[:, k]
        x_T = ddim_invert(disdiff_eps_fn(unet, self, z_a.flatten(1)), sched, x0_a, steps)
        return ddim_sample(disdiff_eps_fn(unet, self, z.flatten(1)), sched, x_T, steps)


# ----------------------------------------------------------------------------------------------------------
# The N factor shifts in one decoder pass

def shift_rows(model, feats, z_rows, factor_rows, sample_rows):
    """G(x_t, t, z_k, k) for R rows at once: row r reads the frozen features of sample sample_rows[r], the
    condition z_rows[r] (R, width) and factor factor_rows[r]; temb_k = temb(t) + Linear(Embedding(N)(k)).
    Returns (R, C, H, W)."""
    h, skips, emb = feats
    pick = lambda a: a.index_select(0, sample_rows)                  # repeat the shared frozen features
    return model.decoder((pick(h), [pick(s) for s in skips], pick(emb)), z_rows,
                         emb_offset=model.factor_embed(factor_rows))


def factor_shifts(model, feats, z):
    """Every G_k = G(x_t, t, z_k, k), as one decoder pass of B * N rows (sample-major). Returns (B, N, C, H, W)."""
    B, N = z.shape[0], model.factors
    samples = torch.arange(B, device=z.device).repeat_interleave(N)
    factors = torch.arange(N, device=z.device).repeat(B)
    G = shift_rows(model, feats, model.chunks(z).flatten(0, 1), factors, samples)
    return G.unflatten(0, (B, N))


def shifts_and_chosen(model, feats, z, c):
    """One decoder pass of B * N + B rows: every G_k with z (for L_r, trains E and G), then G_c with sg(z_c)
    for the chosen factor c (B,) (for L_dis, which trains G only). Returns (B, N, C, H, W), (B, C, H, W)."""
    B, N = z.shape[0], model.factors
    arange = torch.arange(B, device=z.device)
    zk = model.chunks(z)                                             # (B, N, width)
    samples = torch.cat([arange.repeat_interleave(N), arange])
    factors = torch.cat([torch.arange(N, device=z.device).repeat(B), c])
    rows = torch.cat([zk.flatten(0, 1), zk.detach()[arange, c]])
    G = shift_rows(model, feats, rows, factors, samples)
    return G[:B * N].unflatten(0, (B, N)), G[B * N:]


def disdiff_eps_fn(unet, model, z):
    """eps_fn for the DDIM loops of diffusion.py: (eps_theta(x, t), sum_k G(x, t, z_k, k))."""
    def eps_fn(x, t):
        feats = unet.encode(x, t)
        return unet.decode(feats).float(), factor_shifts(model, feats, z).sum(1).float()
    return eps_fn


# ----------------------------------------------------------------------------------------------------------
# The losses

def reconstruction_loss(sched, t, eps, eps_theta, G):
    """SPEC §8: L_r = mean | eps - (eps_theta + shift_t sum_k G_k) | (L1, no time weight). Returns (B,)."""
    shift = shift_coef(sched, t).view(-1, 1, 1, 1)
    pred = eps_theta.float() + shift * G.float().sum(1)
    return (eps - pred).abs().flatten(1).mean(1)


def frozen_encode(encoder, x):
    """E_bar(x): the encoder with detached weights (gradient reaches x, never E's parameters)."""
    params = {name: p.detach() for name, p in encoder.named_parameters()}
    return functional_call(encoder, {**params, **dict(encoder.named_buffers())}, (x,))


def disentangle_loss(model, sched, x_t, t, eps_theta, G_c, z, c, dis_lambda=0.05, stabilise="cap", w_cap=1.0):
    """SPEC §8 L_dis for the chosen factors c (B,), given G_c = G(x_t, t, sg(z_c), c) and z (B, d).
    Returns (L_dis (B,), w (B,) as used, w_raw (B,) of the authors' form)."""
    if stabilise not in STABILISE:
        raise ValueError(f"unknown stabilise '{stabilise}': choose one of {', '.join(STABILISE)}")
    eps_theta, G_c, z = eps_theta.float(), G_c.float(), z.detach()
    # x0_hat = x0 from eps_theta; x0_c = x0 from eps_theta - sqrt(1 - abar_t) G_c (the sampling coefficient, §4)
    x0_hat = predict_x0(sched, x_t, t, eps_theta)
    x0_c = predict_x0(sched, x_t, t, eps_theta - (1 - at(sched.abar, t, x_t)).sqrt() * G_c)
    w_raw = (x0_hat - x0_c).detach().pow(2).flatten(1).mean(1)
    if "clip" in stabilise:                                          # option: re-encode only images in [-1, 1]
        x0_hat, x0_c = x0_hat.clamp(-1, 1), x0_c.clamp(-1, 1)
    # w = mean((x0_hat - x0_c)^2), no gradient
    w = (x0_hat - x0_c).detach().pow(2).flatten(1).mean(1)
    if "cap" in stabilise:                                           # option: w <= w_cap
        w = w.clamp(max=w_cap)
    with torch.no_grad():
        z_hat = model.chunks(frozen_encode(model.encoder, x0_hat).float())    # (B, N, width)
    z_c = model.chunks(frozen_encode(model.encoder, x0_c).float())           # gradient to x0_c only
    zk = model.chunks(z)
    a = (z_hat - zk).norm(dim=-1)                                    # a_k = ||z_hat_k - sg(z_k)||   (B, N)
    b = (z_c - zk).norm(dim=-1)                                      # b_k = ||z_c_k - sg(z_k)||
    d = (z_hat - z_c).norm(dim=-1)                                   # d_k = ||z_hat_k - z_c_k||
    # L_dis = w lambda (CE(a - b, c) + CE(d, c)), cross-entropy over the N factors on the raw distances
    ce = F.cross_entropy(a - b, c, reduction="none") + F.cross_entropy(d, c, reduction="none")
    return w * dis_lambda * ce, w, w_raw


def disdiff_loss(model, unet, sched, x0, dis_lambda=0.05, stabilise="cap", w_cap=1.0, t=None, eps=None, c=None):
    """SPEC §8: L = L_r + mean L_dis, with t uniform, c ~ U{0..N-1} per sample. The frozen eps_theta runs once.
    Returns (loss, per-sample loss (B,), t (B,), parts) with parts = dict of per-sample recon, dis, w, w_raw."""
    B = x0.shape[0]
    t = torch.randint(0, sched.T, (B,), device=x0.device) if t is None else t
    eps = torch.randn_like(x0) if eps is None else eps
    c = torch.randint(0, model.factors, (B,), device=x0.device) if c is None else c
    x_t = q_sample(sched, x0, t, eps)
    z = model.encode(x0)                                             # (B, d)
    with torch.no_grad():
        feats = unet.encode(x_t, t)
        eps_theta = unet.decode(feats)
    G, G_c = shifts_and_chosen(model, feats, z, c)
    recon = reconstruction_loss(sched, t, eps, eps_theta, G)
    dis, w, w_raw = disentangle_loss(model, sched, x_t, t, eps_theta, G_c, z, c, dis_lambda, stabilise, w_cap)
    per_sample = recon + dis
    parts = dict(recon=recon.detach(), dis=dis.detach(), w=w, w_raw=w_raw)
    return per_sample.mean(), per_sample.detach(), t, parts


def disdiff_step(model, unet, sched, x0):
    """The loss of one DisDiff training step with the default options (for timing; call .backward() on it)."""
    return disdiff_loss(model, unet, sched, x0)[0]


# ----------------------------------------------------------------------------------------------------------
# Hazard monitor: how large w and L_dis get per time-step bucket (SPEC §8)

class HazardByTime:
    """Mean and max of per-sample quantities (recon, dis, w, w_raw) in `buckets` bins of t, over a run."""

    KEYS = ("recon", "dis", "w", "w_raw")

    def __init__(self, T=1000, buckets=10):
        self.T, self.buckets = T, buckets
        self.count = np.zeros(buckets)
        self.sum = {k: np.zeros(buckets) for k in self.KEYS}
        self.max = {k: np.zeros(buckets) for k in self.KEYS}

    def add(self, t, parts):
        b = (t.cpu().numpy() * self.buckets // self.T).astype(int)
        np.add.at(self.count, b, 1)
        for k in self.KEYS:
            v = parts[k].detach().float().cpu().numpy()
            np.add.at(self.sum[k], b, v)
            np.maximum.at(self.max[k], b, v)

    def rows(self):
        width = self.T // self.buckets
        return [dict(t=[i * width, (i + 1) * width - 1], n=int(self.count[i]),
                     **{f"{k}_mean": float(self.sum[k][i] / max(self.count[i], 1)) for k in self.KEYS},
                     **{f"{k}_max": float(self.max[k][i]) for k in self.KEYS}) for i in range(self.buckets)]

    def table(self):
        lines = [f"{'t':>9} {'n':>5} {'L_r':>7} {'L_dis mean':>11} {'L_dis max':>10} {'w mean':>10} {'w max':>10} "
                 f"{'w_raw max':>10}"]
        for r in self.rows():
            lines.append(f"{r['t'][0]:>4}-{r['t'][1]:<4} {r['n']:>5} {r['recon_mean']:>7.4f} {r['dis_mean']:>11.4g} "
                         f"{r['dis_max']:>10.4g} {r['w_mean']:>10.4g} {r['w_max']:>10.4g} {r['w_raw_max']:>10.4g}")
        return "\n".join(lines)

    def save(self, path):
        with open(path, "w") as f:
            json.dump(self.rows(), f, indent=1)
        return path


# ----------------------------------------------------------------------------------------------------------
# The training stage (registered in train.py as `python train.py disdiff`)

def build_disdiff(dm_ckpt, cfg):
    """The trainable E, G and factor embedding for a DisDiffConfig, on the DDPM checkpoint's U-Net."""
    import train
    try:
        return DisDiff(train.build_unet(dm_ckpt).cfg, cfg.z_dim, cfg.factors)
    except ValueError as e:
        raise config.UserError(str(e))


def warmup_lr(cfg):
    """AdamW learning rate at a step: linear warm-up over cfg.warmup steps, then constant (authors: 10k)."""
    return lambda step: cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))


def train_disdiff(cfg, resume=False):
    import train
    device = runtime.pick_device(cfg.device)
    rank, world = runtime.dist_setup(cfg.device)
    train.seed_everything(cfg.seed + rank)
    if cfg.stabilise not in STABILISE:
        raise config.UserError(f"unknown --stabilise '{cfg.stabilise}': choose one of {', '.join(STABILISE)}")
    if not cfg.dm:
        raise config.UserError("DisDiff needs the frozen DDPM: pass --dm <path of the stage-1 ckpt.pt>")
    unet, dm_ckpt = train.load_frozen_unet(cfg.dm, device)
    train.check_encoder_size(dm_ckpt, cfg.dm)
    dm_cfg = dm_ckpt["config"]
    dataset = train.load_train_split(dm_cfg, rank, world)
    stream = loop.make_stream(cfg, dataset, rank, world)
    sched = linear_schedule().to(device)
    model = build_disdiff(dm_ckpt, cfg).to(device)
    hazard = HazardByTime(sched.T)
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        print(f"DisDiff: {cfg.factors} factors x {model.width} dims, stabilise={cfg.stabilise}, "
              f"{n / 1e6:.2f}M trainable parameters, frozen DDPM {cfg.dm}, device {device}, out {cfg.out}")

    def loss_fn(model, x0, t, eps):
        loss, per_sample, t, parts = disdiff_loss(model, unet, sched, x0, cfg.dis_lambda, cfg.stabilise, cfg.w_cap,
                                                  t=t, eps=eps)
        hazard.add(t, parts)
        return loss, per_sample, t, dict(L_r=parts["recon"].mean().item(), L_dis=parts["dis"].mean().item(),
                                         w_max=parts["w"].max().item())

    extra = dict(dm_path=os.path.abspath(cfg.dm), dm_config=dm_cfg, unet=dm_ckpt["unet"])
    make_opt = lambda params: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    try:
        return loop.fit(cfg, "disdiff", model, loss_fn, stream, device, rank, world, resume, extra,
                        make_opt=make_opt, lr_at=warmup_lr(cfg))
    finally:                                  # also when the loss blew up: that is when the table matters
        if rank == 0 and hazard.count.sum() > 0:
            os.makedirs(cfg.out, exist_ok=True)
            path = hazard.save(os.path.join(cfg.out, "hazard_by_t.json"))
            print(f"w and L_dis per time-step bucket (this invocation's steps; {path}):\n{hazard.table()}")


def disdiff_decoder(model, unet, sched):
    """editing.Decoder for a DisDiff model: the shift is sum_k G(x_t, t, z_k, k), read at every t (mask all
    ones). weighted_losses is DiTi's weighted loss (SPEC §2) with that shift, so decoder-usage views compare
    across methods (DisDiff itself trains with the unweighted L1 of SPEC §8)."""
    import editing

    @torch.no_grad()
    def weighted_losses(x0, eps, t, zs):
        S, B = zs.shape[:2]                                          # S codes (S, B, d) per sample
        h, skips, emb = unet.encode(q_sample(sched, x0, t, eps), t)
        eps_theta = unet.decode((h, skips, emb))
        rep = lambda a: a.repeat(S, *([1] * (a.dim() - 1)))         # (B, ...) -> (S * B, ...)
        G = factor_shifts(model, (rep(h), [rep(s) for s in skips], rep(emb)), zs.reshape(S * B, -1)).sum(1)
        t_all = t.repeat(S)
        pred = rep(eps_theta) + shift_coef(sched, t_all).view(-1, 1, 1, 1) * G
        return (pdae_weight(sched, t_all) * (rep(eps) - pred).pow(2).flatten(1).mean(1)).view(S, B)

    d = model.factors * model.width
    return editing.Decoder(eps_fn=lambda z: disdiff_eps_fn(unet, model, z), weighted_losses=weighted_losses,
                           mask=lambda t: torch.ones(len(t), d, device=t.device), sched=sched,
                           plain_eps_fn=lambda x, t: (unet(x, t), None))


def representation(path, device, name):
    """A DisDiff checkpoint as a representation.Representation: encode, the N factors as units, and a decoder. The
    factors are not meant for time-steps; each gets a uniform t range (as PDAE's chunks do) only so that the
    usage view can stratify t the same way for every method."""
    from diti import uniform_partition
    from representation import Representation
    model, unet, ckpt = load_disdiff(path, device)
    part = uniform_partition(model.factors * model.width, model.factors)      # the same units as model.units
    cfg, dm = ckpt["config"], ckpt["dm_config"]
    info = dict(checkpoint=path, kind="disdiff", mode=f"disdiff, stabilise {cfg['stabilise']}", k=model.factors,
                d=part.d, steps=ckpt["step"], batch_size=cfg["batch_size"], lr=cfg["lr"], dm_steps=dm["steps"],
                dm_batch_size=dm["batch_size"], units=model.factors, dm_config=dm)
    for key, file in (("loss_by_t_png", "loss_by_t.png"), ("hazard_by_t_json", "hazard_by_t.json")):
        if os.path.isfile(os.path.join(os.path.dirname(path), file)):
            info[key] = os.path.join(os.path.dirname(path), file)
    t_ranges = [part.t_range(i) for i in range(part.k)]
    sched = linear_schedule().to(device)
    return Representation(name, model.encode, model.units, t_ranges, disdiff_decoder(model, unet, sched), info)


def load_disdiff(path, device="cpu"):
    """(EMA DisDiff model, frozen U-Net, checkpoint) from a `train.py disdiff` checkpoint."""
    import train
    ckpt = checkpoint.load_checkpoint(path, kind="disdiff")
    cfg = config.DisDiffConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items()})
    model = build_disdiff(ckpt, cfg)
    model.load_state_dict(ckpt["ema"])
    unet, _ = train.load_frozen_unet(ckpt["dm_path"], device)
    return model.to(device).eval(), unet, ckpt
