"""What the DiTi loss pays for each factor of the built-in data, by t (beyond the paper; issue 12).

Under a perfect frozen DDPM (eps_theta = E[eps | x_t], synthetic.ExactDenoiser) the shift G can lower the eps
error only by what z tells about x0 beyond x_t. Knowing factor f alone lowers it by

    gain_f(t) = E || E[eps | x_t] - E[eps | x_t, f] ||^2 = SNR_t E || E[x0 | x_t] - E[x0 | x_t, f] ||^2

(the better estimator's error is the worse one's minus their squared difference), and knowing x0 by
exact_t = SNR_t E || x0 - E[x0 | x_t] ||^2. Both are computed here over every image of the data (posterior in
closed form, no sampling of the data), times the loss weight of SPEC §2. This is the most each factor can earn
the encoder, and where in t: a factor the loss barely pays for is one a small budget will not learn.

Also eps_errors (`python claims.py --eps-errors RUN/ckpt.pt`): the unweighted eps error by t of a run's frozen
DDPM, of the run itself and of the exact denoiser, i.e. how much of what z can earn is the DDPM's own error.

    python gains.py                        # 16 px (the claims preset), the data as built
    python gains.py --fine-loss-time 140   # with the fine factors strengthened (train.py dm --fine-loss-time)
"""
import argparse

import numpy as np
import torch
from tqdm import tqdm

import config
import data
import diffusion
import metrics
import synthetic
import train
from diti import cumulative_mask
from unet import eps_and_shift

TIMES = tuple(range(0, 1000, 50))
SHOWN = (50, 100, 150, 200, 300, 400, 500, 600, 800)


def factor_gains(generator, n=128, times=TIMES, gamma=0.1, seed=0, chunk=32, groups=None):
    """{"t": times, "exact": (T,), "gain": (G, T)}: the weighted eps error the exact denoiser leaves, and what
    knowing each group of factors (default: each factor alone) removes of it; per image, summed over pixels,
    mean over n images drawn from the data (the same x_t for exact and every group)."""
    groups = [(f,) for f in range(len(generator.factor_names))] if groups is None else groups
    labels, images = synthetic.all_images(generator)
    X = torch.from_numpy(images).float() / 127.5 - 1                                   # (N, D)
    X64 = X.double()
    sq = X64.pow(2).sum(1)
    pick = np.random.default_rng(seed).choice(len(labels), n, replace=False)
    sched, lab = diffusion.linear_schedule(), torch.from_numpy(labels)
    exact, gain = np.zeros(len(times)), np.zeros((len(groups), len(times)))
    for j, t in enumerate(tqdm(times, desc="factor gains", leave=False)):
        abar, snr = sched.abar[t].double().item(), sched.snr[t].double().item()
        weight = diffusion.pdae_weight(sched, torch.tensor([t]), gamma).item()
        eps = torch.randn(n, X.shape[1], generator=torch.Generator().manual_seed(t)).double()
        for start in range(0, n, chunk):
            rows = pick[start:start + chunk]
            x0 = X64[rows]
            x_t = abar ** 0.5 * x0 + (1 - abar) ** 0.5 * eps[start:start + chunk]
            p = ((abar ** 0.5 * x_t @ X64.T - abar / 2 * sq) / (1 - abar)).softmax(1).float()        # (B, N)
            mean = p @ X                                                               # E[x0 | x_t]
            exact[j] += weight * snr * (x0.float() - mean).pow(2).sum().item()
            for g, factors in enumerate(groups):                                        # images with x0's values
                same = (lab[:, factors][None, :] == lab[rows][:, factors][:, None]).all(2).float()   # of these
                p_f = p * same
                mean_f = (p_f / p_f.sum(1, keepdim=True).clamp_min(1e-30)) @ X         # E[x0 | x_t, f]
                gain[g, j] += weight * snr * (mean_f - mean).pow(2).sum().item()
    return dict(t=list(times), exact=exact / n, gain=gain / n)


def gains_table(generator, result, loss_times, shown=SHOWN):
    """Markdown: one row per factor (coarse first), its weighted gain at the shown t, the t where it peaks, the
    gain-weighted mean t (where the loss pays for it), and its share of all the weighted eps error z could remove
    (mean over the t grid: the loss's uniform t); then Spearman(mean t, t_f) over every factor."""
    times, total = np.asarray(result["t"]), result["exact"].mean()
    cols = [list(times).index(t) for t in shown if t in times]
    mean_t = (result["gain"] * times).sum(1) / np.maximum(result["gain"].sum(1), 1e-30)
    lines = ["| factor (t_f) | " + " | ".join(f"t={times[c]}" for c in cols) + " | peak t | mean t | share of exact |",
             "|---|" + "---|" * (len(cols) + 3)]
    for f in sorted(range(len(loss_times)), key=lambda f: -loss_times[f]):
        g = result["gain"][f]
        lines.append(f"| {generator.factor_names[f]} ({loss_times[f]}) | " + " | ".join(f"{g[c]:.4f}" for c in cols)
                     + f" | {times[int(g.argmax())]} | {mean_t[f]:.0f} | {100 * g.mean() / total:.2f} % |")
    e = result["exact"]
    lines.append("| exact (knowing x0) | " + " | ".join(f"{e[c]:.4f}" for c in cols)
                 + f" | {times[int(e.argmax())]} | {(e * times).sum() / e.sum():.0f} | 100 % |")
    rho = metrics.spearman(mean_t, loss_times)
    return "\n".join(lines + ["", f"Spearman(mean t, t_f) over all {len(loss_times)} factors: {rho:.2f}"])


EPS_TIMES = (10, 25, 50, 100, 150, 200, 300, 400, 600, 800)


def eps_errors(ckpt_path, n=256, times=EPS_TIMES, seed=5):
    """Where z can earn its loss (beyond the paper): per t, E||eps - eps_hat(x_t, t)||^2 (summed over pixels, mean
    over n images of the built-in data, the same x_t for all) of the frozen DDPM, of the DiTi run (its frozen eps
    + shift with the image's own masked z) and of the exact denoiser E[eps | x_t] (synthetic.ExactDenoiser): the
    floor of any predictor without z, so DDPM - exact is the DDPM's own error, exact what z can restore."""
    model, unet, ckpt = train.load_diti(ckpt_path)
    if ckpt["dm_config"]["data"] != "synthetic":
        raise config.UserError(f"{ckpt_path} was trained on '{ckpt['dm_config']['data']}': --eps-errors needs the built-in data")
    exact = unet if isinstance(unet, synthetic.ExactDenoiser) else train.frozen_eps(unet, ckpt["dm_config"], True)
    gen, sched = train.synthetic_generator(ckpt["dm_config"]), diffusion.linear_schedule()
    x0 = data.to_tensor(gen.render(gen.sample_labels(n, np.random.default_rng(seed))))
    errors = {"DDPM": [], "DiTi": [], "exact": []}
    with torch.no_grad():
        z = model.encode(x0)
        for t in times:
            t_all, eps = torch.full((n,), t), torch.randn(x0.shape, generator=torch.Generator().manual_seed(t))
            x_t = diffusion.q_sample(sched, x0, t_all, eps)
            eps_run, G = eps_and_shift(unet, model.decoder, x_t, t_all, z * cumulative_mask(model.partition, t_all))
            shift = diffusion.shift_coef(sched, t_all).view(-1, 1, 1, 1) * G
            for name, pred in (("DDPM", exact.unet(x_t, t_all)), ("DiTi", eps_run + shift), ("exact", exact(x_t, t_all))):
                errors[name].append((eps - pred).pow(2).flatten(1).sum(1).mean().item())
    return errors


def eps_error_table(ckpt_path, errors, times=EPS_TIMES):
    lines = [f"eps error E||eps - eps_hat||^2 (sum over pixels) by t, {ckpt_path}:", "",
             "| t | " + " | ".join(map(str, times)) + " |", "|---|" + "---|" * len(times)]
    lines += [f"| {name} | " + " | ".join(f"{e:.2f}" for e in errs) + " |" for name, errs in errors.items()]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="What the DiTi loss pays for each factor of the built-in data, by t.")
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--fine-loss-time", type=int, default=0, help="as train.py dm --fine-loss-time (0 = off)")
    p.add_argument("--n", type=int, default=128, help="images drawn from the data")
    p.add_argument("--gamma", type=float, default=0.1, help="PDAE's gamma of the loss weight (paper 0.1)")
    a = p.parse_args(argv)
    gen = synthetic.Synthetic(a.size, 0, fine_loss_time=a.fine_loss_time)
    loss_times = [int(v) for v in synthetic.attribute_loss_curves(gen)[1]]
    result = factor_gains(gen, a.n, gamma=a.gamma)
    print(f"Weighted eps error (weight_t, gamma {a.gamma}, x SNR_t x ||.||^2 summed over pixels, mean over {a.n} "
          f"images) that knowing one factor removes under the exact denoiser; {a.size} px"
          + (f", --fine-loss-time {a.fine_loss_time}" if a.fine_loss_time else "") + ":\n")
    print(gains_table(gen, result, loss_times))


if __name__ == "__main__":
    main()
