"""The diffusion process (SPEC §1, §2, §4): schedule, forward noising, DDPM loss, DDIM and ancestral samplers.

Everything here is a plain function of a `Schedule` (arrays indexed by t) and tensors. Time-steps t are
integers in {0..T-1}; images x_0 live in [-1, 1].
"""
from dataclasses import dataclass

import torch
from tqdm import tqdm


@dataclass
class Schedule:
    """Per-time-step arrays, computed in float64 and stored as float32 (each of shape (T,))."""
    betas: torch.Tensor
    alphas: torch.Tensor
    abar: torch.Tensor          # abar_t = prod_{s<=t} alpha_s
    abar_prev: torch.Tensor     # abar_{t-1}, with abar_{-1} := 1
    snr: torch.Tensor           # SNR_t = abar_t / (1 - abar_t)

    @property
    def T(self):
        return len(self.betas)

    def to(self, device):
        return Schedule(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def linear_schedule(T=1000, beta_start=1e-4, beta_end=0.02):
    """SPEC §1: beta_t linear from 1e-4 to 0.02; alpha_t = 1 - beta_t; abar_t = prod_{s<=t} alpha_s."""
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    alphas = 1.0 - betas
    abar = torch.cumprod(alphas, dim=0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    snr = abar / (1.0 - abar)
    return Schedule(*(a.float() for a in (betas, alphas, abar, abar_prev, snr)))


def at(values, t, x):
    """values[t] reshaped to broadcast against x: (B,) -> (B, 1, 1, 1)."""
    return values.to(x.device)[t].reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def q_sample(sched, x0, t, eps):
    """SPEC §1 forward process: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    abar = at(sched.abar, t, x0)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps


def ddpm_loss(model, sched, x0):
    """SPEC §1 stage-1 loss: || eps - eps_theta(x_t, t) ||^2 with t uniform on {0..T-1}."""
    t = torch.randint(0, sched.T, (x0.shape[0],), device=x0.device)
    eps = torch.randn_like(x0)
    return (eps - model(q_sample(sched, x0, t, eps), t)).pow(2).mean()


def pdae_weight(sched, t, gamma=0.1):
    """SPEC §2 PDAE weighting: weight_t = SNR_t^gamma / (1 + SNR_t); the paper's gamma is 0.1. A larger gamma
    moves weight to small t (gamma = 1 gives abar_t). Returns (B,)."""
    snr = sched.snr.to(t.device)[t]
    return snr ** gamma / (1 + snr)


def shift_coef(sched, t):
    """SPEC §2 training shift: shift_t = -sqrt(alpha_t) (1 - abar_{t-1}) / sqrt(1 - abar_t). Returns (B,)."""
    s = sched.to(t.device)
    return -s.alphas[t].sqrt() * (1 - s.abar_prev[t]) / (1 - s.abar[t]).sqrt()


def predict_x0(sched, x, t, eps):
    """Invert the forward process: x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    abar = at(sched.abar, t, x)
    return (x - (1 - abar).sqrt() * eps) / abar.sqrt()


def ddim_step(sched, x, t, t_next, eps, shift=None):
    """SPEC §4: one deterministic DDIM move from t to t_next (either direction; t_next = -1 means x_0).

    With a shift G: eps_hat = eps - sqrt(1 - abar_t) G. Then
    x0_hat = clip((x - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t), -1, 1),
    eps_tilde = (x / sqrt(abar_t) - x0_hat) / sqrt(1 / abar_t - 1),
    x_next = sqrt(abar_next) x0_hat + sqrt(1 - abar_next) eps_tilde.
    """
    abar = at(sched.abar, t, x)
    if shift is not None:
        eps = eps - (1 - abar).sqrt() * shift
    x0 = predict_x0(sched, x, t, eps).clamp(-1, 1)
    eps_tilde = (x / abar.sqrt() - x0) / (1 / abar - 1).sqrt()
    abar_next = at(torch.cat([sched.abar, sched.abar.new_ones(1)]), t_next, x)  # index -1 -> abar_{-1} = 1
    return abar_next.sqrt() * x0 + (1 - abar_next).sqrt() * eps_tilde


def ddim_timesteps(T, steps):
    """`steps` evenly spaced time-steps from 0 to T-1, ascending (e.g. T=1000, steps=4 -> 0, 333, 666, 999)."""
    return torch.linspace(0, T - 1, steps).round().long().tolist()


def _batch_t(t, x):
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


@torch.no_grad()
def ddim_sample(eps_fn, sched, x_T, steps=50, progress=False):
    """DDIM decoding from x_T down to x_0. eps_fn(x, t) -> (eps, shift or None)."""
    ts = ddim_timesteps(sched.T, steps)
    x = x_T
    for i in tqdm(range(len(ts) - 1, -1, -1), desc="ddim sample", disable=not progress, leave=False):
        t_next = ts[i - 1] if i > 0 else -1
        eps, shift = eps_fn(x, _batch_t(ts[i], x))
        x = ddim_step(sched, x, _batch_t(ts[i], x), _batch_t(t_next, x), eps, shift)
    return x


@torch.no_grad()
def ddim_invert(eps_fn, sched, x0, steps=50, progress=False):
    """DDIM inversion (SPEC §4 run forward, t rising): x_0 is taken as the point at t = 0 and carried up the
    same grid as ddim_sample to x_T. eps_fn(x, t) -> (eps, shift or None)."""
    ts = ddim_timesteps(sched.T, steps)
    x = x0
    for i in tqdm(range(len(ts) - 1), desc="ddim invert", disable=not progress, leave=False):
        eps, shift = eps_fn(x, _batch_t(ts[i], x))
        x = ddim_step(sched, x, _batch_t(ts[i], x), _batch_t(ts[i + 1], x), eps, shift)
    return x


@torch.no_grad()
def ancestral_sample(model, sched, shape, device="cpu", generator=None, progress=False):
    """DDPM ancestral sampling: x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sigma_t z,
    with sigma_t^2 = beta_t (1 - abar_{t-1}) / (1 - abar_t)."""
    x = torch.randn(shape, device=device, generator=generator)
    for t in tqdm(range(sched.T - 1, -1, -1), desc="ancestral sample", disable=not progress, leave=False):
        tt = _batch_t(t, x)
        eps = model(x, tt)
        beta, alpha, abar = at(sched.betas, tt, x), at(sched.alphas, tt, x), at(sched.abar, tt, x)
        mean = (x - beta / (1 - abar).sqrt() * eps) / alpha.sqrt()
        var = beta * (1 - at(sched.abar_prev, tt, x)) / (1 - abar)
        noise = torch.randn(shape, device=device, generator=generator) if t > 0 else torch.zeros_like(x)
        x = mean + var.sqrt() * noise
    return x
