"""Speed and memory at a preset's scale: the training steps and the inference paths (GitHub issue 5).

    python bench.py                                    # quick and celeba64 at this device's default precision
    python bench.py --presets quick --precision fp32,bf16 --channels-last   # each beside the plain setting
    python bench.py --all --json runs/bench.json       # fp32/bf16 x channels_last x compile

Measured per preset (U-Net of the preset's `dm` stage; k, z_dim, partition of its `diti` stage):
  ddpm     a DDPM training step: forward, backward, Adam (stage 1)
  diti     a DiTi training step: diti_loss with the frozen U-Net, backward, Adam on E and G (stage 2)
  disdiff  a DisDiff training step (disdiff.disdiff_step, AdamW), when disdiff.py is present
  encode   encoder features z = E(x_0), no gradients
  ddim     DDIM inversion then decoding with the shift, --ddim-steps each way
Timing: --warmup untimed calls (DDIM, a call being 2 x --ddim-steps network passes: one on CUDA, else none unless
compiled), then --iters timed ones (DDIM: --ddim-iters); images/s = batch / median time. The timed calls of all
ops and settings of a preset are interleaved (round 1 of each, then round 2, ...), so that a ratio between two
of them is measured under the same load: on a shared machine that matters more than anything else here.
Peak memory: CUDA: torch.cuda.max_memory_allocated during a call (weights, optimizer state, activations).
CPU: the peak resident set size during a call above the size at its start (read every millisecond from
/proc/self/statm, after malloc_trim has handed freed heap back to the OS): activations, gradients and workspaces;
the weights and the optimizer state, allocated before, are not in it. The largest value over the timed calls.

All settings of a preset run in one subprocess. An op that crashes the interpreter (channels_last made the DiTi
backward segfault on the torch 2.13 CPU build) is recorded as crashed and the rest is run again without it; a
failed torch.compile is recorded with its reason. Neither stops the benchmark.
"""
import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys

import config

OPS = ("ddpm", "diti", "disdiff", "encode", "ddim")
OP_NAMES = {"ddpm": "DDPM step", "diti": "DiTi step", "disdiff": "DisDiff step", "encode": "encoder z = E(x0)",
            "ddim": "DDIM invert+decode"}
TAG = "@@bench "


def preset_configs(preset):
    """(DMConfig, DiTiConfig, DisDiffConfig or None) of a preset, as train.py builds them."""
    p = config.PRESETS[preset]
    return (config.DMConfig(**p.get("dm", {})), config.DiTiConfig(**p.get("diti", {})),
            config.DisDiffConfig(**p["disdiff"]) if "disdiff" in p else None)


def default_batch(preset, device):
    """The preset's batch on CUDA; on CPU at most 64 images' worth of 32 x 32 pixels (16 images at 64 px)."""
    dm, _, _ = preset_configs(preset)
    if device.type == "cuda":
        return dm.batch_size
    return max(2, min(dm.batch_size, 64 * 32 * 32 // dm.image_size ** 2))


class Skip(Exception):
    """An op that cannot run here, with the reason."""


class Setting:
    """The models of one setting (precision, channels_last, compile) of a preset, built on first use with random
    weights (the cost of a step does not depend on the values) and shared by the ops."""

    def __init__(self, preset, device, precision, channels_last, compiled, batch):
        import torch
        import diffusion
        self.dm, self.dcfg, self.discfg = preset_configs(preset)
        self.ucfg = config.unet_config(self.dm)
        self.device, self.precision, self.compiled = device, precision, compiled
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.sched = diffusion.linear_schedule().to(device)
        gen = torch.Generator().manual_seed(0)
        size = self.dm.image_size
        x0 = torch.rand(batch, 3, size, size, generator=gen) * 2 - 1
        eps = torch.randn(x0.shape, generator=gen)
        self.t = torch.randint(0, self.sched.T, (batch,), generator=gen).to(device)
        self.x0, self.eps = (a.to(device).contiguous(memory_format=self.fmt) for a in (x0, eps))
        self.cache = {}

    def once(self, name, make):
        if name not in self.cache:
            self.cache[name] = make()
        return self.cache[name]

    def frozen_unet(self):
        from unet import UNet
        return self.once("frozen", lambda: UNet(self.ucfg).to(self.device, memory_format=self.fmt).eval()
                         .requires_grad_(False))

    def diti_model(self):
        from diti import DiTi, make_partition
        d = self.dcfg
        part = make_partition(d.partition, d.z_dim, d.k, d.stages, d.stage_dims)
        return self.once("diti", lambda: DiTi(self.ucfg, part).to(self.device, memory_format=self.fmt))

    def wrap(self, fn):
        import torch
        return torch.compile(fn) if self.compiled else fn

    def train_step(self, module, loss_of, opt):
        import runtime
        loss_of = self.wrap(loss_of)

        def step():
            module.train()
            with runtime.autocast(self.device, self.precision):
                loss = loss_of()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step, sum(p.numel() for p in module.parameters())

    def op(self, name, ddim_steps):
        """(step function, number of parameters it touches) for one op."""
        import torch
        import diffusion
        import runtime
        from diti import cumulative_mask, diti_loss
        from unet import UNet, eps_and_shift
        x0, t, eps, sched = self.x0, self.t, self.eps, self.sched
        if name == "ddpm":
            unet = self.once("ddpm", lambda: UNet(self.ucfg).to(self.device, memory_format=self.fmt).train())
            loss = lambda: (eps - unet(diffusion.q_sample(sched, x0, t, eps), t)).float().pow(2).mean()
            return self.train_step(unet, loss, torch.optim.Adam(unet.parameters(), lr=self.dm.lr))
        if name == "diti":
            model, unet = self.diti_model(), self.frozen_unet()
            loss = lambda: diti_loss(model, unet, sched, x0, self.dcfg.mode, t, eps)[0]
            return self.train_step(model, loss, torch.optim.Adam(model.parameters(), lr=self.dcfg.lr))
        if name == "disdiff":
            try:
                from disdiff import DisDiff, disdiff_step
            except ImportError as e:
                raise Skip(f"no disdiff.py with DisDiff and disdiff_step here ({e})")
            if self.discfg is None:
                raise Skip("this preset has no disdiff stage (config.PRESETS)")
            unet, c = self.frozen_unet(), self.discfg
            model = DisDiff(self.ucfg, c.z_dim, c.factors).to(self.device, memory_format=self.fmt)
            opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
            return self.train_step(model, lambda: disdiff_step(model, unet, sched, x0), opt)
        model, unet = self.diti_model(), self.frozen_unet()
        encoder = self.once("encoder", lambda: self.wrap(model.encoder))
        cast = lambda: runtime.autocast(self.device, self.precision)
        if name == "encode":
            def step():
                model.eval()
                with torch.no_grad(), cast():
                    encoder(x0)
            return step, sum(p.numel() for p in model.encoder.parameters())
        if name == "ddim":
            # SPEC §4: at each t, G sees z under that t's mask
            eps_fn = self.wrap(lambda x, tt, z: eps_and_shift(unet, model.decoder, x, tt,
                                                              z * cumulative_mask(model.partition, tt)))

            def step():
                model.eval()
                with torch.no_grad(), cast():
                    z = encoder(x0)                                                   # (B, d)
                    x_T = diffusion.ddim_invert(lambda x, tt: eps_fn(x, tt, z), sched, x0, ddim_steps)
                    diffusion.ddim_sample(lambda x, tt: eps_fn(x, tt, z), sched, x_T, ddim_steps)
            return step, sum(p.numel() for p in [*model.parameters(), *unet.parameters()])
        raise ValueError(name)


def worker(spec):
    """Measure every (op, setting) of one preset. Writes '@@bench {json}' lines on stdout: {"at": key} before
    each call that might crash the process, a record per failed or skipped job as it happens, and the timed
    records at the end."""
    import torch
    import runtime
    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    device = runtime.pick_device(spec["device"])
    emit = lambda rec: print(TAG + json.dumps(rec), flush=True)
    log = lambda text: print(f"  {spec['preset']} {text}", file=sys.stderr, flush=True)
    jobs, settings = [], {}
    # the warm-ups that may crash first (channels_last), the costly ones (compile) late: a crash reruns fewer
    order = sorted(((s, op) for s in spec["settings"] for op in spec["ops"]),
                   key=lambda so: (not so[0]["channels_last"], so[0]["compile"]))
    for s, op in order:
        key = f"{op}|{s['label']}"
        if key in spec["skip"]:
            continue
        emit({"at": key})
        torch.manual_seed(0)
        try:
            if s["compile"] and not hasattr(torch, "compile"):
                raise Skip("this torch has no torch.compile")
            if s["label"] not in settings:
                settings[s["label"]] = Setting(spec["preset"], device, s["precision"], s["channels_last"],
                                               s["compile"], spec["batch"])
            step, params = settings[s["label"]].op(op, spec["ddim_steps"])
            # a DDIM call is 2 x ddim_steps network passes: no warm-up on a CPU, one on a GPU (its first call
            # pays for CUDA's one-off start-up)
            n_warm = (1 if device.type == "cuda" else 0) if op == "ddim" else spec["warmup"]
            n_warm = max(n_warm, 1) if s["compile"] else n_warm   # the first call compiles
            warmup = [runtime.timed_call(step, device)[0] for _ in range(n_warm)]
        except Skip as e:
            emit(dict(key=key, status="skipped", reason=str(e)))
            log(f"{s['label']} {op}: skipped: {e}")
            continue
        except Exception as e:                   # a failed compile, out of memory: a reason, not a traceback
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            reason = f"{'compile failed' if s['compile'] else 'failed'}: {type(e).__name__}: {first}"
            emit(dict(key=key, status="failed", reason=reason))
            log(f"{s['label']} {op}: {reason}")
            continue
        iters = spec["ddim_iters"] if op == "ddim" else spec["iters"]
        jobs.append(dict(key=key, step=step, params=params, iters=iters, warmup_s=warmup, times_s=[], peak=[]))
        log(f"{s['label']} {op}: warm" + (f" (first call {warmup[0]:.1f} s)" if warmup else ""))
    for round_ in range(max([j["iters"] for j in jobs], default=0)):
        for job in jobs:
            if round_ < job["iters"]:
                emit({"at": job["key"]})
                seconds, peak = runtime.timed_call(job["step"], device)
                job["times_s"].append(seconds)
                job["peak"].append(peak)
        log(f"round {round_ + 1}: " + ", ".join(f"{j['key'].split('|')[1]} {j['key'].split('|')[0]} "
                                                 f"{j['times_s'][-1]:.2f} s" for j in jobs if round_ < j["iters"]))
    for job in jobs:
        median = statistics.median(job["times_s"])
        peaks = [p for p in job["peak"] if p is not None]
        emit(dict(key=job["key"], status="ok", params=job["params"], warmup_s=job["warmup_s"], times_s=job["times_s"],
                  median_s=median, min_s=min(job["times_s"]), img_s=spec["batch"] / median,
                  peak_mb=max(peaks) if peaks else None))


# ----------------------------------------------------------------------------------------------------------
# Orchestration (the parent process)

def run_preset(spec, timeout):
    """Run worker(spec) in a subprocess until every job has a record. A crash marks the job it was in and the
    others run again in a fresh process."""
    done, skip = {}, list(spec["skip"])
    while True:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps({**spec, "skip": skip})]
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout)
            out, code = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            code = f"timed out after {timeout} s"
        at = None
        for line in out.splitlines():
            if line.startswith(TAG):
                rec = json.loads(line[len(TAG):])
                if "at" in rec:
                    at = rec["at"]
                else:
                    done[rec["key"]] = rec
                    if rec["status"] != "ok":
                        skip.append(rec["key"])
        if code == 0 or at is None or at in done:
            for key in (f"{op}|{s['label']}" for s in spec["settings"] for op in spec["ops"]):
                done.setdefault(key, dict(key=key, status="failed", reason=f"worker ended with {code}"))
            return done
        reason = f"crashed (signal {-code})" if isinstance(code, int) and code < 0 else \
            (code if isinstance(code, str) else f"worker exited with code {code}")
        done[at] = dict(key=at, status="failed", reason=reason)
        skip.append(at)
        op, label = at.split("|")
        print(f"  {spec['preset']} {label} {op}: {reason}; running the rest again without it", file=sys.stderr)
        if isinstance(code, str):                    # a timeout: do not start it all over
            for key in (f"{op}|{s['label']}" for s in spec["settings"] for op in spec["ops"]):
                done.setdefault(key, dict(key=key, status="failed", reason=f"not measured: {code}"))
            return done


def ratio_lines(rows):
    """DiTi / DDPM and DisDiff / DiTi per preset and setting (time per image; measured interleaved)."""
    lines = []
    by = {(r["preset"], r["label"], r["op"]): r for r in rows if r["status"] == "ok"}
    for preset, label in dict.fromkeys((r["preset"], r["label"]) for r in rows):
        ddpm, diti, dis = (by.get((preset, label, op)) for op in ("ddpm", "diti", "disdiff"))
        if ddpm and diti:
            ratio = ddpm["img_s"] / diti["img_s"]
            lines.append(f"{preset} {label}: DiTi step / DDPM step, time per image = {ratio:.2f} "
                         f"(goal <= 1.3: {'met' if ratio <= 1.3 else 'NOT met'})")
        if diti and dis:
            lines.append(f"{preset} {label}: DisDiff step / DiTi step, time per image = "
                         f"{diti['img_s'] / dis['img_s']:.2f}")
    return lines


def table(rows):
    head = (f"{'preset':<9} {'setting':<16} {'batch':>5} {'op':<19} {'img/s':>8} {'ms/call':>9} {'vs fp32':>7} "
            f"{'peak MB':>8} {'1st s':>7}  note")
    out = [head, "-" * len(head)]
    base = {(r["preset"], r["op"]): r for r in rows if r["status"] == "ok" and r["label"] == "fp32"}
    for r in rows:
        name = OP_NAMES[r["op"]]
        if r["status"] != "ok":
            out.append(f"{r['preset']:<9} {r['label']:<16} {r['batch']:>5} {name:<19} {'-':>8} {'-':>9} {'-':>7} "
                       f"{'-':>8} {'-':>7}  {r['status']}: {r['reason']}")
            continue
        b = base.get((r["preset"], r["op"]))
        vs = f"{r['img_s'] / b['img_s']:.2f}x" if b else "-"
        peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "n/a"
        first = r["warmup_s"][0] if r["warmup_s"] else None
        note = f"compile ~{first - r['median_s']:.0f} s" if r["compile"] and first else ""
        out.append(f"{r['preset']:<9} {r['label']:<16} {r['batch']:>5} {name:<19} {r['img_s']:>8.2f} "
                   f"{1000 * r['median_s']:>9.0f} {vs:>7} {peak:>8} {f'{first:.1f}' if first else '-':>7}  {note}")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--presets", default="quick,celeba64")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", help="fp32, bf16 or a comma list; auto = train.py's choice here")
    p.add_argument("--channels-last", action="store_true", help="also measure with channels_last models and inputs")
    p.add_argument("--compile", action="store_true", help="also measure with torch.compile on the forward of each op")
    p.add_argument("--all", action="store_true", help="sweep fp32/bf16 x channels_last x compile")
    p.add_argument("--batch", type=int, default=0, help="0: the preset's batch on CUDA; on CPU 64 at 32 px, 16 at 64 px")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--ddim-steps", type=int, default=10)
    p.add_argument("--ddim-iters", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: torch's default)")
    p.add_argument("--timeout", type=int, default=4 * 3600, help="seconds per preset before its worker is stopped")
    p.add_argument("--json", default="", help="also save every figure to this path")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(json.loads(a.worker))

    import torch
    import runtime
    try:
        device = runtime.pick_device(a.device)
    except config.UserError as e:
        raise SystemExit(f"error: {e}")
    presets, ops = [s for s in a.presets.split(",") if s], [s for s in a.ops.split(",") if s]
    bad = [s for s in presets if s not in config.PRESETS] + [o for o in ops if o not in OPS]
    if bad:
        raise SystemExit(f"error: unknown preset or op {bad}: presets {', '.join(config.PRESETS)}; ops {', '.join(OPS)}")
    auto = runtime.resolve_precision(device, "auto")
    precisions = ["fp32", "bf16"] if a.all else [auto if s == "auto" else s for s in a.precision.split(",")]
    if any(s not in ("fp32", "bf16") for s in precisions):
        raise SystemExit(f"error: --precision takes fp32, bf16, auto or a comma list of them, got {a.precision}")
    combos = list(itertools.product(precisions, [False, True] if a.all or a.channels_last else [False],
                                    [False, True] if a.all or a.compile else [False]))
    settings = [dict(precision=pr, channels_last=cl, compile=co,
                     label="+".join([pr] + (["cl"] if cl else []) + (["compile"] if co else []))) for pr, cl, co in combos]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    threads = a.threads or torch.get_num_threads()
    print(f"bench on {device} ({name}), torch {torch.__version__}, {threads} CPU threads; precision 'auto' here "
          f"is {auto}", flush=True)
    rows = []
    for preset in presets:
        batch = a.batch or default_batch(preset, device)
        print(f"{preset}, batch {batch}: {', '.join(s['label'] for s in settings)} x {', '.join(ops)}",
              file=sys.stderr, flush=True)
        spec = dict(preset=preset, device=str(device), settings=settings, batch=batch, ops=ops, iters=a.iters,
                    warmup=a.warmup, ddim_steps=a.ddim_steps, ddim_iters=a.ddim_iters, threads=a.threads, skip=[])
        done = run_preset(spec, a.timeout)
        for s in settings:
            for op in ops:
                rec = done[f"{op}|{s['label']}"]
                rows.append(dict(preset=preset, op=op, batch=batch, device=str(device), **s,
                                 **{k: v for k, v in rec.items() if k != "key"}))
    print()
    print(table(rows))
    print(f"img/s = batch / median of {a.iters} timed calls ({a.ddim_iters} for DDIM: {a.ddim_steps} inversion + "
          f"{a.ddim_steps} decoding steps a call, {'one warm-up' if device.type == 'cuda' else 'no warm-up'}) after "
          f"{a.warmup} warm-up, all interleaved; 'vs fp32' = img/s over "
          f"that of fp32 for the same preset and op; '1st s' = the first call (with compile: compiling it).")
    print("peak MB: " + ("torch.cuda.max_memory_allocated during a call (all tensors)." if device.type == "cuda"
                         else "peak RSS during a call above its start (activations, gradients, workspaces; not "
                              "weights or optimizer state)."))
    for line in ratio_lines(rows):
        print(line)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(dict(torch=torch.__version__, device=str(device), device_name=name, threads=threads,
                           args={k: v for k, v in vars(a).items() if k != "worker"}, rows=rows), f, indent=1)
        print(f"figures saved to {a.json}")


if __name__ == "__main__":
    main()
