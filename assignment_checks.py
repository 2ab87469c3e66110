"""The experiment of each assignment of ASSIGNMENTS.md and the figure it prints (`python assign.py --check n`).

Assignments 1, 2, 3 and 5 are closed forms and tables; 4, 6 and 7 train small models first (a frozen DDPM shared
by all, then DiTi on it) into runs/assign/, reused while complete. Every figure is a function of --seed.
"""
import time
from pathlib import Path

import numpy as np
import torch

import checkpoint
import config
import data
import diffusion
import editing
import plots
import probes
import synthetic
import train
from diti import (condition, cumulative_mask, diti_loss, fitted_partition, paper_partition, shifted_eps_fn,
                  staged_partition, uniform_partition)
from plots import save_grid

RUNS = Path(__file__).resolve().parent / "runs" / "assign"     # not copied to a student copy, not tracked


def check_schedule(seed, fresh):
    """§1: the schedule's landmarks, and x_t of built-in images drawn with q_sample against the closed form."""
    s = diffusion.linear_schedule()
    print(f"abar_0 = {s.abar[0]:.6f}   abar_999 = {s.abar[999]:.3e}   "
          f"SNR falls below 1 at t = {int((s.snr < 1).nonzero()[0])}")
    gen = synthetic.Synthetic()
    x0 = torch.from_numpy(gen.render_float(gen.sample_labels(256, np.random.default_rng(seed)))).float()
    x0 = x0.permute(0, 3, 1, 2)                                           # (256, 3, 32, 32) in [-1, 1]
    g = torch.Generator().manual_seed(seed)
    print(f"{'t':>4} {'SNR_t':>9} {'corr(x_t, x_0)':>15} {'closed form':>12} {'std(x_t)':>9} {'closed form':>12}")
    for t in (0, 100, 200, 300, 500, 700, 999):
        tt = torch.full((len(x0),), t)
        xt = diffusion.q_sample(s, x0, tt, torch.randn(x0.shape, generator=g))
        a, v = s.abar[t].item(), x0.var().item()
        corr = np.corrcoef(xt.flatten().numpy(), x0.flatten().numpy())[0, 1]
        # x_t = sqrt(a) x_0 + sqrt(1 - a) eps: corr = sqrt(a v / (a v + 1 - a)), var = a v + 1 - a (+ mean shift)
        print(f"{t:>4} {s.snr[t]:>9.4f} {corr:>15.4f} {np.sqrt(a * v / (a * v + 1 - a)):>12.4f} "
              f"{xt.std().item():>9.4f} {np.sqrt(a * v + 1 - a):>12.4f}")


def check_attribute_loss(seed, fresh):
    """§2: each factor's ||x0 - x0'||, loss time t_f, and the subset idx(t_f) of k = 8 that should hold it."""
    gen = synthetic.Synthetic()
    dist = synthetic.factor_distances(gen, n_pairs=256, seed=seed)
    curves, loss_times = synthetic.loss_curves(dist)
    print(f"{'factor':<12} {'||dx||':>7} {'t_f':>5} {'subset of t_f (k=8)':>20}")
    for f in sorted(range(len(loss_times)), key=lambda f: loss_times[f]):
        print(f"{gen.factor_names[f]:<12} {np.median(dist[f]):>7.3f} {loss_times[f]:>5d} "
              f"{min(loss_times[f] * 8 // 1000, 7):>20d}")
    RUNS.mkdir(parents=True, exist_ok=True)
    print(f"TV_t curves: {plots.plot_tv_curves(curves, gen.factor_names, RUNS / 'tv_curves.png', loss_times)}")


def mask_picture(partition, ts, width=64):
    """One text row per t: '#' for a dim switched on, '.' for one off (d scaled to `width` columns)."""
    mask = cumulative_mask(partition, torch.tensor(ts))                  # (len(ts), d)
    cols = [int(c * partition.d / width) for c in range(min(width, partition.d))]
    return [f"t={t:>4} subset {partition.subset_of_t(t):>2}  " + "".join("#" if m[c] else "." for c in cols)
            for t, m in zip(ts, mask.tolist())]


def check_masks(seed, fresh):
    """§3: the t -> subset map and the cumulative masks of the uniform (d=64, k=8) and the paper partition."""
    for name, part, ts in [("uniform d=64 k=8", uniform_partition(64, 8), [0, 124, 125, 250, 500, 749, 750, 999]),
                           ("paper d=512 k=64", paper_partition(), [0, 62, 63, 109, 110, 312, 313, 499, 500, 999])]:
        on = cumulative_mask(part, torch.arange(part.T)).sum(1)          # dims switched on at each t
        print(f"{name}: mean dims on over t = {on.mean().item():.2f} of {part.d}; "
              f"dim 0 is on for {int(cumulative_mask(part, torch.arange(part.T))[:, 0].sum())} time-steps, "
              f"dim {part.d - 1} for {int(cumulative_mask(part, torch.arange(part.T))[:, -1].sum())}")
        print("\n".join(mask_picture(part, ts)))


def check_partitions(seed, fresh):
    """§5: three ways to cut z (d=64) into k=8 subsets, and what each gives the built-in factors: the subset
    idx(t_f) a factor is lost in, that subset's dims, and the dims switched on at t_f. Then the paper's."""
    gen = synthetic.Synthetic()
    curves, loss_times = synthetic.attribute_loss_curves(gen, n_pairs=256, seed=seed)
    parts = {"uniform": uniform_partition(64, 8), "staged": staged_partition(8, (250, 500, 1000), (8, 40, 16)),
             "fitted": fitted_partition(curves, 64, 8)}
    print("dims per subset (d=64, k=8; staged: t ends 250/500/1000 with 8/40/16 dims; fitted to the TV curves)")
    for name, part in parts.items():
        print(f"  {name:<8} {[e - s for s, e in zip(part.starts(), part.ends)]}")
    print(f"{'factor':<12} {'t_f':>4} {'subset':>6}   own dims: uniform staged fitted"
          f"   on at t_f: uniform staged fitted")
    for f in sorted(range(len(loss_times)), key=lambda f: loss_times[f]):
        i = min(int(loss_times[f]) * 8 // 1000, 7)
        own = [part.ends[i] - part.starts()[i] for part in parts.values()]
        print(f"{gen.factor_names[f]:<12} {loss_times[f]:>4d} {i:>6d}   {'':>9}{own[0]:>8d} {own[1]:>6d} {own[2]:>6d}"
              f"   {'':>10}{parts['uniform'].ends[i]:>8d} {parts['staged'].ends[i]:>6d} {parts['fitted'].ends[i]:>6d}")
    paper = paper_partition()
    stages = [(0, 10), (10, 35), (35, 362), (362, 462), (462, 512)]
    print("paper (k=64, d=512): " + ", ".join(f"dims [{a},{b}) from t = {paper.t_range(paper.starts().index(a))[0]}"
                                              for a, b in stages))


# ---- the trained assignments (4, 6, 7): one small frozen DDPM, then DiTi models on it ----------------------
# 16 px images (corner mark and texture stay the first factors lost; per image this U-Net costs about a seventh
# of the default one at 32 px), sized so that each command takes at most 5 minutes of one core.
ASSIGN_DM = dict(image_size=16, base_channels=16, channel_mult=(1, 2, 2), attn_resolutions=(), batch_size=32,
                 lr=1e-3, steps=1500, ema_decay=0.99, precision="fp32", sample_steps=10, ckpt_every=1500)
ASSIGN_DITI = dict(k=8, z_dim=32, batch_size=32, lr=1e-3, steps=1000, ema_decay=0.99, precision="fp32",
                   ckpt_every=1000)
LOSS_CHECK_STEPS = 500           # assignment 4 trains both modes from scratch each time


def trained(stage, name, fields, retrain=False):
    """The checkpoint runs/assign/<name>/ckpt.pt of `train.py <stage>` with these config fields: reused when
    it is complete, else trained (from scratch) here."""
    cfg = config.STAGES[stage](**fields, out=str(RUNS / name))
    path = Path(cfg.out) / "ckpt.pt"
    if path.exists() and not retrain and checkpoint.load_checkpoint(str(path), kind=stage)["step"] >= cfg.steps:
        return str(path)
    if path.exists():
        path.unlink()
    flag = lambda v: (",".join(map(str, v)) or '""') if isinstance(v, tuple) else v        # noqa: E731
    print(f"training {name}: python train.py {stage} " + " ".join(
        f"--{k.replace('_', '-')} {flag(v)}" for k, v in fields.items()
        if k not in ("precision", "ckpt_every", "sample_steps")) + f" --out {cfg.out} --precision fp32")
    start = time.process_time()
    {"dm": train.train_dm, "diti": train.train_diti}[stage](cfg)
    print(f"trained {name}: {time.process_time() - start:.0f} s CPU")
    return str(path)


def trained_diti(seed, mode="base", retrain=False, steps=ASSIGN_DITI["steps"]):
    """(EMA DiTi model, frozen U-Net, checkpoint) of the assignments' DiTi with this seed, mode and steps."""
    dm = trained("dm", "dm", ASSIGN_DM)
    fields = dict(ASSIGN_DITI, dm=dm, mode=mode, seed=seed, steps=steps, ckpt_every=steps)
    return train.load_diti(trained("diti", f"diti_{mode}_{steps}_s{seed}", fields, retrain))


def check_setup(seed, fresh):
    """0: the frozen DDPM that assignments 4, 6 and 7 share, trained once (the first of them would train it)."""
    path = trained("dm", "dm", ASSIGN_DM)
    print(f"the shared frozen DDPM: {path}; its samples: {Path(path).parent / 'samples.png'}")


def built_in_data(ck):
    """The built-in data a stage-2 checkpoint was trained on (its DDPM's size, seed and number of images)."""
    cfg = ck["dm_config"]
    return data.load_synthetic(size=cfg["image_size"], seed=cfg["seed"], n_train=cfg["n_train"])


def encode(model, images, batch_size=500):
    """uint8 images (N, H, W, 3) -> z (N, d) numpy."""
    with torch.no_grad():
        return np.concatenate([model.encode(data.to_tensor(images[i:i + batch_size])).numpy()
                               for i in range(0, len(images), batch_size)])


def full_z_probe(model, ds, n_train=2000, n_test=1000):
    """Rescaled held-out accuracy (chance 0, perfect 1) of one linear probe on all of z, per factor."""
    z_train, z_test = encode(model, ds["train"].images[:n_train]), encode(model, ds["test"].images[:n_test])
    result = probes.fit_probe(z_train, ds["train"].labels[:n_train], None, None, z_test,
                               ds["test"].labels[:n_test], "multiclass", num_values=ds["train"].num_values)
    return result["rescaled"]


def check_loss(seed, fresh):
    """§4: which dims of z get gradient at t in each mode; then DiTi trained in both modes (always retrained:
    the loss is what is checked): its loss per t range and a full-z probe per factor."""
    part, ts = uniform_partition(8, 4), torch.tensor([100, 300, 600, 900])
    print("gradient reaching z (d=8, k=4), '#' = nonzero:")
    for mode in ("base", "stop_grad"):
        z = torch.ones(4, 8, requires_grad=True)
        condition(z, ts, part, mode).sum().backward()
        print(f"  {mode:<9} " + "  ".join(f"t={t}: " + "".join("#" if g else "." for g in row)
                                          for t, row in zip(ts.tolist(), (z.grad != 0).tolist())))
    rows = {}
    for mode in ("base", "stop_grad"):
        model, unet, ck = trained_diti(seed, mode, retrain=True, steps=LOSS_CHECK_STEPS)
        ds = built_in_data(ck)
        rows[mode] = (np.mean([r["loss"] for r in ck["log"][-50:]]), held_out_gain(model, unet, ds, mode, seed),
                      full_z_probe(model, ds))
    print(f"{'mode':<10} {'train loss':>10}  held-out loss / frozen DDPM's, t in 0-249, 250-499, 500-749, 750-999")
    for mode, (loss, gain, _) in rows.items():
        print(f"{mode:<10} {loss:>10.5f}  " + "  ".join(f"{v:>9.3f}" for v in gain))
    print("full-z probe, rescaled accuracy (chance 0, perfect 1):")
    names = ds["train"].factor_names
    print(f"{'mode':<10} " + " ".join(f"{n:>11}" for n in names))
    for mode, (_, _, probe) in rows.items():
        print(f"{mode:<10} " + " ".join(f"{v:>11.2f}" for v in probe))


def held_out_gain(model, unet, ds, mode, seed, n=256, ranges=4):
    """Per t range: the weighted DiTi loss of n test images over the same loss with G = 0 (the frozen DDPM
    alone), for one fixed draw of t and eps. Below 1 where z helps the decoder; 1 at initialisation."""
    sched, gen = diffusion.linear_schedule(), torch.Generator().manual_seed(seed)
    x0 = data.to_tensor(ds["test"].images[:n])
    out = []
    with torch.no_grad():
        for r in range(ranges):
            t = torch.randint(r * sched.T // ranges, (r + 1) * sched.T // ranges, (n,), generator=gen)
            eps = torch.randn(x0.shape, generator=gen)
            with_z = diti_loss(model, unet, sched, x0, mode, t, eps)[1]
            alone = diffusion.pdae_weight(sched, t) * (eps - unet(diffusion.q_sample(sched, x0, t, eps), t)).pow(
                2).flatten(1).mean(1)
            out.append(float(with_z.mean() / alone.mean()))
    return out


def check_counterfactual(seed, fresh, pairs=16, steps=10):
    """§6: for pairs differing in one factor, invert A, move one range of subsets (early / middle / late) from
    z_A towards z_B and decode. transfer = <x_edit - x_A_rec, x_B - x_A> / ||x_B - x_A||^2: 0 = nothing of B's
    factor came over, 1 = all of it. Last row: all of z moved, and x_T = slerp(x_T_A, x_T_B, alpha)."""
    model, unet, ck = trained_diti(seed, "base", fresh)
    gen, sched, part = data.Synthetic(ck["dm_config"]["image_size"]), diffusion.linear_schedule(), model.partition
    rng, alphas, grid = np.random.default_rng([seed, 6]), [0.0, 0.5, 1.0], []
    groups = [(name, np.concatenate([np.arange(part.starts()[i], part.ends[i]) for i in members]))
              for name, members in editing.unit_ranges(part.k)] + [("all", np.arange(part.d)),
                                                                   ("all+slerp", np.arange(part.d))]

    def decode(z, x_T):
        return diffusion.ddim_sample(shifted_eps_fn(unet, model, z), sched, x_T, steps)

    print(f"transfer of B's factor into A, {pairs} pairs, DDIM {steps} steps; columns alpha = 0.5 / 1.0")
    print(f"{'factor':<12} {'recon MSE':>9}  " + "  ".join(f"{name:>11}" for name, _ in groups))
    for factor in ("background", "x_position", "hue"):
        a, b = gen.changed_pairs(factor, pairs, rng)
        x_A, x_B = data.to_tensor(gen.render(a)), data.to_tensor(gen.render(b))
        z_A, z_B = (torch.from_numpy(encode(model, gen.render(v))) for v in (a, b))
        with torch.no_grad():
            x_T_A = diffusion.ddim_invert(shifted_eps_fn(unet, model, z_A), sched, x_A, steps)
            x_T_B = diffusion.ddim_invert(shifted_eps_fn(unet, model, z_B), sched, x_B, steps)
            rec, cells = decode(z_A, x_T_A), []
            for name, dims in groups:
                codes = editing.interpolate_codes(z_A, z_B, dims, alphas)              # (3, B, d)
                outs = [decode(z, editing.slerp(x_T_A, x_T_B, al) if name == "all+slerp" else x_T_A)
                        for z, al in zip(codes[1:], alphas[1:])]
                diff = (x_B - x_A).flatten(1)
                cells.append([float(((o - rec).flatten(1) * diff).sum(1).div(diff.pow(2).sum(1)).mean())
                              for o in outs])
                grid += [x_A[:1], rec[:1], outs[0][:1], outs[1][:1], x_B[:1]]
        print(f"{factor:<12} {editing.reconstruction_mse(x_A, rec):>9.4f}  "
              + "  ".join(f"{f'{c[0]:.2f}/{c[1]:.2f}':>11}" for c in cells))
    RUNS.mkdir(parents=True, exist_ok=True)
    images = data.to_uint8(torch.cat(grid))
    scale = max(1, 64 // images.shape[1])                                      # nearest-neighbour, to see
    path = save_grid(images.repeat(scale, 1).repeat(scale, 2), RUNS / f"counterfactual_s{seed}.png", nrow=5)
    print(f"rows: (factor, range) as above; columns: A, A reconstructed, alpha 0.5, alpha 1, B: {path}")


def check_few_shot(seed, fresh, shots=(5, 10, 20, 50), runs=10):
    """§7: few-shot accuracy of a linear classifier on all of z against one on the dims switched on at the
    factor's loss time t_f (the intervention: only subsets up to idx(t_f)), mean over `runs` draws."""
    model, _, ck = trained_diti(seed, "base", fresh)
    ds, part = built_in_data(ck), model.partition
    _, loss_times = synthetic.attribute_loss_curves(synthetic.Synthetic(ck["dm_config"]["image_size"]), seed=0)
    z_train, z_test = encode(model, ds["train"].images[:5000]), encode(model, ds["test"].images[:2000])
    y_train, y_test = ds["train"].labels[:5000], ds["test"].labels[:2000]
    print(f"{'factor':<12} {'t_f':>4} {'dims':>5}  " + "  ".join(f"{n:>2}-shot full / t_f" for n in shots))
    for factor in ("background", "x_position", "hue"):
        f = ds["train"].factor_names.index(factor)
        dims = np.flatnonzero(cumulative_mask(part, torch.tensor([int(loss_times[f])]))[0].numpy())
        full = probes.few_shot(z_train, y_train, z_test, y_test, f, shots, runs, seed=seed)
        early = probes.few_shot(z_train, y_train, z_test, y_test, f, shots, runs, dims=dims, seed=seed)
        print(f"{factor:<12} {loss_times[f]:>4d} {len(dims):>5d}  "
              + "  ".join(f"{full[n][0]:>8.3f} / {early[n][0]:.3f}" for n in shots))


CHECKS = {0: check_setup, 1: check_schedule, 2: check_attribute_loss, 3: check_masks, 4: check_loss,
          5: check_partitions, 6: check_counterfactual, 7: check_few_shot}
