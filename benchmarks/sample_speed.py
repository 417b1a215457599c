"""Sampling speed and peak memory of VARPipeline, printed as one JSON object.

Images/s is the batch size over the median wall time of ``--repeats`` full sampling calls (after ``--warmup``
untimed ones). ``non_finite_check_ms`` is what the sampler's NaN/inf guard costs per call (its share of the median
in ``non_finite_check_share``). Peak memory covers those calls: on CUDA the allocator peak
(``torch.cuda.max_memory_allocated``); on CPU the process peak RSS, read exactly from the kernel (``VmHWM`` after
resetting it through ``/proc/self/clear_refs``) where Linux allows it, else sampled with psutil, else
``ru_maxrss``. The JSON names the method. glibc keeps some freed memory resident, so CPU peaks vary between runs by
up to hundreds of MiB; run with ``MALLOC_MMAP_THRESHOLD_=131072`` for a reproducible peak of live memory (slower;
time without it). Random weights (``--preset``, ``--tiny``) time the same work as real ones.

Examples::

    python benchmarks/sample_speed.py --preset var-d16 --threads 2 --batch-size 2 --repeats 3
    python benchmarks/sample_speed.py --model ./var-d16 --device cuda --dtype bf16 --batch-size 32
    python benchmarks/sample_speed.py --tiny --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable

import torch

try:
    import psutil
except ImportError:
    psutil = None

from diffusers_var import MultiScaleVQVAE, VARConfig, VARPipeline, VARScaleScheduler, VARTransformer
from diffusers_var.convert import PRESETS, component_configs
from diffusers_var.schedulers.scale import finite_flag, make_drawable_

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TINY = dict(
    vqvae=dict(ch=32, ch_mult=(1, 2), norm_num_groups=8, z_channels=8, vocab_size=64),
    transformer=dict(num_classes=10, vocab_size=64, latent_channels=8, depth=2, embed_dim=64, num_heads=2),
    patch_nums=(1, 2, 4),
)
MIB = 2**20


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.M)[1])


class PeakMemory:
    """Peak memory inside a ``with`` block, and how much of it the block added (``delta``)."""

    def __init__(self, device: str | torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.method, self.base, self.peak = None, 0, 0

    def _rss(self) -> int:
        return psutil.Process().memory_info().rss

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.method, self.base = "torch.cuda.max_memory_allocated", torch.cuda.memory_allocated()
            return self
        try:  # writing 5 to clear_refs resets the kernel's peak RSS (VmHWM) to the current RSS
            with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
                refs.write("5")
            self.method, self.base = "peak RSS: /proc/self/status VmHWM after clear_refs=5", _status_kib("VmRSS") * 1024
            return self
        except (OSError, TypeError):
            pass
        if psutil is not None:
            self.method, self.base = "peak RSS: psutil sampled every 2 ms", self._rss()
            self.peak, self._stop = self.base, threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
            return self
        self.method = "ru_maxrss (process lifetime peak; the delta is 0 unless sampling exceeded earlier peaks)"
        self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        elif self.method.startswith("peak RSS: /proc"):
            self.peak = _status_kib("VmHWM") * 1024
        elif self.method.startswith("peak RSS: psutil"):
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def as_dict(self) -> dict:
        return {
            "peak_memory_mib": round(self.peak / MIB, 1),
            "peak_memory_delta_mib": round((self.peak - self.base) / MIB, 1),
            "memory_method": self.method,
        }


@torch.no_grad()
def make_resident(*modules: torch.nn.Module) -> None:
    """Read every weight once, so memory-mapped checkpoints count before sampling starts, not during it."""
    for module in modules:
        for tensor in module.state_dict().values():
            tensor.sum()


def cpu_stall_us() -> int | None:
    """Linux PSI: total µs during which some runnable task waited for a CPU (other load on a shared machine)."""
    try:
        with open("/proc/pressure/cpu", encoding="ascii") as pressure:
            return int(re.search(r"^some .*total=(\d+)", pressure.read(), re.M)[1])
    except (OSError, TypeError):
        return None


def time_sampling(sample: Callable[[], object], batch_size: int, repeats: int, warmup: int, device: str) -> dict:
    """Run ``sample`` warmup + repeats times; images/s from the median of the timed runs; peak memory of all runs.

    ``cpu_stall_pct`` (Linux) is the share of the wall time in which some task waited for a CPU: well above 0 means
    the timings are disturbed by other load (or by more threads than cores).
    """
    cuda = torch.device(device).type == "cuda"
    seconds = []
    stall_start, wall_start = cpu_stall_us(), time.perf_counter()
    with PeakMemory(device) as memory:
        for run in range(warmup + repeats):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            sample()
            if cuda:
                torch.cuda.synchronize()
            if run >= warmup:
                seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    stall_end, wall = cpu_stall_us(), time.perf_counter() - wall_start
    stall = None if stall_start is None else round((stall_end - stall_start) / 1e4 / wall, 1)
    return {
        "images_per_s": round(batch_size / median, 4),
        "median_s": round(median, 4),
        "seconds": [round(s, 4) for s in seconds],
        "cpu_stall_pct": stall,
        **memory.as_dict(),
    }


def non_finite_check_ms(pipe: VARPipeline, batch_size: int, guided: bool, device: str, repeats: int = 20) -> float:
    """Median time (ms) of the sampler's non-finite checks over one whole call: the flag on each scale's raw
    logits and making the guided ones drawable (what ``VARScaleScheduler.step`` adds for safety)."""
    rows = 2 * batch_size if guided else batch_size
    vocab = pipe.transformer.config.vocab_size
    logits = [torch.randn(rows, p * p, vocab, device=device) for p in pipe.scheduler.config.patch_nums]
    guided_logits = [x[:batch_size].clone() for x in logits]

    def checks():
        flags = [finite_flag(x) for x in logits]
        for x in guided_logits:
            make_drawable_(x)
        return bool(torch.stack(flags).all())

    checks()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        checks()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def spread_labels(batch_size: int, num_classes: int) -> list[int]:
    """Fixed, spread-out class ids, the same for every run and script."""
    return [i * 97 % num_classes for i in range(batch_size)]


def random_pipeline(preset: str | None, seed: int) -> VARPipeline:
    """A pipeline with random weights: the full-size components of an official preset, or a tiny test model."""
    torch.manual_seed(seed)
    if preset is None:
        vqvae = MultiScaleVQVAE(patch_nums=TINY["patch_nums"], **TINY["vqvae"])
        transformer = VARTransformer(VARConfig(patch_nums=TINY["patch_nums"], **TINY["transformer"]))
        scheduler = VARScaleScheduler(patch_nums=TINY["patch_nums"])
    else:
        vqvae_kwargs, transformer_kwargs, scheduler_kwargs = component_configs(**PRESETS[preset])
        vqvae = MultiScaleVQVAE(**vqvae_kwargs)
        transformer = VARTransformer(VARConfig(**transformer_kwargs))
        scheduler = VARScaleScheduler(**scheduler_kwargs)
    return VARPipeline(vqvae.eval(), transformer.eval(), scheduler)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a VARPipeline folder (e.g. made by `diffusers-var convert`)")
    source.add_argument("--preset", choices=sorted(PRESETS), help="random weights at an official size")
    source.add_argument("--tiny", action="store_true", help="a tiny random model (smoke test)")
    parser.add_argument("--batch-size", type=int, default=2, help="images per call")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--guidance-scale", type=float, default=2.5, help="2.5 is the official cfg=1.5")
    parser.add_argument("--top-k", type=int, default=900)
    parser.add_argument("--top-p", type=float, default=0.96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compiled", action="store_true", help="after pipe.compile() (the warm-up calls compile)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    build_start = time.perf_counter()
    if args.model:
        pipe = VARPipeline.from_pretrained(args.model)
    else:
        pipe = random_pipeline(args.preset, args.seed)
    pipe = pipe.to(args.device) if args.dtype == "fp32" else pipe.to(args.device, DTYPES[args.dtype])
    pipe.set_progress_bar_config(disable=True)
    if args.compiled:
        pipe.compile()
    make_resident(pipe.vqvae, pipe.transformer)
    build_s = time.perf_counter() - build_start

    labels = spread_labels(args.batch_size, pipe.transformer.config.num_classes)
    generator = torch.Generator(args.device)

    def sample():
        return pipe(
            class_labels=labels,
            guidance_scale=args.guidance_scale,
            top_k=args.top_k,
            top_p=args.top_p,
            generator=generator.manual_seed(args.seed),
            output_type="pt",
        )

    timing = time_sampling(sample, args.batch_size, args.repeats, args.warmup, args.device)
    check_ms = non_finite_check_ms(pipe, args.batch_size, args.guidance_scale != 1.0, args.device)
    result = {
        "model": args.model or args.preset or "tiny",
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "dtype": args.dtype,
        "compiled": args.compiled,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "guidance_scale": args.guidance_scale,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "transformer_params_m": round(sum(p.numel() for p in pipe.transformer.parameters()) / 1e6, 1),
        "vqvae_params_m": round(sum(p.numel() for p in pipe.vqvae.parameters()) / 1e6, 1),
        "build_s": round(build_s, 2),
        **timing,
        "non_finite_check_ms": round(check_ms, 3),
        "non_finite_check_share": round(check_ms / 1e3 / timing["median_s"], 6),
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "torch": torch.__version__,
    }
    json.dump(result, sys.stdout)
    print()
    return result


if __name__ == "__main__":
    main()
