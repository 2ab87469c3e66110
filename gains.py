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

And what a decoder realises of it when z is the truth (`--oracle DM_CKPT`): G of SPEC §3 on the frozen DDPM,
trained with z = the one-hot labels (each factor's block zeroed, i.e. unknown, with probability 1/2), no
encoder. Its realised gain for factor f at t is the weighted loss with f's block zeroed minus with every block
known; the exact one is gain(all factors) - gain(all but f) under the exact denoiser. Their ratio is the part
of what the loss pays for f that this decoder can draw: where it is near 0, no encoder can be taught f.

    python gains.py --oracle runs/claims_fine140_s105k/seed0/dm/ckpt.pt --oracle-steps 20000 --out runs/oracle

And the other half (`--supervised-encoder STEPS`): E of SPEC §3 trained with the labels instead of the DiTi loss
(a linear head on z, no DDPM, no G). Where it reads a factor within a few thousand images, E's architecture is
not what keeps stage 2 from learning it. E's weights go to --out/encoder.pt, from which `train.py diti
--encoder-init` (and claims.py's) starts stage 2: does the DiTi loss keep, and place, what E already reads?

    python gains.py --fine-loss-time 140 --supervised-encoder 2000 --out runs/sup_enc
    python gains.py --fine-loss-time 140 --supervised-encoder 20000 --supervised-evals 500,1000,2000,5000,10000 --out runs/sup_enc_20k
"""
import argparse
import json
import os

import numpy as np
import torch
from tqdm import tqdm

import config
import data
import diffusion
import editing
import metrics
import plots
import synthetic
import train
from checkpoint import load_checkpoint, save_checkpoint
from diti import Encoder, cumulative_mask
from unet import ShiftDecoder, eps_and_shift

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


# ----------------------------------------------------------------------------------------------------------
# The oracle decoder: what G can draw of each factor when z is the truth

ORACLE_TIMES = (25, 50, 100, 150, 200, 300, 400, 500, 600, 800)


def one_hot_labels(generator, labels, known):
    """z of the oracle: each factor's one-hot block, zeroed where known[:, f] is False. (B, sum of values)."""
    blocks = [torch.nn.functional.one_hot(labels[:, f], v).float() * known[:, f:f + 1]
              for f, v in enumerate(generator.num_values)]
    return torch.cat(blocks, 1)


def oracle_loss(unet, decoder, sched, x0, z, t, eps, gamma=0.1):
    """The DiTi loss of SPEC §2 with z given: per-sample weight_t * sum over pixels of the eps error, (B,)."""
    x_t = diffusion.q_sample(sched, x0, t, eps)
    eps_theta, G = eps_and_shift(unet, decoder, x_t, t, z)
    pred = eps_theta + diffusion.shift_coef(sched, t).view(-1, 1, 1, 1) * G
    return diffusion.pdae_weight(sched, t, gamma) * (eps - pred).pow(2).flatten(1).sum(1)


def train_oracle(dm_path, steps, out, batch=32, lr=1e-3, evals=(), seed=0, gamma=0.1, n_eval=256,
                 position_embedding=False):
    """Train G on the frozen DDPM of dm_path with z = the (half-known) labels; resumes exactly from out/oracle.pt.
    After each step in evals (and the last) writes out/oracle.json: {step: realised (F, T)}.
    position_embedding: G with unet.ShiftDecoder's learned position map (beyond the paper)."""
    unet, ck = train.load_frozen_unet(dm_path, "cpu")
    gen, sched = train.synthetic_generator(ck["config"]), diffusion.linear_schedule()
    labels, images = synthetic.all_images(gen)                          # every image of the data, (N, C * H * W)
    size = ck["config"]["image_size"]
    X, lab = torch.from_numpy(images).float().view(len(labels), -1, size, size) / 127.5 - 1, torch.from_numpy(labels)
    train.seed_everything(seed)                                       # G's initial weights
    decoder = ShiftDecoder(unet.cfg, sum(gen.num_values), position_embedding=position_embedding)
    opt = torch.optim.Adam(decoder.parameters(), lr=lr)
    path, done, results, rng = os.path.join(out, "oracle.pt"), 0, {}, torch.Generator().manual_seed(seed)
    if os.path.isfile(path):
        state = load_checkpoint(path, kind="oracle")
        trained_gamma = state.get("gamma", 0.1)                   # (the first oracles did not record it)
        if trained_gamma != gamma:
            raise config.UserError(f"{path} was trained with --gamma {trained_gamma}: pass that or another --out")
        if state.get("position_embedding", False) != position_embedding:
            raise config.UserError(f"{path} was trained {'with' if not position_embedding else 'without'} "
                                   "--position-embedding: match it or pass another --out")
        decoder.load_state_dict(state["decoder"]), opt.load_state_dict(state["opt"])
        done, results = state["step"], json.loads(state["results"])
        if "rng" in state:                                          # (the first oracles did not record it)
            rng.set_state(state["rng"])
    for step in tqdm(range(done + 1, steps + 1), initial=done, total=steps, desc="oracle G"):
        rows = torch.randint(0, len(X), (batch,), generator=rng)
        known = torch.rand(batch, len(gen.num_values), generator=rng) < 0.5
        t = torch.randint(0, sched.T, (batch,), generator=rng)
        eps = torch.randn(X[rows].shape, generator=rng)
        loss = oracle_loss(unet, decoder, sched, X[rows], one_hot_labels(gen, lab[rows], known), t, eps, gamma)
        opt.zero_grad(set_to_none=True)
        (loss.mean() / X[0].numel()).backward()
        opt.step()
        if step in evals or step == steps:
            results[str(step)] = realised_gains(unet, decoder, sched, gen, X, lab, n_eval, gamma=gamma).tolist()
            save_checkpoint(path, dict(kind="oracle", decoder=decoder.state_dict(), opt=opt.state_dict(), step=step,
                                       gamma=gamma, rng=rng.get_state(), position_embedding=position_embedding,
                                       results=json.dumps(results)))
            with open(os.path.join(out, "oracle.json"), "w") as f:
                json.dump(dict(times=ORACLE_TIMES, factors=gen.factor_names, realised=results), f)
    return gen, results


@torch.no_grad()
def realised_gains(unet, decoder, sched, gen, X, lab, n=256, times=ORACLE_TIMES, gamma=0.1, seed=0):
    """(F, T): per factor and t, the oracle's weighted loss with that factor's block zeroed minus with every
    block known, mean over the same n images and eps (the units of factor_gains)."""
    rows = torch.from_numpy(np.random.default_rng(seed).choice(len(X), n, replace=False))
    x0, F = X[rows], len(gen.num_values)
    z_all = one_hot_labels(gen, lab[rows], torch.ones(n, F, dtype=torch.bool))
    z_without = [one_hot_labels(gen, lab[rows], (torch.arange(F) != f).expand(n, F)) for f in range(F)]
    out = np.zeros((F, len(times)))
    for j, t in enumerate(times):
        t_all, eps = torch.full((n,), t), torch.randn(x0.shape, generator=torch.Generator().manual_seed(t))
        full = oracle_loss(unet, decoder, sched, x0, z_all, t_all, eps, gamma).mean()
        for f, z in enumerate(z_without):
            out[f, j] = (oracle_loss(unet, decoder, sched, x0, z, t_all, eps, gamma).mean() - full).item()
    return out


def marginal_gains(gen, n=128, times=ORACLE_TIMES, gamma=0.1):
    """(F, T) under the exact denoiser: gain(every factor) - gain(every factor but f)."""
    F = len(gen.num_values)
    groups = [tuple(range(F))] + [tuple(g for g in range(F) if g != f) for f in range(F)]
    gain = factor_gains(gen, n, times, gamma, groups=groups)["gain"]
    return gain[0][None] - gain[1:]


def realised_share(realised, exact):
    """(F,): each factor's realised gain over its exact one, both summed over t."""
    return np.sum(realised, 1) / np.maximum(np.sum(exact, 1), 1e-12)


def oracle_table(gen, realised, exact, loss_times, times=ORACLE_TIMES):
    """Markdown: per factor (coarse first), realised / exact at each t and over all of them (sums over t)."""
    lines = ["| factor (t_f) | " + " | ".join(f"t={t}" for t in times) + " | realised / exact, all t |",
             "|---|" + "---|" * (len(times) + 1)]
    share = realised_share(realised, exact)
    for f in sorted(range(len(loss_times)), key=lambda f: -loss_times[f]):
        cells = [f"{a:.3f} / {b:.3f}" for a, b in zip(realised[f], exact[f])]
        lines.append(f"| {gen.factor_names[f]} ({loss_times[f]}) | " + " | ".join(cells) + f" | {share[f]:.2f} |")
    return "\n".join(lines)


class LabelledEncoder(torch.nn.Module):
    """E and a linear head on z: (B, 3, S, S) -> (B, sum_f n_f) logits, one head per factor, the interface of
    editing.FactorClassifier (so its loss and accuracy apply)."""

    def __init__(self, num_values, size, z_dim):
        super().__init__()
        self.num_values = list(num_values)
        self.encoder, self.head = Encoder(size, z_dim), torch.nn.Linear(z_dim, sum(self.num_values))

    def forward(self, x):
        return self.head(self.encoder(x))

    predict = editing.FactorClassifier.predict


def supervised_encoder(size=16, fine_loss_time=0, steps=2000, evals=(500, 1000), batch=32, lr=1e-3, z_dim=64, seed=0,
                       n_train=20000, n_test=4000, out=None):
    """E (diti.Encoder; the claims preset's d = 64) and a linear head on z trained together with the labels,
    the sum over factors of the cross-entropy, by Adam at stage 2's batch and lr. Returns {step: test accuracy
    of the head per factor, chance-rescaled} after each step in evals and the last: what E can hold when told.
    out: also write E's weights to out/encoder.pt (train.py diti --encoder-init starts stage 2 from them)."""
    splits = data.load_synthetic(size, seed, n_train, n_test, fine_loss_time=fine_loss_time)
    train_set, test_set = splits["train"], splits["test"]
    X, Y = data.to_tensor(train_set.images), torch.from_numpy(train_set.labels)
    train.seed_everything(seed)
    model = LabelledEncoder(train_set.num_values, size, z_dim)
    opt, rng, results = torch.optim.Adam(model.parameters(), lr=lr), torch.Generator().manual_seed(seed), {}
    for step in tqdm(range(1, steps + 1), desc="supervised E"):
        rows = torch.randint(0, len(X), (batch,), generator=rng)
        opt.zero_grad(set_to_none=True)
        editing.classifier_loss(model, X[rows], Y[rows]).backward()
        opt.step()
        if step in evals or step == steps:
            accuracy = editing.classifier_accuracy(model, test_set.images, test_set.labels)
            results[step] = metrics.rescaled_accuracy(accuracy, train_set.num_values).tolist()
            model.train()
    if out:
        save_checkpoint(os.path.join(out, "encoder.pt"), dict(kind="encoder", encoder=model.encoder.state_dict(),
                                                              steps=steps, results=json.dumps(results)))
    return splits["generator"], results


def supervised_table(gen, results, batch=32):
    head = "| steps | images | " + " | ".join(name.replace("_", " ") for name in gen.factor_names) + " |"
    rows = [f"| {step} | {step * batch} | " + " | ".join(f"{v:.2f}" for v in results[step]) + " |"
            for step in sorted(results)]
    return "\n".join([head, "|" + "---|" * (len(gen.factor_names) + 2)] + rows)


def step_list(text, flag):
    """'500,1000' -> (500, 1000): the steps an --*-evals flag names, or a one-line error."""
    try:
        return tuple(int(s) for s in text.split(",") if s)
    except ValueError:
        raise SystemExit(f"error: {flag} must be steps separated by commas, e.g. 500,1000, got {text!r}")


def main(argv=None):
    p = argparse.ArgumentParser(description="What the DiTi loss pays for each factor of the built-in data, by t.")
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--fine-loss-time", type=int, default=0, help="as train.py dm --fine-loss-time (0 = off)")
    p.add_argument("--n", type=int, default=128, help="images drawn from the data")
    p.add_argument("--gamma", type=float, default=0.1, help="PDAE's gamma of the loss weight (paper 0.1)")
    p.add_argument("--oracle", metavar="DM_CKPT", help="train G on this frozen DDPM with z = the true labels and "
                   "compare what it realises of each factor with what the exact denoiser allows")
    p.add_argument("--oracle-steps", type=int, default=20000)
    p.add_argument("--oracle-evals", default="2000,5000,10000", help="steps at which to measure as well")
    p.add_argument("--oracle-n", type=int, default=256, help="images the oracle's realised gains are measured on")
    p.add_argument("--position-embedding", action="store_true",
                   help="beyond the paper: the oracle's G with a learned position map (train.py diti --position-embedding true)")
    p.add_argument("--out", default="runs/oracle", help="the oracle's folder (resumes from its oracle.pt); with "
                   "--supervised-encoder, where its encoder.pt is written")
    p.add_argument("--supervised-encoder", type=int, default=0, metavar="STEPS",
                   help="train E with the labels (a linear head on z) for this many steps and print what it reads")
    p.add_argument("--supervised-evals", default="500,1000", help="steps at which to measure as well")
    a = p.parse_args(argv)
    if a.supervised_encoder < 0:
        raise SystemExit(f"error: --supervised-encoder must be a number of steps >= 1, got {a.supervised_encoder}")
    if a.supervised_encoder and a.size % 16:
        raise SystemExit(f"error: --supervised-encoder needs a --size divisible by 16 (E halves the image four times), "
                         f"got {a.size}")
    if a.supervised_encoder:
        evals = step_list(a.supervised_evals, "--supervised-evals")
        gen, results = supervised_encoder(a.size, a.fine_loss_time, a.supervised_encoder, evals=evals, out=a.out)
        print(f"E trained with the labels (a linear head on z, batch 32, lr 1e-3), {a.size} px"
              + (f", --fine-loss-time {a.fine_loss_time}" if a.fine_loss_time else "")
              + ": test accuracy of the head, chance-rescaled (chance = 0, perfect = 1)\n")
        print(supervised_table(gen, results))
        print(f"\nE's weights: {os.path.join(a.out, 'encoder.pt')} (train.py diti --encoder-init)")
        return
    try:
        if a.oracle:
            return oracle_main(a)
    except config.UserError as e:
        raise SystemExit(f"error: {e}")
    gen = synthetic.Synthetic(a.size, 0, fine_loss_time=a.fine_loss_time)
    loss_times = [int(v) for v in synthetic.attribute_loss_curves(gen)[1]]
    result = factor_gains(gen, a.n, gamma=a.gamma)
    print(f"Weighted eps error (weight_t, gamma {a.gamma}, x SNR_t x ||.||^2 summed over pixels, mean over {a.n} "
          f"images) that knowing one factor removes under the exact denoiser; {a.size} px"
          + (f", --fine-loss-time {a.fine_loss_time}" if a.fine_loss_time else "") + ":\n")
    print(gains_table(gen, result, loss_times))


def oracle_main(a):
    evals = set(step_list(a.oracle_evals, "--oracle-evals"))
    gen, results = train_oracle(a.oracle, a.oracle_steps, a.out, evals=evals, gamma=a.gamma, n_eval=a.oracle_n,
                                position_embedding=a.position_embedding)
    loss_times = [int(v) for v in synthetic.attribute_loss_curves(gen)[1]]
    exact = marginal_gains(gen, a.n, gamma=a.gamma)
    text = ["# What G realises of each factor with z = the true labels (gains.py --oracle)", "",
            f"    python gains.py --oracle {a.oracle} --oracle-steps {a.oracle_steps} --out {a.out}"
            + (f" --gamma {a.gamma:g}" if a.gamma != 0.1 else "")
            + (" --position-embedding" if a.position_embedding else ""), "",
            "Weighted eps error (weight_t, gamma %g, summed over pixels, mean over images) that knowing factor f "
            "removes when every other factor is known: realised by the oracle G / allowed by the exact denoiser."
            % a.gamma]
    steps = sorted(results, key=int)
    for step in steps:
        text += ["", f"After {int(step)} steps:", "", oracle_table(gen, results[step], exact, loss_times)]
    text = "\n".join(text) + "\n"
    with open(os.path.join(a.out, "oracle.md"), "w") as f:
        f.write(text)
    share = np.stack([realised_share(results[s], exact) for s in steps], 1)                  # (F, steps)
    order = sorted(range(len(exact)), key=lambda f: -loss_times[f])
    plots.line_plot([int(s) for s in steps], [share[f] for f in order],
                    [f"{gen.factor_names[f]} ({loss_times[f]})" for f in order], os.path.join(a.out, "oracle.png"),
                    title="oracle G: realised / exact gain of each factor (t_f)", xlabel="steps",
                    ylim=(min(-0.1, np.min(share)), max(1.1, np.max(share))))
    print(text)


if __name__ == "__main__":
    main()
