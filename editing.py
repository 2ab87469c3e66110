"""The views that run a method's decoder: decoder usage (SPEC §7.1), DDIM inversion and reconstruction,
counterfactuals and manipulation (SPEC §4), and the edit-specificity view (swap one unit of z, classify the
decoded image).

A method is reached through a `Decoder` (diti_decoder builds one for DiTi/PDAE), so the same code serves any
method that can give a weighted loss and an eps_fn for diffusion.ddim_sample/ddim_invert from a code z.
"""
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import diffusion
from diti import condition, cumulative_mask, shifted_eps_fn
from plots import save_grid


@dataclass
class Decoder:
    """What the decoder-based views need from a method.
    eps_fn(z) -> eps_fn(x, t) for the DDIM loops of diffusion.py (SPEC §4, the same masks as in training);
    weighted_losses(x0, eps, t, zs) -> (S, B) per-sample weighted DiTi loss of reconstructing x0 from each of
        S codes zs (S, B, d), sharing x_t = q_sample(x0, t, eps) (SPEC §2);
    mask(t) -> (B, d): the dims the decoder reads at t (all ones for a method without time-step subsets);
    plain_eps_fn(x, t) -> (eps, None): the frozen DDPM alone, for a reconstruction baseline (optional)."""
    eps_fn: Callable
    weighted_losses: Callable
    mask: Callable
    sched: diffusion.Schedule
    plain_eps_fn: Callable = None


def diti_decoder(model, unet, sched):
    """The Decoder of a DiTi/PDAE model on its frozen U-Net."""
    part = model.partition

    @torch.no_grad()
    def weighted_losses(x0, eps, t, zs):
        # SPEC §2: L = weight_t || eps - (eps_theta(x_t, t) + shift_t G(x_t, t, c_t)) ||^2, c_t = z * mask_t.
        # The frozen encoder half runs once; G runs for all S codes in one pass over repeated features.
        S, B = zs.shape[:2]
        x_t = diffusion.q_sample(sched, x0, t, eps)
        h, skips, emb = unet.encode(x_t, t)
        eps_theta = unet.eps_from((h, skips, emb), x_t, t)
        repeat = lambda a: a.repeat(S, *([1] * (a.dim() - 1)))                  # (B, ...) -> (S * B, ...)
        t_all = t.repeat(S)
        c = condition(zs.reshape(S * B, -1), t_all, part)                         # (S * B, d)
        G = model.decoder((repeat(h), [repeat(s) for s in skips], repeat(emb)), c)
        pred = repeat(eps_theta) + diffusion.shift_coef(sched, t_all).view(-1, 1, 1, 1) * G
        per_sample = diffusion.pdae_weight(sched, t_all) * (repeat(eps) - pred).pow(2).flatten(1).mean(1)
        return per_sample.view(S, B)

    return Decoder(eps_fn=lambda z: shifted_eps_fn(unet, model, z), weighted_losses=weighted_losses,
                   mask=lambda t: cumulative_mask(part, t), sched=sched, plain_eps_fn=lambda x, t: (unet(x, t), None))


@contextmanager
def timed(seconds, part):
    """Add the wall seconds of the with-block to seconds[part] (evaluation timings)."""
    start = time.perf_counter()
    yield
    seconds[part] = seconds.get(part, 0.0) + time.perf_counter() - start


def chunks(n, size):
    """Slices that cut range(n) into pieces of at most size."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def invert(decoder, z, x0, steps, batch_size=256, desc="ddim invert"):
    """SPEC §4: DDIM run forward (t rising) with the shift, x_0 -> x_T, conditioned on z (B, d)."""
    out = [diffusion.ddim_invert(decoder.eps_fn(z[s]), decoder.sched, x0[s], steps)
           for s in tqdm(chunks(len(z), batch_size), desc=desc, leave=False)]
    return torch.cat(out)


@torch.no_grad()
def decode(decoder, z, x_T, steps, batch_size=256, desc="ddim decode"):
    """SPEC §4: DDIM run backward with the shift, x_T -> x_0, conditioned on z (B, d). Chunked over B."""
    out = [diffusion.ddim_sample(decoder.eps_fn(z[s]), decoder.sched, x_T[s], steps)
           for s in tqdm(chunks(len(z), batch_size), desc=desc, leave=False)]
    return torch.cat(out)


def reconstruction_mse(x0, x0_hat):
    """Mean squared error per pixel and channel, in [-1, 1] units."""
    return float((x0 - x0_hat).pow(2).mean())


# ---------------------------------------------------------------------------------------- decoder usage (SPEC §7.1)

def swap_unit(z_A, z_B, dims):
    """z_A with the dims of one unit taken from z_B."""
    z = z_A.clone()
    z[:, dims] = z_B[:, dims]
    return z


@torch.no_grad()
def decoder_usage(rep, pairs, seed=0):
    """SPEC §7.1 usage: what the decoder reads. rep: a representation.Representation with a decoder. pairs: per
    factor, (x0_A, x0_B) with R * n rows differing only in that factor; block r (n rows) is scored at
    time-steps drawn in t range r. For each unit s, gain = loss(B | z_A) - loss(B | z_A with unit s from z_B):
    the weighted DiTi loss of reconstructing B (x_t from B's x_0, the same eps), averaged over the block,
    clipped at 0. Units the mask at t switches off are not run (their gain is exactly 0). Returns the grid
    (F, R, U)."""
    R, U = len(rep.t_ranges), len(rep.units)
    gen = torch.Generator().manual_seed(seed)
    grid = np.zeros((len(pairs), R, U))
    bar = tqdm(total=len(pairs) * R, desc=f"usage ({rep.name})", leave=False)
    for f, (x_A, x_B) in enumerate(pairs):
        z_A, z_B = rep.encode(x_A), rep.encode(x_B)                                # (R * n, d)
        for r, (first, last), rows in zip(range(R), rep.t_ranges, np.array_split(np.arange(len(x_A)), R)):
            t = torch.randint(first, last + 1, (len(rows),), generator=gen).to(x_A.device)
            eps = torch.randn(x_B[rows].shape, generator=gen).to(x_A.device)
            mask = rep.decoder.mask(t)
            active = [s for s, dims in enumerate(rep.units) if mask[:, dims].any()]
            zs = torch.stack([z_A[rows]] + [swap_unit(z_A[rows], z_B[rows], rep.units[s]) for s in active])
            losses = rep.decoder.weighted_losses(x_B[rows], eps, t, zs)            # (1 + |active|, n)
            grid[f, r, active] = (losses[0] - losses[1:]).mean(1).cpu().numpy()
            bar.update()
    bar.close()
    return np.clip(grid, 0.0, None)


def usage_pairs(generator, n_per_range, n_ranges, seed, device):
    """For every factor, R * n rendered pairs that differ only in it (Synthetic.changed_pairs)."""
    pairs = []
    for f in range(len(generator.factor_names)):
        a, b = generator.changed_pairs(f, n_per_range * n_ranges, np.random.default_rng([seed, f]))
        pairs.append(tuple(data.to_tensor(generator.render(v)).to(device) for v in (a, b)))
    return pairs


# ---------------------------------------------------------------------------------------- counterfactuals

def interpolate_codes(z1, z2, dims, alphas):
    """SPEC §4 counterfactual codes: z = z1 with dims M replaced by lerp(z1[M], z2[M], alpha).
    z1, z2 (B, d), alphas (A,) -> (A, B, d). alpha = 0 gives z1 exactly."""
    dims = torch.as_tensor(np.asarray(dims), dtype=torch.long, device=z1.device)
    out = z1[None].repeat(len(alphas), 1, 1)                                       # (A, B, d)
    for i, alpha in enumerate(alphas):
        out[i][:, dims] = torch.lerp(z1[:, dims], z2[:, dims], float(alpha))
    return out


def slerp(a, b, alpha):
    """Spherical interpolation of each row of a and b (B, ...): sin((1-a) w) / sin w a + sin(a w) / sin w b."""
    fa, fb = a.flatten(1), b.flatten(1)
    cos = (F.normalize(fa, dim=1) * F.normalize(fb, dim=1)).sum(1).clamp(-1 + 1e-7, 1 - 1e-7)
    omega = torch.acos(cos)[:, None]
    mixed = (torch.sin((1 - alpha) * omega) * fa + torch.sin(alpha * omega) * fb) / torch.sin(omega)
    return mixed.view_as(a)


def counterfactual(decoder, z1, x_T1, z2, x_T2, dims, alphas, steps, use_slerp=False, batch_size=256):
    """SPEC §4: decode z = lerp on dims M (interpolate_codes) from x_T1, or from slerp(x_T1, x_T2, alpha).
    Returns (images (A, B, C, H, W), codes (A, B, d))."""
    codes = interpolate_codes(z1, z2, dims, alphas)
    noise = torch.stack([slerp(x_T1, x_T2, float(a)) if use_slerp else x_T1 for a in alphas])
    A, B = codes.shape[:2]
    images = decode(decoder, codes.flatten(0, 1), noise.flatten(0, 1), steps, batch_size, desc="counterfactual")
    return images.view(A, B, *images.shape[1:]), codes


def unit_ranges(n_units):
    """Early / middle / late thirds of the units (fewer groups when there are fewer than 3 units)."""
    groups = [g for g in np.array_split(np.arange(n_units), min(3, n_units)) if len(g)]
    names = ["early", "middle", "late"] if len(groups) == 3 else [f"units {g[0]}-{g[-1]}" for g in groups]
    return list(zip(names, groups))


def counterfactual_grid(decoder, units, z, x_T, x0, pairs, alphas, steps, path, use_slerp=False):
    """A PNG with, for each pair (i, j) of rows of z / x_T / x0, one row per unit range (early / middle / late):
    the source, the decodes over alpha, then the target."""
    rows = []
    for i, j in pairs:
        for _, group in unit_ranges(len(units)):
            dims = np.concatenate([units[u] for u in group])
            images, _ = counterfactual(decoder, z[i:i + 1], x_T[i:i + 1], z[j:j + 1], x_T[j:j + 1], dims, alphas,
                                       steps, use_slerp)
            rows.append(torch.cat([x0[i:i + 1], images[:, 0], x0[j:j + 1]]))
    return save_grid(data.to_uint8(torch.cat(rows)), path, nrow=len(alphas) + 2)


# ---------------------------------------------------------------------------------------- manipulation

def manipulate(decoder, z, x_T, direction, unit_sets, scales, mean, std, steps, batch_size=256):
    """SPEC §4: z normalised per dim over the train set, zn = (z - mean) / std; w restricted to a set of units;
    zn' = zn + scale sqrt(d) w / ||w||; decode zn' * std + mean from the inferred x_T.
    z (B, d), direction (d,), unit_sets: list of index arrays. Returns images (len(unit_sets), len(scales), B, ...)."""
    d = z.shape[1]
    zn = (z - mean) / std
    codes = []
    for dims in unit_sets:
        w = torch.zeros(d, device=z.device)
        w[dims] = direction[dims]
        w = w / w.norm().clamp_min(1e-12)
        codes += [(zn + s * d ** 0.5 * w) * std + mean for s in scales]
    codes = torch.stack(codes)                                                      # (sets * scales, B, d)
    noise = x_T[None].expand(len(codes), *x_T.shape)
    images = decode(decoder, codes.flatten(0, 1), noise.flatten(0, 1), steps, batch_size, desc="manipulate")
    return images.view(len(unit_sets), len(scales), *x_T.shape)


# ---------------------------------------------------------------------------------------- factor classifier

class FactorClassifier(nn.Module):
    """A small CNN that reads every factor of an image: (B, 3, S, S) -> (B, sum_f n_f) logits, one head per
    factor. Stride 1 first so a 1-px texture survives; flattened (not pooled) so position survives."""

    def __init__(self, num_values, image_size=32):
        super().__init__()
        self.num_values = list(num_values)
        conv = lambda i, o, s: nn.Conv2d(i, o, 3, stride=s, padding=1)
        self.net = nn.Sequential(conv(3, 32, 1), nn.SiLU(), conv(32, 64, 2), nn.SiLU(), conv(64, 64, 2),
                                 nn.SiLU(), conv(64, 64, 2), nn.SiLU(), nn.Flatten(),
                                 nn.Linear(64 * (image_size // 8) ** 2, sum(self.num_values)))

    def forward(self, x):
        return self.net(x)

    def predict(self, x):
        """(B, F) predicted value of each factor."""
        heads = self(x).split(self.num_values, dim=1)
        return torch.stack([h.argmax(1) for h in heads], dim=1)


def classifier_loss(model, x, y):
    """sum_f CE(head_f(x), y_f)."""
    heads = model(x).split(model.num_values, dim=1)
    return sum(F.cross_entropy(h, y[:, f]) for f, h in enumerate(heads))


@torch.no_grad()
def classifier_accuracy(model, images, labels, batch_size=512):
    """Per-factor accuracy (F,) on uint8 images and (N, F) labels."""
    model.eval()
    preds = torch.cat([model.predict(data.to_tensor(images[s])) for s in chunks(len(images), batch_size)])
    return (preds.numpy() == labels).mean(0)


def train_classifier(train_set, test_set, steps, batch_size=64, lr=2e-3, seed=0):
    """Train FactorClassifier on REAL train images (a few hundred Adam steps); returns (model, test accuracy)."""
    torch.manual_seed(seed)
    model = FactorClassifier(train_set.num_values, train_set.images.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    stream = data.BatchStream(train_set, batch_size, seed)
    labels = torch.as_tensor(np.asarray(train_set.labels))
    for _ in tqdm(range(steps), desc="factor classifier", leave=False):
        idx, _ = stream.next_indices()
        loss = classifier_loss(model, data.to_tensor(train_set.images[np.sort(idx)]), labels[np.sort(idx)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval(), classifier_accuracy(model, test_set.images, test_set.labels)


def load_or_train_classifier(path, train_set, test_set, steps, batch_size=64, seed=0):
    """The cached classifier at path if it was trained with these settings, else train and cache it.
    Returns (model, test accuracy (F,), seconds spent training; 0 when cached)."""
    key = dict(steps=steps, batch_size=batch_size, seed=seed, num_values=list(train_set.num_values),
               n_train=len(train_set), size=int(train_set.images.shape[1]))
    if os.path.exists(path):
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.get("key") == key:
            model = FactorClassifier(train_set.num_values, train_set.images.shape[1])
            model.load_state_dict(cached["state"])
            return model.eval(), np.asarray(cached["accuracy"]), 0.0
    start = time.perf_counter()
    model, accuracy = train_classifier(train_set, test_set, steps, batch_size, seed=seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(dict(key=key, state=model.state_dict(), accuracy=accuracy.tolist()), path + ".tmp")
    os.replace(path + ".tmp", path)                 # atomic: side-by-side runs may train the same one
    return model, accuracy, time.perf_counter() - start


# ---------------------------------------------------------------------------------------- edit specificity

@torch.no_grad()
def edit_change_rates(decoder, classifier, units, z_A, x_T_A, z_B, y_A, y_B, steps, batch_size=256):
    """SPEC §7.1 fourth view: for each unit s, swap z_A's unit s for z_B's (alpha = 1), decode from x_T_A and
    classify. A factor counts as changed when the prediction differs from the prediction on A's own decode
    (z_A unedited, same x_T_A), so reconstruction errors do not count as edits. Only pairs where A and B
    differ in the factor count. Returns (change rate (F, U), reference decode of A (P, C, H, W))."""
    codes = [z_A]
    for dims in units:
        edited = z_A.clone()
        edited[:, dims] = z_B[:, dims]
        codes.append(edited)
    codes = torch.stack(codes)                                                     # (1 + U, P, d)
    noise = x_T_A[None].expand(len(codes), *x_T_A.shape)
    images = decode(decoder, codes.flatten(0, 1), noise.flatten(0, 1), steps, batch_size, desc="edits")
    preds = classifier.predict(images.cpu()).view(len(codes), len(z_A), -1).numpy()  # (1 + U, P, F)
    changed = preds[1:] != preds[0][None]                                            # (U, P, F)
    differs = (np.asarray(y_A) != np.asarray(y_B))[None]                             # (1, P, F)
    rates = (changed & differs).sum(1) / np.maximum(differs.sum(1), 1)               # (U, F)
    return rates.T, images[:len(z_A)]


def granularity_groups(loss_times, t_ranges):
    """A factor's granularity group: the unit whose t range holds its loss time t_f (the last unit if t_f
    lies past every range). (F,) ints."""
    lasts = np.array([last for _, last in t_ranges])
    return np.minimum(np.searchsorted(lasts, np.asarray(loss_times)), len(lasts) - 1)


def specificity(change_rates, groups, ranges):
    """How often factors of the edited granularity change against the others. For each unit range R (early /
    middle / late): own = mean rate, over units s in R and factors f whose group lies in R, of C[f, s];
    other = the same over factors whose group lies outside R. Summary: mean own, mean other and their
    difference, over the ranges that hold at least one factor's group (nan where none does)."""
    C, groups = np.asarray(change_rates), np.asarray(groups)
    per_range, owns, others = {}, [], []
    for name, members in ranges:
        inside = np.isin(groups, members)
        own = float(C[inside][:, members].mean()) if inside.any() else float("nan")
        other = float(C[~inside][:, members].mean()) if (~inside).any() else float("nan")
        per_range[name] = dict(units=[int(u) for u in members], own=own, other=other)
        if inside.any():
            owns.append(own)
            others.append(other)
    own, other = (float(np.nanmean(v)) if len(v) else float("nan") for v in (owns, others))
    return dict(own=own, other=other, specificity=own - other, per_range=per_range)


# ---------------------------------------------------------------------------------------- one method's views

def reconstruction_view(decoder, x0, x0_hat, steps, path):
    """MSE of the DDIM reconstruction, a PNG of inputs (top row) vs reconstructions, and the MSE of the frozen
    DDPM alone (DDIM inversion then decoding without the shift), the baseline that says how much z adds."""
    n = min(8, len(x0))
    png = save_grid(data.to_uint8(torch.cat([x0[:n], x0_hat[:n]])), path, nrow=n)
    out = dict(mse=reconstruction_mse(x0, x0_hat), images=len(x0), ddim_steps=steps, png=png)
    if decoder.plain_eps_fn is not None:
        x_T = diffusion.ddim_invert(decoder.plain_eps_fn, decoder.sched, x0, steps)
        out["ddpm_only_mse"] = reconstruction_mse(x0, diffusion.ddim_sample(decoder.plain_eps_fn, decoder.sched,
                                                                             x_T, steps))
    return out


def manipulation_grid(decoder, units, z, x_T, x0, target, scales, steps, path, batch_size=256):
    """SPEC §4 manipulation PNG: rows = (unit set, image) for the sets all / early / middle / late, columns =
    the input, then one decode per scale. target: dict(direction, mean, std, label) (evaluate.py)."""
    as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float32, device=z.device)
    sets = [("all", np.arange(z.shape[1]))] + [
        (name, np.concatenate([units[u] for u in group])) for name, group in unit_ranges(len(units))]
    images = manipulate(decoder, z, x_T, as_tensor(target["direction"]), [d for _, d in sets], scales,
                        as_tensor(target["mean"]), as_tensor(target["std"]), steps, batch_size)
    rows = torch.cat([torch.cat([x0[i:i + 1], images[s, :, i]]) for s in range(len(sets)) for i in range(len(z))])
    return dict(png=save_grid(data.to_uint8(rows), path, nrow=len(scales) + 1), target=target["label"],
                rows=[f"{name} (image {i})" for name, _ in sets for i in range(len(z))], scales=list(scales))


def decoding_views(decoder, units, pairs, classifier, target, cfg, prefix, seconds):
    """The SPEC §4 views of one method on test pairs: DDIM inversion of A; with a factor classifier, edit change
    rates (F, U) from edit_change_rates, whose unedited decode is also the reconstruction; counterfactual and
    manipulation PNGs. pairs: dict of x_A, x_B (images), z_A, z_B (codes), y_A, y_B (labels); cfg:
    config.EvalConfig; seconds: timings by part. Returns a dict of views ('change_rates' with a classifier)."""
    p, steps, bs, out = SimpleNamespace(**pairs), cfg.ddim_steps, cfg.batch_size, {}
    with timed(seconds, "inversion"):
        x_T_A = invert(decoder, p.z_A, p.x_A, steps, bs)
    if classifier is not None:
        with timed(seconds, "edits"):
            out["change_rates"], recon = edit_change_rates(decoder, classifier, units, p.z_A, x_T_A, p.z_B, p.y_A,
                                                           p.y_B, steps, bs)
    with timed(seconds, "reconstruction"):
        if classifier is None:
            recon = decode(decoder, p.z_A, x_T_A, steps, bs)
        out["reconstruction"] = reconstruction_view(decoder, p.x_A, recon, steps, f"{prefix}_reconstruction.png")
    with timed(seconds, "counterfactual"):
        n = min(cfg.cf_pairs, len(p.x_A))
        x_T_B = invert(decoder, p.z_B[:n], p.x_B[:n], steps, bs) if cfg.cf_slerp else x_T_A[:n]
        png = counterfactual_grid(decoder, units, torch.cat([p.z_A[:n], p.z_B[:n]]), torch.cat([x_T_A[:n], x_T_B]),
                                  torch.cat([p.x_A[:n], p.x_B[:n]]), [(i, n + i) for i in range(n)],
                                  np.linspace(0, 1, cfg.cf_alphas), steps, f"{prefix}_counterfactual.png",
                                  cfg.cf_slerp)
        out["counterfactual"] = dict(png=png, slerp=cfg.cf_slerp, alphas=cfg.cf_alphas,
                                     rows="per pair: early, middle, late units; columns: source, alpha 0..1, target")
    with timed(seconds, "manipulation"):
        n = min(cfg.manip_images, len(p.x_A))
        out["manipulation"] = manipulation_grid(decoder, units, p.z_A[:n], x_T_A[:n], p.x_A[:n], target,
                                                cfg.manip_scales, steps, f"{prefix}_manipulation.png", bs)
    return out
