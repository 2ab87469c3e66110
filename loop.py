"""The training loop every stage shares (train.py's DDPM and DiTi, disdiff.py's DisDiff): Adam, EMA, the t and
eps draws, atomic checkpoints with exact resume, and data parallelism over torchrun's processes."""
import copy
import json
import math
import os
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from checkpoint import (check_same_data, check_same_model, config_diff, load_checkpoint, rng_state,
                        save_checkpoint, set_rng_state)
from config import UserError
from plots import bar_plot
from runtime import autocast, average_gradients, gather_rows, mean_over_ranks


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


def ema_decay_at(decay, step):
    """EMA decay with a warm-up, min(decay, (1 + step) / (10 + step)), so that short runs (the CPU presets) do
    not average in their random initialisation; from a few thousand steps on it is the configured decay."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, all weights in one fused call; buffers copied."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def draw_noise(gen, x0, T, rank, world):
    """t (B / world,) and eps (B / world, C, H, W) for this rank's rows of the global batch of B rows. Both are
    drawn for all B rows from `gen`, seeded alike on every rank, and sliced like the batch stream (rows rank,
    rank + world, ...), so row i gets the same t and eps under any number of processes."""
    B = x0.shape[0] * world
    t = torch.randint(0, T, (B,), generator=gen, device=gen.device)
    eps = torch.randn((B, *x0.shape[1:]), generator=gen, device=gen.device)
    return t[rank::world].to(x0.device), eps[rank::world].to(x0.device)


def fit(cfg, kind, model, loss_fn, stream, device, rank, world, resume, extra, make_opt=None, lr_at=None,
        hold=None):
    """Adam + EMA + atomic checkpoints + exact resume + data parallelism over `world` processes.
    loss_fn(model, x0, t, eps) -> (loss, per_sample, t, logs), with x0 this rank's rows of the batch and t, eps
    their time-steps and noise (see draw_noise: the same for a row under any number of processes).
    `extra` goes into every checkpoint (configs, the frozen model's path). Returns the EMA model.
    Optional: make_opt(params) -> optimizer instead of Adam(lr=cfg.lr); lr_at(step) -> lr set before each step;
    hold = (params, steps): those params get no update (and no Adam state) before step `steps`."""
    ckpt_path, ck = os.path.join(cfg.out, "ckpt.pt"), None
    if os.path.exists(ckpt_path):                                   # checked first: a wrong command fails at once
        if not resume:
            raise UserError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out")
        ck = load_checkpoint(ckpt_path, kind=kind)
        check_same_model(ck, extra, ckpt_path)
        check_same_data(ck, cfg, ckpt_path)
    elif resume and rank == 0:
        print(f"no checkpoint at {ckpt_path} yet: starting at step 0")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_opt(params) if make_opt else torch.optim.Adam(params, lr=cfg.lr)
    if world > 1:
        for tensor in [*model.parameters(), *model.buffers()]:     # every rank starts from rank 0's weights
            dist.broadcast(tensor.data, 0)
    ema = copy.deepcopy(model).requires_grad_(False)
    noise = torch.Generator(device=device).manual_seed(cfg.seed)    # t and eps: identical on every rank
    hist, start, log, saved = LossByTime(), 0, [], None
    if ck is not None:
        try:
            model.load_state_dict(ck["model"]), ema.load_state_dict(ck["ema"])
        except RuntimeError:
            raise UserError(f"{ckpt_path} holds a model of another shape than these flags build "
                            f"({config_diff(ck['config'], asdict(cfg)) or 'same flags'}): resume with the flags "
                            f"it was trained with, or choose another --out")
        scales = [group.get("lr_scale", 1.0) for group in opt.param_groups]
        try:
            opt.load_state_dict(ck["opt"])
        except ValueError:
            raise UserError(f"{ckpt_path} was trained with another optimiser setup than these flags build "
                            f"({config_diff(ck['config'], asdict(cfg)) or 'same flags'}): resume with the "
                            f"flags it was trained with, or choose another --out") from None
        for group, scale in zip(opt.param_groups, scales):         # the command line's --lr (and lr scale) apply
            group["lr_scale"], group["lr"] = scale, cfg.lr * scale
        start, log, saved = ck["step"], ck["log"], ck["step"]
        hist.sum, hist.count = ck["hist"]
        if len(ck["rng"]) != world and rank == 0:
            print(f"warning: {ckpt_path} was written by {len(ck['rng'])} process(es), this run has {world}: "
                  f"continuing (batches, t and eps repeat; dropout's random draws will not)")
        set_rng_state(ck["rng"][rank % len(ck["rng"])], stream, noise)
        if rank == 0:
            print(f"resumed {ckpt_path} at step {start}")

    def checkpoint(step):
        """Every rank calls this (the RNG states are gathered); rank 0 writes."""
        if not all(torch.isfinite(p).all() for p in params):
            raise UserError(f"the {kind} weights became inf/nan at step {step}: stopped without saving; "
                            f"{last_good()} (lower --lr or use --precision fp32, then --resume)")
        rng = [rng_state(stream, noise)]
        if world > 1:
            rng = [None] * world
            dist.all_gather_object(rng, rng_state(stream, noise))
        if rank == 0:
            save_checkpoint(ckpt_path, dict(kind=kind, step=step, model=model.state_dict(), ema=ema.state_dict(),
                                            opt=opt.state_dict(), log=log, hist=(hist.sum, hist.count), rng=rng,
                                            config=asdict(cfg), **extra))
            with open(os.path.join(cfg.out, "log.json"), "w") as f:     # the losses so far, to read
                json.dump(log, f)

    def last_good():
        if saved is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint {ckpt_path} (step {saved}) is intact"

    pending = []       # the last steps' (step, log names, [loss, *logs], per-sample losses, t), on the device

    def read_pending():
        """Read the pending steps' figures off the device in one go (a read per step makes the CPU wait for the
        GPU every step), stop at the first non-finite loss, and log them in order."""
        if not pending:
            return
        steps, names, figures, per_sample, t = zip(*pending)
        figures, per_sample, t = torch.stack(figures).tolist(), torch.stack(per_sample).cpu(), torch.stack(t).cpu()
        for step, keys, (loss_value, *values), rows, rows_t in zip(steps, names, figures, per_sample, t):
            if not math.isfinite(loss_value):
                raise UserError(f"the {kind} loss became {loss_value} at step {step + 1}: stopped; {last_good()} "
                                f"(lower --lr or use --precision fp32, then --resume)")
            hist.add(rows, rows_t)
            log.append(dict(step=step + 1, loss=loss_value, **dict(zip(keys, values))))
        pending.clear()

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=kind, disable=rank != 0,
               dynamic_ncols=True)
    tick = time.time()
    for step in bar:
        x0 = next(stream).to(device, non_blocking=True)                 # (B / world, 3, H, W)
        t, eps = draw_noise(noise, x0, hist.T, rank, world)
        with autocast(device, cfg.precision):
            loss, per_sample, t, logs = loss_fn(model, x0, t, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if hold and step < hold[1]:
            for p in hold[0]:
                p.grad = None                                            # Adam skips a parameter with no grad
        if world > 1:
            average_gradients(params, world)
        if lr_at:
            for group in opt.param_groups:
                group["lr"] = lr_at(step) * group.get("lr_scale", 1.0)
        opt.step()
        ema_update(ema, model, ema_decay_at(cfg.ema_decay, step))
        figures = torch.stack([loss.detach().double()] + [torch.as_tensor(v, dtype=torch.float64, device=device)
                                                          .detach().reshape(()) for v in logs.values()])
        pending.append((step, list(logs), mean_over_ranks(figures, world),    # the whole batch's loss and logs
                        gather_rows(per_sample.detach(), world), gather_rows(t, world)))
        last = (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps
        if (step + 1) % 10 == 0 or last:
            read_pending()
        if rank == 0 and (step + 1) % 10 == 0:
            rate = 10 * cfg.batch_size / (time.time() - tick)
            bar.set_postfix(loss=f"{log[-1]['loss']:.4f}", img_s=f"{rate:.0f}")
            tick = time.time()
        if last:
            checkpoint(step + 1)
            saved = step + 1
    if rank == 0 and cfg.steps > start:
        hist.save_png(os.path.join(cfg.out, "loss_by_t.png"), f"{kind}: loss per time-step bucket")
    return ema


def make_stream(cfg, dataset, rank, world):
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} must divide evenly over {world} processes")
    stream = data.BatchStream(dataset, cfg.batch_size, seed=cfg.seed, flip=cfg.flip)
    return stream.shard(rank, world) if world > 1 else stream
