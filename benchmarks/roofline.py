"""How close sampling can get to this machine's limits: the GEMM roof, memory bandwidth, and the transformer's
matrix products timed one by one at the shapes one sampling call runs. Prints one JSON object.

Measured here, on the device and thread count asked for:

* ``gemm_roof_gflops``: the best of plain square fp32 (or ``--dtype``) GEMMs, 1024² to 4096² (the compute roof);
* ``memory_gb_per_s``: a large tensor copy (bytes read + written per second), the bound of the small-M products
  whose cost is reading their weights;
* ``per_scale``: for every scale, the products of one transformer call at that scale (the fused qkv, attention
  output, both MLP layers, the AdaLN projection per block, the head) timed as ``F.linear`` on weights of the
  model's shapes, with their FLOPs, achieved GFLOP/s and the bound ``max(FLOPs / roof, weight bytes / bandwidth)``;
* ``transformer_linear_s`` / ``transformer_linear_bound_s``: their sums over a whole sampling call, and
  ``fraction_of_bound`` (bound / measured, 1.0 = at the machine's limit);
* ``decoder_gflop``: the tokenizer decoder's convolution FLOPs per image (from its layer shapes), and the time its
  convolutions would take at the GEMM roof.

``adaln_once``: the AdaLN projections depend only on the class, so the sampler computes them once per call, not
at every scale; ``--adaln-every-scale`` times them at every scale, as the official sampler runs them.

Examples::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/roofline.py --preset var-d16 --batch-size 1 --threads 2
    python benchmarks/roofline.py --preset var-d30 --batch-size 64 --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling sample_speed.py, also when imported
from diffusers_var.convert import PRESETS, component_configs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(function, device: torch.device, repeats: int, min_seconds: float = 0.05) -> float:
    """Median time of one call, each timing running the call enough times to last ``min_seconds``."""
    function()
    _sync(device)
    start = time.perf_counter()
    function()
    _sync(device)
    calls = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-6)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            function()
        _sync(device)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def gemm_roof(device: torch.device, dtype: torch.dtype, repeats: int, sizes=(1024, 2048, 4096)) -> dict:
    results = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        seconds = median_seconds(functools.partial(torch.mm, a, b), device, repeats)
        results[str(n)] = round(2 * n**3 / seconds / 1e9, 1)
    return {"gemm_roof_gflops": round(max(results.values()), 1), "square_gemm_gflops": results}


def memory_bandwidth(device: torch.device, repeats: int, mib: int = 256) -> float:
    source = torch.empty(mib * 2**18, device=device)  # 256 MiB by default: far beyond any cache
    target = torch.empty_like(source)
    seconds = median_seconds(lambda: target.copy_(source), device, repeats)
    return 2 * source.numel() * source.element_size() / seconds / 1e9


def transformer_products(config: dict, rows: int, scale_tokens: int, adaln: bool) -> list[tuple[str, int, int, int]]:
    """(name, M, K, N) of the matrix products of one cached transformer call on ``scale_tokens`` positions."""
    width = config["embed_dim"]
    hidden = round(width * config.get("mlp_ratio", 4.0))
    m = rows * scale_tokens
    products = [("qkv", m, width, 3 * width), ("attn_out", m, width, width), ("fc1", m, width, hidden)]
    products.append(("fc2", m, hidden, width))
    products = [(name, m_, k, n) for name, m_, k, n in products] * config["depth"]
    if adaln:
        products += [("adaln", rows, width, 6 * width)] * config["depth"] + [("head_adaln", rows, width, 2 * width)]
    products.append(("head", m, width, config["vocab_size"]))
    return products


def time_products(products, device: torch.device, dtype: torch.dtype, repeats: int, cache: dict) -> list[float]:
    """Seconds of each (name, M, K, N) product as ``F.linear`` with a bias; equal shapes are timed once."""
    seconds = []
    for _, m, k, n in products:
        if (m, k, n) not in cache:
            x = torch.randn(m, k, device=device, dtype=dtype)
            weight = torch.randn(n, k, device=device, dtype=dtype)
            bias = torch.randn(n, device=device, dtype=dtype)
            cache[m, k, n] = median_seconds(functools.partial(F.linear, x, weight, bias), device, repeats)
        seconds.append(cache[m, k, n])
    return seconds


def decoder_gflop(vqvae: torch.nn.Module, image_size: int) -> float:
    """Convolution FLOPs of decoding one image, from a forward pass with hooks on every Conv2d."""
    flops = []

    def count(module, inputs, output):
        kernel = module.weight.shape[1] * module.weight.shape[2] * module.weight.shape[3]
        flops.append(2 * output.numel() * kernel)

    hooks = [m.register_forward_hook(count) for m in vqvae.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    side = image_size // 2 ** (len(vqvae.config.ch_mult) - 1)
    with torch.no_grad():
        vqvae.decoder(torch.zeros(1, vqvae.config.z_channels, side, side))
    for hook in hooks:
        hook.remove()
    return sum(flops) / 1e9


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="var-d16")
    parser.add_argument("--tiny", action="store_true", help="sample_speed.py's tiny model, small roof GEMMs (smoke)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per sampling call")
    parser.add_argument("--unguided", action="store_true", help="guidance 1.0: one row per image (default: two)")
    parser.add_argument("--adaln-every-scale", action="store_true", help="as the official sampler: not once per call")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "roofline.py: --device cuda was asked for, but this machine has no CUDA device.\n")
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.tiny:
        from sample_speed import TINY

        vqvae_kwargs = dict(TINY["vqvae"], patch_nums=TINY["patch_nums"])
        transformer_kwargs, patch_nums = dict(TINY["transformer"], mlp_ratio=4.0), TINY["patch_nums"]
    else:
        vqvae_kwargs, transformer_kwargs, scheduler_kwargs = component_configs(**PRESETS[args.preset])
        patch_nums = scheduler_kwargs["patch_nums"]
    rows = args.batch_size * (1 if args.unguided else 2)
    report = {
        "preset": "tiny" if args.tiny else args.preset,
        "batch_size": args.batch_size,
        "rows": rows,
        "device": str(device),
    }
    report.update(dtype=args.dtype, threads=torch.get_num_threads(), torch=torch.__version__)
    report.update(gemm_roof(device, dtype, args.repeats, (256, 512) if args.tiny else (1024, 2048, 4096)))
    roof = report["gemm_roof_gflops"] * 1e9
    bandwidth = memory_bandwidth(device, args.repeats, 16 if args.tiny else 256) * 1e9
    report["memory_gb_per_s"] = round(bandwidth / 1e9, 1)

    cache, per_scale = {}, []
    total_s = total_bound_s = total_gflop = 0.0
    for si, side in enumerate(patch_nums):
        adaln = args.adaln_every_scale or si == 0
        products = transformer_products(transformer_kwargs, rows, side * side, adaln)
        seconds = time_products(products, device, dtype, args.repeats, cache)
        item = torch.finfo(dtype).bits // 8
        gflop = sum(2 * m * k * n for _, m, k, n in products) / 1e9
        bound = sum(max(2 * m * k * n / roof, k * n * item / bandwidth) for _, m, k, n in products)
        per_scale.append(
            {
                "scale": si,
                "tokens": side * side,
                "gflop": round(gflop, 6),
                "seconds": round(sum(seconds), 6),
                "gflops": round(gflop / sum(seconds), 1),
                "bound_s": round(bound, 6),
            }
        )
        total_s, total_bound_s, total_gflop = total_s + sum(seconds), total_bound_s + bound, total_gflop + gflop
    report["adaln_once"] = not args.adaln_every_scale
    report["per_scale"] = per_scale
    report["transformer_linear_gflop"] = round(total_gflop, 6)
    report["transformer_linear_s"] = round(total_s, 6)
    report["transformer_linear_bound_s"] = round(total_bound_s, 6)
    report["fraction_of_bound"] = round(total_bound_s / total_s, 3)

    from diffusers_var import MultiScaleVQVAE

    vqvae = MultiScaleVQVAE(**vqvae_kwargs).eval()
    report["decoder_gflop_per_image"] = round(decoder_gflop(vqvae, vqvae.image_size), 6)
    report["decoder_at_roof_s"] = round(report["decoder_gflop_per_image"] * 1e9 * args.batch_size / roof, 3)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
