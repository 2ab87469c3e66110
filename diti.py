"""DiTi (SPEC §2-3): the encoder, the partition of z into k time-step subsets, cumulative masks, the loss.

PDAE is DiTi with k = 1 (one subset, always on); there is no separate code path.

    python diti.py --partition paper              # the paper's CelebA partition (k=64, d=512)
    python diti.py --partition uniform --d 64 --k 8
"""
import argparse
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusion import pdae_weight, q_sample, shift_coef
from unet import Attention, ShiftDecoder, eps_and_shift, group_norm

PAPER_STAGES = (50, 100, 300, 500, 1000)        # SPEC §2: t ends of the stages
PAPER_STAGE_DIMS = (10, 25, 327, 100, 50)       # dims per stage, summing to d = 512


# ----------------------------------------------------------------------------------------------------------
# Partition: which time-steps use which dims of z

@dataclass
class Partition:
    """z is cut into k consecutive subsets; subset i is dims [ends[i-1], ends[i]) (ends[-1] := 0)."""
    ends: tuple        # end dim of each subset, strictly increasing, ends[-1] = d
    T: int = 1000

    def __post_init__(self):
        self.ends = tuple(int(e) for e in self.ends)
        if any(b <= a for a, b in zip((0,) + self.ends, self.ends)):
            raise ValueError(f"partition end dims must rise strictly from above 0, got {self.ends}")

    @property
    def k(self):
        return len(self.ends)

    @property
    def d(self):
        return self.ends[-1]

    def starts(self):
        return (0,) + self.ends[:-1]

    def subset_of_t(self, t):
        """SPEC §2: idx(t) = floor(t * k / T). Works on ints and on tensors of time-steps."""
        return t * self.k // self.T

    def t_range(self, i):
        """The time-steps {t : idx(t) = i} as (first, last)."""
        first = -(-i * self.T // self.k)
        last = -(-(i + 1) * self.T // self.k) - 1
        return first, last


def uniform_partition(d, k, T=1000):
    """SPEC §2 uniform partition: end_i = floor(d / k * (i + 1))."""
    if not 1 <= k <= d:
        raise ValueError(f"k={k} subsets cannot cut a latent of d={d} dims: choose 1 <= k <= d")
    return Partition(tuple(d * (i + 1) // k for i in range(k)), T)


def staged_partition(k, stage_ends, stage_dims, T=1000):
    """SPEC §2 non-uniform partition: each subset belongs to the stage holding its first time-step; a stage's
    dims are split evenly (integer division) over its subsets, and its last subset takes the remainder."""
    if len(stage_ends) != len(stage_dims) or stage_ends[-1] != T:
        raise ValueError(f"stages {stage_ends} must end at T={T} and match dims per stage {stage_dims}")
    stage_of = [next(s for s, end in enumerate(stage_ends) if -(-i * T // k) < end) for i in range(k)]
    ends, total = [], 0
    for s, dims in enumerate(stage_dims):
        members = [i for i in range(k) if stage_of[i] == s]
        if not members:
            raise ValueError(f"stage {s} (t < {stage_ends[s]}) holds no subset at k={k}: merge it or raise k")
        share = dims // len(members)
        for j in range(len(members)):
            total += share if j < len(members) - 1 else dims - share * (len(members) - 1)
            ends.append(total)
    return Partition(tuple(ends), T)


def paper_partition(T=1000):
    """The paper's CelebA/FFHQ/Bedroom setting: k = 64, d = 512, stages 50/100/300/500/1000."""
    return staged_partition(64, PAPER_STAGES, PAPER_STAGE_DIMS, T)


def fitted_partition(tv_curves, d, k, T=1000):
    """A partition fitted to where the factors' attribute loss lies (the paper chose its CelebA partition from
    its loss profile; here the profile is exact). Subset i keeps the time-steps of idx(t) = floor(t k / T) and
    gets 1 dim plus a share of the other d - k dims proportional to how much TV the factors lose inside its
    t range: mass_i = sum_f TV_f(first_i) - TV_f(last_i + 1). tv_curves: (F, T) array of TV_t per factor."""
    if not 1 <= k <= d:
        raise ValueError(f"k={k} subsets cannot cut a latent of d={d} dims: choose 1 <= k <= d")
    tv = torch.as_tensor(tv_curves, dtype=torch.float64)
    tv = torch.cat([tv, torch.zeros(tv.shape[0], 1, dtype=torch.float64)], dim=1)   # TV_T := 0
    part = uniform_partition(k, k, T)
    mass = torch.stack([(tv[:, part.t_range(i)[0]] - tv[:, part.t_range(i)[1] + 1]).clamp_min(0).sum()
                        for i in range(k)])
    share = (d - k) * mass / mass.sum() if mass.sum() > 0 else torch.full((k,), (d - k) / k, dtype=torch.float64)
    dims = share.floor().long()
    for i in torch.argsort(share - dims, descending=True)[: d - k - int(dims.sum())]:   # largest remainders
        dims[i] += 1
    return Partition(tuple(torch.cumsum(dims + 1, 0).tolist()), T)


def make_partition(kind, d, k, stages=None, stage_dims=None, T=1000, tv_curves=None):
    """'uniform', 'paper', 'staged' (with stages and stage_dims) or 'fitted' (with tv_curves). Errors name
    the fix."""
    if kind == "uniform":
        return uniform_partition(d, k, T)
    if kind == "paper":
        if d != sum(PAPER_STAGE_DIMS):
            raise ValueError(f"the paper partition needs d=512, got d={d}: use --z-dim 512 or --partition uniform")
        return staged_partition(k, PAPER_STAGES, PAPER_STAGE_DIMS, T)
    if kind == "fitted":
        if tv_curves is None:
            raise ValueError("the fitted partition needs the factors' TV curves (built-in data only)")
        return fitted_partition(tv_curves, d, k, T)
    if kind == "staged":
        if sum(stage_dims) != d:
            raise ValueError(f"dims per stage {tuple(stage_dims)} sum to {sum(stage_dims)}, not the latent size d={d}")
        return staged_partition(k, tuple(stages), tuple(stage_dims), T)
    raise ValueError(f"unknown partition '{kind}': choose uniform, paper, staged or fitted")


def cumulative_mask(partition, t):
    """SPEC §2: the mask at t switches on dims [0, end_{idx(t)}). (B,) -> (B, d) float."""
    ends = torch.tensor(partition.ends, device=t.device)
    end = ends[partition.subset_of_t(t)]                                    # (B,)
    return (torch.arange(partition.d, device=t.device)[None] < end[:, None]).float()


def condition(z, t, partition, mode="base"):
    """c_t, the masked z fed to the decoder (SPEC §2).
    base:      c_t = z * mask_idx
    stop_grad: c_t = sg(z) * mask_{idx-1} + z * (mask_idx - mask_{idx-1}): same value, but only subset idx(t)
               receives gradient."""
    mask = cumulative_mask(partition, t)                                    # (B, d)
    if mode == "base":
        return z * mask
    if mode != "stop_grad":
        raise ValueError(f"unknown DiTi mode '{mode}': choose base or stop_grad")
    starts = torch.tensor(partition.starts(), device=t.device)[partition.subset_of_t(t)]
    earlier = (torch.arange(partition.d, device=t.device)[None] < starts[:, None]).float()
    return z.detach() * earlier + z * (mask - earlier)


# ----------------------------------------------------------------------------------------------------------
# Networks

class Encoder(nn.Module):
    """SPEC §3 encoder E: x_0 -> z in R^d. For 64x64 (1.49M params at d = 512): conv s2 3->64, GN, SiLU,
    conv s2 64->128, attention (4 heads), GN, SiLU, conv s2 128->128, GN, SiLU, conv s2 128->128, GN, SiLU,
    flatten, Linear(2048 -> d). Other sizes keep the layers; the flatten width is 128 * (size / 16)^2, so at
    16 px the map is 1x1 before the Linear. min_grid > 1 (beyond the paper, off by default) keeps it at least
    min_grid x min_grid: a conv that would halve it below that has stride 1. width (64 in the paper) sets the
    channels: width, then 2 * width."""

    def __init__(self, image_size=64, z_dim=512, in_channels=3, min_grid=1, width=64):
        super().__init__()
        if image_size % 16:
            raise ValueError(f"the encoder needs an image size divisible by 16, got {image_size}")
        sizes = [image_size]
        for _ in range(4):
            sizes.append(sizes[-1] // 2 if sizes[-1] // 2 >= min_grid else sizes[-1])
        conv = lambda i, o, n: nn.Conv2d(i, o, 3, stride=sizes[n] // sizes[n + 1], padding=1)  # noqa: E731
        w, w2 = width, 2 * width
        self.net = nn.Sequential(
            conv(in_channels, w, 0), group_norm(w), nn.SiLU(),
            conv(w, w2, 1), Attention(w2, num_heads=4), group_norm(w2), nn.SiLU(),
            conv(w2, w2, 2), group_norm(w2), nn.SiLU(),
            conv(w2, w2, 3), group_norm(w2), nn.SiLU(),
            nn.Flatten(), nn.Linear(w2 * sizes[-1] ** 2, z_dim))

    def forward(self, x):
        return self.net(x)  # (B, d)


class SubsetEncoders(nn.Module):
    """Beyond the paper (SPEC §7.1, off by default): one small encoder per subset and no shared trunk, so that
    no subset's features are a linear read-out of the same trunk as the others'. Head i outputs subset i's dims;
    each is at most 1/sqrt(k) as wide as E, so that together they cost no more than E (in parameters)."""

    def __init__(self, image_size, partition, in_channels=3, min_grid=1):
        super().__init__()
        width = 8 * max(1, int(8 / partition.k ** 0.5))
        sizes = [e - s for s, e in zip(partition.starts(), partition.ends)]
        self.heads = nn.ModuleList(Encoder(image_size, n, in_channels, min_grid, width) for n in sizes)

    def forward(self, x):
        return torch.cat([head(x) for head in self.heads], dim=1)  # (B, d), subset i from head i


class DiTi(nn.Module):
    """The trainable parts, E and G, and the partition they are trained for. The frozen U-Net is not a
    member: it is passed to the loss so that checkpoints of this module hold only what stage 2 learns."""

    def __init__(self, unet_cfg, partition, encoder_size=None, encoder_grid=1, encoder_heads=False, open_z_path=False,
                 position_embedding=False):
        super().__init__()
        self.partition = partition
        size = encoder_size or unet_cfg.image_size
        self.encoder = (SubsetEncoders(size, partition, unet_cfg.in_channels, encoder_grid) if encoder_heads
                        else Encoder(size, partition.d, unet_cfg.in_channels, encoder_grid))
        self.decoder = ShiftDecoder(unet_cfg, partition.d, open_z_path, position_embedding)

    def encode(self, x0):
        return self.encoder(x0)


def diti_loss(model, unet, sched, x0, mode="base", t=None, eps=None, gamma=0.1):
    """SPEC §2: L = mean over batch and pixels of
    weight_t || eps - (eps_theta(x_t, t) + shift_t G(x_t, t, c_t)) ||^2, weight_t with PDAE's gamma (paper: 0.1).
    Returns (loss, per-sample loss (B,), t (B,)) so a caller can histogram the loss over t."""
    B = x0.shape[0]
    t = torch.randint(0, sched.T, (B,), device=x0.device) if t is None else t
    eps = torch.randn_like(x0) if eps is None else eps
    x_t = q_sample(sched, x0, t, eps)
    c = condition(model.encode(x0), t, model.partition, mode)              # (B, d)
    eps_theta, G = eps_and_shift(unet, model.decoder, x_t, t, c)
    pred = eps_theta + shift_coef(sched, t).view(B, 1, 1, 1).to(G.dtype) * G
    per_sample = pdae_weight(sched, t, gamma) * (eps - pred).float().pow(2).flatten(1).mean(1)
    return per_sample.mean(), per_sample.detach(), t


def shifted_eps_fn(unet, model, z):
    """eps_fn for the DDIM loops of diffusion.py: at each t, G sees z under that t's mask (SPEC §4: the same
    masks at sampling as in training)."""
    def eps_fn(x, t):
        return eps_and_shift(unet, model.decoder, x, t, z * cumulative_mask(model.partition, t))
    return eps_fn


# ----------------------------------------------------------------------------------------------------------

def subset_table(partition):
    """One line per subset: its index, dims [start, end), and time-steps [first, last]."""
    rows = [f"{'subset':>6}  {'dims':>11}  {'#':>4}  {'t range':>9}"]
    for i, (s, e) in enumerate(zip(partition.starts(), partition.ends)):
        first, last = partition.t_range(i)
        rows.append(f"{i:>6}  [{s:>4},{e:>4})  {e - s:>4}  {first:>4}-{last:<4}")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description="Print the subset table of a DiTi partition.")
    p.add_argument("--partition", default="paper", choices=["uniform", "paper", "staged"])
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--stages", default="50,100,300,500,1000", help="t ends of the stages (staged)")
    p.add_argument("--stage-dims", default="10,25,327,100,50", help="dims per stage (staged)")
    a = p.parse_args()
    ints = lambda s: tuple(int(v) for v in s.split(","))
    try:
        part = make_partition(a.partition, a.d, a.k, ints(a.stages), ints(a.stage_dims))
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(subset_table(part))


if __name__ == "__main__":
    main()
