"""Teaching with diti: a student copy of the project with chosen functions blanked, and the experiment of
each assignment of ASSIGNMENTS.md with the figure it prints.

    python assign.py --list                                          # the blankable functions, by assignment
    python assign.py --assignment 3 --out ../diti-a3                 # a copy with assignment 3's functions blanked
    python assign.py --blank diti.cumulative_mask diffusion.q_sample --out ../diti-student
    python assign.py --check 3                                       # assignment 3's experiment and its figure

A blanked function keeps its decorators, signature and docstring; its body becomes
`raise NotImplementedError("assignment: diti.cumulative_mask, see ASSIGNMENTS.md §3")`. Functions are found by
name (module.function or module.Class.method) with `ast`: the reference source carries no markers, and every
other byte of a file is copied as it is. Which assignment a function belongs to is read from the `Blanks:` line
of each section of ASSIGNMENTS.md. The student grades a solution with `python -m pytest -k <function name>`.
"""
import argparse
import ast
import difflib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SKIP_DIRS = {".git", "runs", "__pycache__", ".pytest_cache", ".diti_cache", ".benchmarks", ".venv", "venv"}
RUNS = ROOT / "runs" / "assign"          # where --check keeps its models (runs/ is not copied, not tracked)


class UserError(Exception):
    """A problem with the command; shown as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------------
# The assignments and the functions they blank, as ASSIGNMENTS.md states them

def read_assignments(path=ROOT / "ASSIGNMENTS.md"):
    """{n: (title, [function names])} from the sections '## n. Title' and their line '**Blanks:** `a.b`, ...'."""
    if not Path(path).exists():
        return {}
    out, n = {}, None
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        heading = re.match(r"## (\d+)\. (.+)", line)
        if heading:
            n = int(heading.group(1))
            out[n] = (heading.group(2).strip(), [])
        elif n is not None and line.startswith("**Blanks:**"):
            out[n][1].extend(re.findall(r"`([\w.]+)`", line))
    return out


def assignment_of(assignments):
    """function name -> assignment number."""
    return {name: n for n, (_, names) in assignments.items() for name in names}


def grading_tests(names):
    """The pytest -k expression that selects the tests of these functions (named after them)."""
    return " or ".join(dict.fromkeys(name.split(".")[-1] for name in names))


# ----------------------------------------------------------------------------------------------------------
# Finding functions by name

def source_modules(root=ROOT):
    """The project's modules: the .py files at the top of root, {module name: path}."""
    return {p.stem: p for p in sorted(Path(root).glob("*.py"))}


def definitions(tree, module):
    """{'module.function': node, 'module.Class.method': node} for a module's top-level definitions."""
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found[f"{module}.{node.name}"] = node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found[f"{module}.{node.name}.{item.name}"] = item
    return found


def all_functions(root=ROOT):
    """Every blankable name of the project, sorted."""
    return sorted(name for module, path in source_modules(root).items()
                  for name in definitions(ast.parse(path.read_text(encoding="utf-8")), module))


def check_names(names, root=ROOT):
    """Raise UserError naming the close names for the first name that is not a function of the project."""
    known = all_functions(root)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
            hint = f"close names: {', '.join(close)}" if close else "see python assign.py --list"
            raise UserError(f"unknown function '{name}' (give module.function or module.Class.method); {hint}")


# ----------------------------------------------------------------------------------------------------------
# Blanking: replace a body by one raise, by line ranges, keeping everything else byte for byte

def docstring_of(node):
    """The docstring statement of a function, or None."""
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first
    return None


def blank_source(text, nodes, message_of):
    """text with each function's body replaced by `raise NotImplementedError(message_of(name))`, keeping its
    decorators, signature and docstring. The lines replaced run from the first statement after the docstring
    (with the comment lines just above it) to the function's last line. nodes: {name: its ast node in text}."""
    lines = text.split("\n")
    for name, node in sorted(nodes.items(), key=lambda item: -item[1].lineno):     # bottom up: numbers hold
        raise_line = f"raise NotImplementedError(\"{message_of(name)}\")"
        doc = docstring_of(node)
        code = node.body[1:] if doc else node.body
        if not code:                                           # only a docstring: add the raise after it
            lines.insert(doc.end_lineno, lines[doc.lineno - 1][:doc.col_offset] + raise_line)
            continue
        stmt = code[0]
        before = lines[stmt.lineno - 1].encode("utf-8")[:stmt.col_offset].decode("utf-8")   # offsets are bytes
        if stmt.lineno == node.lineno:                         # `def f(x): return x` keeps `def f(x): `
            lines[node.lineno - 1] = before + raise_line
            continue
        first, last = stmt.lineno, node.end_lineno
        while first - 1 > (doc.end_lineno if doc else node.lineno) and lines[first - 2].strip()[:1] in ("#", ""):
            first -= 1
        indent = before
        ending = "\r" if lines[last - 1].endswith("\r") else ""
        lines[first - 1:last] = [indent + raise_line + ending]
    return "\n".join(lines)


def blank_files(root, names, message_of):
    """{path relative to root: new text} for the files holding the named functions."""
    by_module = {}
    for name in names:
        by_module.setdefault(name.split(".")[0], []).append(name)
    out = {}
    for module, members in by_module.items():
        path = source_modules(root)[module]
        text = path.read_bytes().decode("utf-8")
        found = definitions(ast.parse(text), module)
        new = blank_source(text, {name: found[name] for name in members}, message_of)
        ast.parse(new)                                         # the copy must still be valid Python
        out[path.relative_to(root).as_posix()] = new
    return out


# ----------------------------------------------------------------------------------------------------------
# The student copy

def project_files(root=ROOT, exclude=None):
    """The files of the project, relative to root: what git tracks plus untracked files it does not ignore
    (so not runs/ or caches), or, outside a git checkout, a walk that skips SKIP_DIRS, *.pyc and *.tmp*."""
    exclude = Path(exclude).resolve() if exclude else None
    try:
        listed = subprocess.run(["git", "-C", str(root), "ls-files", "-co", "--exclude-standard", "-z"],
                                capture_output=True, check=True).stdout.decode().split("\0")
        files = [Path(f) for f in listed if f and (Path(root) / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        files = [p.relative_to(root) for p in Path(root).rglob("*")
                 if p.is_file() and not SKIP_DIRS & set(p.relative_to(root).parts[:-1])
                 and p.suffix != ".pyc" and ".tmp" not in p.name]
    if exclude is not None:
        files = [f for f in files if exclude not in (Path(root) / f).resolve().parents]
    return sorted(files)


def make_copy(names, out, root=ROOT):
    """Copy the project to out with the named functions blanked. Returns the blanked files' paths."""
    names = list(dict.fromkeys(names))
    check_names(names, root)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty: choose a new folder for the copy")
    numbers = assignment_of(read_assignments(Path(root) / "ASSIGNMENTS.md"))

    def message(name):
        where = f"ASSIGNMENTS.md §{numbers[name]}" if name in numbers else "ASSIGNMENTS.md"
        return f"assignment: {name}, see {where}"

    blanked = blank_files(root, names, message)
    for rel in project_files(root, exclude=out):
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel.as_posix() in blanked:
            target.write_bytes(blanked[rel.as_posix()].encode("utf-8"))
            shutil.copymode(Path(root) / rel, target)
        else:
            shutil.copy2(Path(root) / rel, target)
    return sorted(blanked)


# ----------------------------------------------------------------------------------------------------------
# The experiments of the assignments: each prints the figure ASSIGNMENTS.md states for a correct solution.
# They import the project only when run, so a copy with blanked functions still lists and copies.

def check_schedule(seed, fresh):
    """§1: the schedule's landmarks, and x_t of built-in images drawn with q_sample against the closed form."""
    import numpy as np
    import torch
    import diffusion
    import synthetic
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
    import synthetic
    gen = synthetic.Synthetic()
    dist = synthetic.factor_distances(gen, n_pairs=256, seed=seed)
    curves, loss_times = synthetic.loss_curves(dist)
    print(f"{'factor':<12} {'||dx||':>7} {'t_f':>5} {'subset of t_f (k=8)':>20}")
    for f in sorted(range(len(loss_times)), key=lambda f: loss_times[f]):
        print(f"{gen.factor_names[f]:<12} {sorted(dist[f])[len(dist[f]) // 2]:>7.3f} {loss_times[f]:>5d} "
              f"{min(loss_times[f] * 8 // 1000, 7):>20d}")
    RUNS.mkdir(parents=True, exist_ok=True)
    print(f"TV_t curves: {synthetic.plot_tv_curves(curves, gen.factor_names, RUNS / 'tv_curves.png', loss_times)}")


def mask_picture(partition, ts, width=64):
    """One text row per t: '#' for a dim switched on, '.' for one off (d scaled to `width` columns)."""
    import torch
    from diti import cumulative_mask
    mask = cumulative_mask(partition, torch.tensor(ts))                  # (len(ts), d)
    cols = [int(c * partition.d / width) for c in range(min(width, partition.d))]
    return [f"t={t:>4} subset {partition.subset_of_t(t):>2}  " + "".join("#" if m[c] else "." for c in cols)
            for t, m in zip(ts, mask.tolist())]


def check_masks(seed, fresh):
    """§3: the t -> subset map and the cumulative masks of the uniform (d=64, k=8) and the paper partition."""
    import torch
    from diti import cumulative_mask, paper_partition, uniform_partition
    for name, part, ts in [("uniform d=64 k=8", uniform_partition(64, 8), [0, 124, 125, 250, 500, 749, 750, 999]),
                           ("paper d=512 k=64", paper_partition(), [0, 62, 63, 109, 110, 312, 313, 499, 500, 999])]:
        on = cumulative_mask(part, torch.arange(part.T)).sum(1)          # dims switched on at each t
        print(f"{name}: mean dims on over t = {on.mean().item():.2f} of {part.d}; "
              f"dim 0 is on for {int(cumulative_mask(part, torch.arange(part.T))[:, 0].sum())} time-steps, "
              f"dim {part.d - 1} for {int(cumulative_mask(part, torch.arange(part.T))[:, -1].sum())}")
        print("\n".join(mask_picture(part, ts)))


def check_partitions(seed, fresh):
    """§5: dims per subset of the uniform and the fitted partition (d=64, k=8), where each factor's t_f falls
    and how many dims its subset has, and the paper partition's stages."""
    import synthetic
    from diti import fitted_partition, paper_partition, uniform_partition
    gen = synthetic.Synthetic()
    curves, loss_times = synthetic.attribute_loss_curves(gen, n_pairs=256, seed=seed)
    parts = {"uniform": uniform_partition(64, 8), "fitted": fitted_partition(curves, 64, 8)}
    for name, part in parts.items():
        print(f"{name:<8} dims per subset: {[e - s for s, e in zip(part.starts(), part.ends)]}")
    print(f"{'factor':<12} {'t_f':>5} {'subset':>6} {'dims: uniform':>14} {'fitted':>7}")
    for f in sorted(range(len(loss_times)), key=lambda f: loss_times[f]):
        i = min(int(loss_times[f]) * 8 // 1000, 7)
        sizes = [part.ends[i] - part.starts()[i] for part in parts.values()]
        print(f"{gen.factor_names[f]:<12} {loss_times[f]:>5d} {i:>6d} {sizes[0]:>14d} {sizes[1]:>7d}")
    paper = paper_partition()
    stages = [(0, 10), (10, 35), (35, 362), (362, 462), (462, 512)]
    print("paper (k=64, d=512): " + ", ".join(f"dims [{a},{b}) from t = {paper.t_range(paper.starts().index(a))[0]}"
                                              for a, b in stages))



# ---- the trained assignments (4, 6, 7): one small frozen DDPM, then DiTi models on it ----------------------
ASSIGN_DM = dict(base_channels=16, channel_mult=(1, 2, 2), attn_resolutions=(), batch_size=32, lr=1e-3, steps=800,
                 ema_decay=0.99, precision="fp32", sample_steps=10, ckpt_every=800)
ASSIGN_DITI = dict(k=8, z_dim=32, batch_size=32, lr=5e-4, steps=400, ema_decay=0.99, precision="fp32",
                   ckpt_every=400)


def trained(stage, name, fields, retrain=False):
    """The checkpoint runs/assign/<name>/ckpt.pt of `train.py <stage>` with these config fields: reused when
    it is complete, else trained (from scratch) here."""
    import train
    cfg = train.STAGES[stage](**fields, out=str(RUNS / name))
    path = Path(cfg.out) / "ckpt.pt"
    if path.exists() and not retrain and train.load_checkpoint(str(path), kind=stage)["step"] >= cfg.steps:
        return str(path)
    if path.exists():
        path.unlink()
    print(f"training {name}: python train.py {stage} " + " ".join(
        f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in fields.items()
        if k not in ("precision", "ckpt_every", "sample_steps")) + f" --out {cfg.out}")
    {"dm": train.train_dm, "diti": train.train_diti}[stage](cfg)
    return str(path)


def trained_diti(seed, mode="base", retrain=False):
    """(EMA DiTi model, frozen U-Net, checkpoint) of the assignments' DiTi with this seed and mode."""
    import train
    dm = trained("dm", "dm", ASSIGN_DM)
    path = trained("diti", f"diti_{mode}_s{seed}", dict(ASSIGN_DITI, dm=dm, mode=mode, seed=seed), retrain)
    return train.load_diti(path)


def built_in_data():
    import data
    return data.load_synthetic(size=32, seed=0, n_train=20000)


def encode(model, images, batch_size=500):
    """uint8 images (N, H, W, 3) -> z (N, d) numpy."""
    import numpy as np
    import torch
    import data
    with torch.no_grad():
        return np.concatenate([model.encode(data.to_tensor(images[i:i + batch_size])).numpy()
                               for i in range(0, len(images), batch_size)])


def full_z_probe(model, ds, n_train=2000, n_test=1000):
    """Rescaled held-out accuracy (chance 0, perfect 1) of one linear probe on all of z, per factor."""
    import metrics
    z_train, z_test = encode(model, ds["train"].images[:n_train]), encode(model, ds["test"].images[:n_test])
    result = metrics.fit_probe(z_train, ds["train"].labels[:n_train], None, None, z_test,
                               ds["test"].labels[:n_test], "multiclass", num_values=ds["train"].num_values)
    return result["rescaled"]


def check_loss(seed, fresh):
    """§4: which dims of z get gradient at t in each mode; then DiTi trained in both modes (always retrained:
    the loss is what is checked): its loss per t range and a full-z probe per factor."""
    import numpy as np
    import torch
    from diti import condition, uniform_partition
    part, ts = uniform_partition(8, 4), torch.tensor([100, 300, 600, 900])
    print("gradient reaching z (d=8, k=4), '#' = nonzero:")
    for mode in ("base", "stop_grad"):
        z = torch.ones(4, 8, requires_grad=True)
        condition(z, ts, part, mode).sum().backward()
        print(f"  {mode:<9} " + "  ".join(f"t={t}: " + "".join("#" if g else "." for g in row)
                                          for t, row in zip(ts.tolist(), (z.grad != 0).tolist())))
    ds, rows = built_in_data(), {}
    for mode in ("base", "stop_grad"):
        model, _, ck = trained_diti(seed, mode, retrain=True)
        hist_sum, hist_count = (torch.as_tensor(h).view(4, 5).sum(1) for h in ck["hist"])   # 20 buckets -> 4
        rows[mode] = (np.mean([r["loss"] for r in ck["log"][-50:]]), (hist_sum / hist_count).tolist(),
                      full_z_probe(model, ds))
    print(f"{'mode':<10} {'loss, last 50 steps':>20}  loss by t range (0-249, 250-499, 500-749, 750-999)")
    for mode, (loss, by_t, _) in rows.items():
        print(f"{mode:<10} {loss:>20.5f}  " + "  ".join(f"{v:.5f}" for v in by_t))
    print("full-z probe, rescaled accuracy (chance 0, perfect 1):")
    names = ds["train"].factor_names
    print(f"{'mode':<10} " + " ".join(f"{n[:9]:>9}" for n in names))
    for mode, (_, _, probe) in rows.items():
        print(f"{mode:<10} " + " ".join(f"{v:>9.2f}" for v in probe))


def check_counterfactual(seed, fresh, pairs=16, steps=10):
    """§6: for pairs differing in one factor, invert A, move one range of subsets (early / middle / late) from
    z_A towards z_B and decode. transfer = <x_edit - x_A_rec, x_B - x_A> / ||x_B - x_A||^2: 0 = nothing of B's
    factor came over, 1 = all of it. Last row: all of z moved, and x_T = slerp(x_T_A, x_T_B, alpha)."""
    import numpy as np
    import torch
    import data
    import diffusion
    import editing
    from diti import shifted_eps_fn
    from plots import save_grid
    model, unet, _ = trained_diti(seed, "base", fresh)
    gen, sched, part = data.Synthetic(), diffusion.linear_schedule(), model.partition
    rng, alphas, grid = np.random.default_rng([seed, 6]), [0.0, 0.5, 1.0], []
    groups = [(name, np.concatenate([np.arange(part.starts()[i], part.ends[i]) for i in members]))
              for name, members in editing.unit_ranges(part.k)] + [("all+slerp", np.arange(part.d))]

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
              + "  ".join(f"{c[0]:>5.2f}/{c[1]:<5.2f}" for c in cells))
    RUNS.mkdir(parents=True, exist_ok=True)
    path = save_grid(data.to_uint8(torch.cat(grid)), RUNS / f"counterfactual_s{seed}.png", nrow=5)
    print(f"rows: (factor, range) as above; columns: A, A reconstructed, alpha 0.5, alpha 1, B: {path}")


def check_few_shot(seed, fresh, shots=(5, 10, 20, 50), runs=10):
    """§7: few-shot accuracy of a linear classifier on all of z against one on the dims switched on at the
    factor's loss time t_f (the intervention: only subsets up to idx(t_f)), mean over `runs` draws."""
    import numpy as np
    import metrics
    import synthetic
    from diti import cumulative_mask
    import torch
    model, _, _ = trained_diti(seed, "base", fresh)
    ds, part = built_in_data(), model.partition
    _, loss_times = synthetic.attribute_loss_curves(synthetic.Synthetic(), n_pairs=256, seed=0)
    z_train, z_test = encode(model, ds["train"].images[:5000]), encode(model, ds["test"].images[:2000])
    y_train, y_test = ds["train"].labels[:5000], ds["test"].labels[:2000]
    print(f"{'factor':<12} {'t_f':>4} {'dims':>5}  " + "  ".join(f"{n:>2}-shot full / t_f" for n in shots))
    for factor in ("hue", "size", "shape", "y_position"):
        f = ds["train"].factor_names.index(factor)
        dims = np.flatnonzero(cumulative_mask(part, torch.tensor([int(loss_times[f])]))[0].numpy())
        full = metrics.few_shot(z_train, y_train, z_test, y_test, f, shots, runs, seed=seed)
        early = metrics.few_shot(z_train, y_train, z_test, y_test, f, shots, runs, dims=dims, seed=seed)
        print(f"{factor:<12} {loss_times[f]:>4d} {len(dims):>5d}  "
              + "  ".join(f"{full[n][0]:>8.3f} / {early[n][0]:.3f}" for n in shots))



# ----------------------------------------------------------------------------------------------------------
# The command line

def list_assignments(root=ROOT):
    """One block per assignment: its functions and the command that grades them."""
    rows = []
    for n, (title, names) in sorted(read_assignments(Path(root) / "ASSIGNMENTS.md").items()):
        rows += [f"§{n} {title}", f"    blanks: {', '.join(names)}",
                 f"    grade:  python -m pytest -q -k \"{grading_tests(names)}\"",
                 f"    figure: python assign.py --check {n}"]
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description="Student copies with blanked functions, and the assignments' checks.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", action="store_true", help="the blankable functions of each assignment")
    what.add_argument("--blank", nargs="+", metavar="NAME", help="module.function or module.Class.method")
    what.add_argument("--assignment", nargs="+", type=int, metavar="N", help="blank every function of these")
    what.add_argument("--check", type=int, metavar="N", help="run assignment N's experiment, print its figure")
    p.add_argument("--out", help="the folder for the copy (new or empty)")
    p.add_argument("--seed", type=int, default=0, help="--check: the seed of the experiment")
    p.add_argument("--fresh", action="store_true", help="--check: retrain the models it would reuse")
    p.error = lambda message: (_ for _ in ()).throw(UserError(f"{message}: see python assign.py --help"))
    a = p.parse_args(argv)
    assignments = read_assignments()
    if a.list:
        print(list_assignments())
        return
    if a.check is not None:
        if a.check not in CHECKS:
            raise UserError(f"no check for assignment {a.check}: choose one of {', '.join(map(str, CHECKS))}")
        import torch
        torch.set_num_threads(1)          # reproducible numbers, and the fastest on a busy 2-core machine
        start = time.time()
        CHECKS[a.check](a.seed, a.fresh)
        print(f"[assignment {a.check}, seed {a.seed}: {time.time() - start:.0f} s]")
        return
    if not a.out:
        raise UserError("say where the copy goes: --out <new folder>")
    if a.assignment:
        unknown = [n for n in a.assignment if n not in assignments]
        if unknown:
            raise UserError(f"no assignment {unknown[0]} in ASSIGNMENTS.md: choose from {sorted(assignments)}")
        names = [name for n in a.assignment for name in assignments[n][1]]
    else:
        names = a.blank
    blanked = make_copy(names, a.out)
    print(f"copied the project to {a.out}; blanked {len(names)} function(s) in {', '.join(blanked)}")
    print(f"grade with: cd {a.out} && python -m pytest -q -k \"{grading_tests(names)}\"")


def cli(argv=None):
    try:
        main(argv)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


CHECKS = {1: check_schedule, 2: check_attribute_loss, 3: check_masks, 4: check_loss, 5: check_partitions,
          6: check_counterfactual, 7: check_few_shot}


if __name__ == "__main__":
    sys.exit(cli())
