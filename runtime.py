"""Where and how training runs: the device, the numeric precision, and the processes of a torchrun launch
(loop.py's training loop calls these; bench.py, evaluate.py and disdiff.py pick their device here too), and what one
call costs there in seconds and peak memory (bench.py).
"""
import ctypes
import os
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from config import UserError


def local_cuda_index():
    """This process's GPU: LOCAL_RANK under torchrun (one GPU a rank), else 0; refused in one line when torchrun
    started more ranks on this machine than it has GPUs."""
    rank, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if rank >= count:
        raise UserError(f"torchrun started local rank {rank} on a machine with {count} CUDA GPU(s): use "
                        f"--nproc_per_node {count} or fewer, or --device cpu to run every rank on the CPU (gloo)")
    return rank


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_cuda_index())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but this machine has no CUDA GPU: use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps was asked for but MPS is not available: use --device cpu or auto")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise UserError(f"unknown device '{name}': choose auto, cpu, cuda or mps")
    if name == "cuda":
        return torch.device("cuda", local_cuda_index())     # under torchrun: one GPU a rank
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}': choose auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def cpu_has_native_bf16():
    """Whether this CPU computes in bf16 natively (x86 AVX512-BF16 or AMX-BF16)."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def resolve_precision(device, precision):
    """'fp32' or 'bf16'. 'auto' = bf16 on CUDA and on CPUs with native bf16, else fp32 (MPS too). Measured
    with bench.py on CPUs without bf16 instructions: bf16 autocast ran every op at ~0.3x the fp32 speed on an
    AVX-512 one and at 0.07-0.16x on an AVX2 one (quick preset), so such CPUs train in fp32."""
    if precision not in ("auto", "fp32", "bf16"):
        raise UserError(f"unknown precision '{precision}': choose auto, fp32 or bf16")
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()) else "fp32"


def autocast(device, precision):
    """bf16 autocast where resolve_precision says bf16; a no-op for fp32."""
    use = resolve_precision(device, precision) == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use)


def dist_setup(device_name):
    """(rank, world). Under torchrun, joins the process group (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and device_name != "cpu" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_cuda_index())
        dist.init_process_group(backend, timeout=timedelta(hours=1))   # rank 0 may be building a data cache
    return (dist.get_rank() if world > 1 else 0), world


def mean_over_ranks(x, world):
    """A tensor averaged over the processes (every rank gets the same value); itself in a single process."""
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= world
    return x


def gather_rows(x, world):
    """(B / world, ...) on each rank -> (B, ...) in the global batch's row order (rank r holds rows r::world)."""
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.stack(parts, 1).flatten(0, 1)


def average_gradients(params, world):
    """Data parallelism by hand: after backward, each gradient becomes its mean over the ranks (one all-reduce
    of all of them). Not DistributedDataParallel: its hooks only act on a forward() called through its wrapper,
    and the stage-2 losses call the model's parts (encoder, decoder) directly. A parameter that got no gradient
    on any rank keeps none, as in a single process."""
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in params]
                     + [has_grad])
    dist.all_reduce(flat)
    grads = flat[:-len(params)].split([p.numel() for p in params])
    for p, g, n in zip(params, grads, flat[-len(params):].tolist()):
        p.grad = (g / world).view_as(p).to(p.dtype) if n > 0 else None


# ----------------------------------------------------------------------------------------------------------
# What one call costs (bench.py)

class PeakRSS:
    """Peak resident set size above that at start, sampled every millisecond in a thread (Linux /proc)."""
    ok = os.path.exists("/proc/self/statm")

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        if self.ok:
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)          # freed heap back to the OS: a clean baseline
            except (OSError, AttributeError):
                pass
            self.start = self.peak = self.rss()
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self.sample, daemon=True)
            self.thread.start()
        return self

    def sample(self):
        while not self.stop.wait(0.001):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        if self.ok:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, self.rss())

    def mb(self):
        return (self.peak - self.start) / 2 ** 20 if self.ok else None


def timed_call(fn, device):
    """(seconds, peak MB) of one call: CUDA's peak allocation on a GPU, the peak RSS above the start on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        tick = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        return time.perf_counter() - tick, torch.cuda.max_memory_allocated(device) / 2 ** 20
    with PeakRSS() as rss:
        tick = time.perf_counter()
        fn()
        seconds = time.perf_counter() - tick
    return seconds, rss.mb()
