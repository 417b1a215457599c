"""Our VARPipeline against the official VAR code at full size, with random seeded weights; prints one JSON object.

The official VQVAE and VAR are built by their own constructors with a preset's arguments, re-initialised from a
seeded generator (so that AdaLN gates and logits are far from degenerate), saved as official ``.pth`` checkpoints
and converted with ``diffusers_var.convert.convert``. Reported:

* ``teacher_forcing``: tokenizer tokens of random images, and the transformer logits on the official tokens;
* ``greedy`` (official cfg=1.5, top_k=1, top_p=0 ↔ ours guidance_scale=2.5, top_k=1, top_p=1) and ``sampled``
  (top_k=900, top_p=0.96, the same seed): tokens; guided logits, and the filtered ones' −inf mask and values, of
  every scale up to the first differing token; images (both in [0, 1]);
* ``speed``: images/s (median of all timed runs) and peak memory of each side, each measured in fresh worker
  processes (this script re-invoked with ``--worker``), alternating official/ours over ``--rounds``; memory once
  more per side in a worker whose freed tensors return to the OS (see ``memory_method``).

``--device cuda`` runs both sides on the GPU; ``--dtype bf16|fp16`` samples both under ``torch.autocast`` with fp32
weights, as the official demo does; ``--compiled`` times ours after ``pipe.compile()`` (the warm-up call compiles).
``speed.roof`` puts both sides against the GEMM roof measured on the same machine (``roofline.py``): the call's
matrix FLOPs (transformer products with guidance, decoder convolutions) at the roof, over each side's median time.

Example (batch 2 on 2 CPU cores: about 7 minutes; ``--batch-size 8``: about 20)::

    git -C VAR-mirror archive HEAD | tar -x -C /tmp/var_official
    OMP_WAIT_POLICY=PASSIVE python benchmarks/compare_official.py --official-repo /tmp/var_official --threads 2
    python benchmarks/compare_official.py --device cuda --dtype bf16 --batch-size 64 --compiled
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from sample_speed import make_resident, spread_labels, time_sampling

from diffusers_var import VARPipeline
from diffusers_var.convert import PRESETS, convert

OFFICIAL_CFG = 1.5  # ours: guidance_scale = 1 + cfg
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SAMPLED = dict(top_k=900, top_p=0.96)
MMAP_THRESHOLD = 128 * 1024  # glibc's default, but fixed: freed tensors go back to the OS, so RSS tracks live memory
MEMORY_METHOD = (
    f"peak RSS (VmHWM after clear_refs=5) of one sampling call in a fresh worker run with MALLOC_MMAP_THRESHOLD_="
    f"{MMAP_THRESHOLD}, reproducible to ~0.1 MiB; delta = above the RSS after loading with every weight read once. "
    "Under the default (adaptive) threshold, RSS also holds freed heap memory and varies by hundreds of MiB between "
    "runs: see default_malloc_*"
)


def official_models(repo: str, preset: str):
    """The official VQVAE and VAR for a preset (their constructors print; that goes to stderr)."""
    sys.path.insert(0, repo)
    from models.var import VAR
    from models.vqvae import VQVAE

    kwargs = PRESETS[preset]
    with contextlib.redirect_stdout(sys.stderr):
        vae = VQVAE(**kwargs["vqvae_kwargs"], test_mode=True)
        var = VAR(vae_local=vae, **kwargs["var_kwargs"])
    var.eval().cond_drop_rate = 0.0
    return vae.eval(), var


@torch.no_grad()
def reinit_(vae: torch.nn.Module, var: torch.nn.Module, seed: int) -> str:
    """Seeded weights with healthy activations: fan-in scaled Linear/Conv, O(1) embeddings, non-trivial norms."""
    generator = torch.Generator().manual_seed(seed)
    done = set()

    def normal_(param, mean, std):
        param.normal_(mean, std, generator=generator)
        done.add(param)

    for model in (vae, var):
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                gain = 0.5 if "ada_lin" in name or name == "decoder.conv_out" else 1.0
                normal_(module.weight, 0.0, gain / math.sqrt(module.weight[0].numel()))
                if module.bias is not None:
                    normal_(module.bias, 0.0, 0.3 if "ada_lin" in name else 0.02)
            elif isinstance(module, torch.nn.Embedding):
                normal_(module.weight, 0.0, 1.0 if name == "class_emb" else 0.5)
            elif isinstance(module, torch.nn.GroupNorm):
                normal_(module.weight, 1.0, 0.1)
                normal_(module.bias, 0.0, 0.1)
        for name, param in model.named_parameters():  # pos_*, q/v biases, ada_gss; scale_mul_1H11 stays log(4)
            if param not in done and not name.endswith("scale_mul_1H11"):
                normal_(param, 0.0, 0.3 if name.endswith("ada_gss") else 0.1)
    return (
        f"torch.Generator().manual_seed({seed}); Linear/Conv2d weight ~ N(0, gain/sqrt(fan_in)), gain 0.5 for "
        "ada_lin and decoder.conv_out, else 1; bias ~ N(0, 0.02) (N(0, 0.3) for ada_lin); class_emb ~ N(0, 1); other "
        "embeddings ~ N(0, 0.5); GroupNorm weight ~ N(1, 0.1), bias ~ N(0, 0.1); remaining parameters ~ N(0, 0.1) "
        "(ada_gss N(0, 0.3)); scale_mul_1H11 kept as constructed; buffers as constructed"
    )


def precision(args: argparse.Namespace):
    """Both sides' sampling context: fp32 weights under ``torch.autocast`` to ``--dtype``, as the official demo
    samples (``torch.autocast("cuda", dtype=torch.float16)``), or plain fp32."""
    dtype = AUTOCAST[args.dtype]
    return torch.autocast(args.device, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def prepare_ours(pipe: VARPipeline, args: argparse.Namespace) -> VARPipeline:
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe.compile() if args.compiled else pipe


def flat(token_maps) -> torch.Tensor:
    return torch.cat([t.reshape(t.shape[0], -1) for t in token_maps], dim=1)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def teacher_forcing(vae, var, pipe: VARPipeline, labels: torch.Tensor, seed: int, autocast) -> dict:
    """Tokens of random images (in fp32: the official training tokenizes outside autocast) and the transformer's
    logits on them under ``autocast``."""
    size = pipe.vqvae.image_size
    images = torch.rand(len(labels), 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    images = images.to(labels.device)
    official_tokens = vae.img_to_idxBl(images)
    ours_tokens = pipe.vqvae.tokenize(images)
    side = [int(math.isqrt(t.shape[1])) for t in official_tokens]
    token_maps = [t.view(-1, s, s) for t, s in zip(official_tokens, side)]  # both transformers read the same tokens
    inputs = pipe.vqvae.next_scale_inputs(token_maps)
    with autocast:
        official_logits = var(labels, vae.quantize.idxBl_to_var_input(official_tokens))
        ours_logits = pipe.transformer(labels, inputs).logits
    mismatches = (flat(official_tokens) != flat(ours_tokens)).sum().item()
    return {
        "tokenizer_tokens_identical": mismatches == 0,
        "tokenizer_token_mismatches": mismatches,
        "tokens": flat(official_tokens).numel(),
        "logits_max_abs_diff": max_abs(official_logits, ours_logits),
        "logits_std": official_logits.std().item(),
    }


def autoregressive(vae, var, pipe: VARPipeline, labels: torch.Tensor, seed: int, top_k: int, top_p: float) -> dict:
    """One official and one of our sampling calls; tokens, guided and filtered logits captured at every scale."""
    import models.var as official_var  # the official sampler is looked up in this module at call time

    official_logits, official_filtered, official_tokens = [], [], []
    ours_logits, ours_filtered, ours_tokens = [], [], []
    sample_fn = official_var.sample_with_top_k_top_p_

    def official_sample(logits, **kwargs):
        official_logits.append(logits.clone())
        tokens = sample_fn(logits, **kwargs)
        official_filtered.append(logits.clone())  # masked in place: -inf where top-k/top-p dropped a code
        official_tokens.append(tokens[:, :, 0])
        return tokens

    official_var.sample_with_top_k_top_p_ = official_sample
    try:
        official_images = var.autoregressive_infer_cfg(  # (its generator is made on the model's device)
            len(labels), labels, g_seed=seed, cfg=OFFICIAL_CFG, top_k=top_k, top_p=0.0 if top_p >= 1 else top_p
        )
    finally:
        official_var.sample_with_top_k_top_p_ = sample_fn

    step = pipe.scheduler.step

    def ours_step(model_output, scale_index, guidance_scale, *args, **kwargs):
        conditional, unconditional = model_output.chunk(2)  # guided as in step(), before any filtering
        t = pipe.scheduler.guidance_weight(scale_index, guidance_scale)
        ours_logits.append((1 + t) * conditional - t * unconditional)
        out = step(model_output, scale_index, guidance_scale, *args, **kwargs)
        ours_filtered.append(out.logits.clone())  # after filtering, -inf where dropped
        ours_tokens.append(out.token_map)  # what every output carries in token_maps
        return out

    pipe.scheduler.step = ours_step
    try:
        ours_images = pipe(
            class_labels=labels,
            guidance_scale=1 + OFFICIAL_CFG,
            top_k=top_k,
            top_p=top_p,
            generator=torch.Generator(labels.device).manual_seed(seed),
            output_type="pt",
        ).images
    finally:
        del pipe.scheduler.step

    equal = [torch.equal(flat([a]), flat([b])) for a, b in zip(official_tokens, ours_tokens)]
    first_diff = equal.index(False) if False in equal else None
    compared = slice(0, None if first_diff is None else first_diff + 1)  # the logits of later scales see other inputs
    filtered = list(zip(official_filtered[compared], ours_filtered[compared]))
    return {
        "tokens_identical": all(equal),
        "token_mismatches": (flat(official_tokens) != flat(ours_tokens)).sum().item(),
        "first_differing_scale": first_diff,
        "guided_logits_max_abs_diff": max(map(max_abs, official_logits[compared], ours_logits[compared])),
        "filtered_logits_same_mask": all(torch.equal(a.isfinite(), b.isfinite()) for a, b in filtered),
        "filtered_logits_max_abs_diff": max(max_abs(a[a.isfinite()], b[a.isfinite()]) for a, b in filtered),
        "image_max_abs_diff": max_abs(official_images, ours_images),
        "image_std": official_images.std().item(),
    }


def worker(args: argparse.Namespace) -> dict:
    """Load one side from ``--workdir`` and time it; run in a fresh process so its peak RSS is its own."""
    labels = spread_labels(args.batch_size, 1000)
    if args.worker == "official":
        vae, var = official_models(args.official_repo, args.preset)
        vae.load_state_dict(torch.load(Path(args.workdir, "vae.pth"), weights_only=True))
        var.load_state_dict(torch.load(Path(args.workdir, "var.pth"), weights_only=True))
        vae, var = vae.to(args.device), var.to(args.device)
        label_tensor = torch.tensor(labels, device=args.device)
        make_resident(vae, var)

        def sample():
            with contextlib.redirect_stdout(sys.stderr), precision(args):
                return var.autoregressive_infer_cfg(
                    len(labels), label_tensor, g_seed=args.seed, cfg=OFFICIAL_CFG, **SAMPLED
                )
    else:
        pipe = prepare_ours(VARPipeline.from_pretrained(Path(args.workdir, "pipeline")), args)
        make_resident(pipe.vqvae, pipe.transformer)
        generator = torch.Generator(args.device)

        def sample():
            with precision(args):
                return pipe(
                    class_labels=labels,
                    guidance_scale=1 + OFFICIAL_CFG,
                    **SAMPLED,
                    generator=generator.manual_seed(args.seed),
                    output_type="pt",
                )

    return time_sampling(sample, args.batch_size, args.repeats, args.warmup, args.device)


def run_worker(side: str, workdir: str, args: argparse.Namespace, memory_only: bool = False) -> dict:
    """Time one side in a fresh process; ``memory_only``: one call under a fixed malloc mmap threshold."""
    command = [sys.executable, __file__, "--worker", side, "--workdir", workdir, "--official-repo", args.official_repo]
    repeats, warmup = (1, 0) if memory_only else (args.repeats, args.warmup)
    options = dict(preset=args.preset, threads=args.threads, batch_size=args.batch_size, seed=args.seed)
    options.update(repeats=repeats, warmup=warmup, device=args.device, dtype=args.dtype)
    for option, value in options.items():
        command += [f"--{option.replace('_', '-')}", str(value)]
    command += ["--compiled"] if args.compiled else []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD)) if memory_only else None
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def speed(workdir: str, args: argparse.Namespace) -> dict:
    runs = {"official": [], "ours": []}
    for round_index in range(args.rounds):
        order = ("official", "ours") if round_index % 2 == 0 else ("ours", "official")
        for side in order:
            runs[side].append(run_worker(side, workdir, args))
    result = {"memory_method": MEMORY_METHOD}
    for side, side_runs in runs.items():
        seconds = [s for run in side_runs for s in run["seconds"]]
        memory = run_worker(side, workdir, args, memory_only=True)
        result[side] = {
            "images_per_s": round(args.batch_size / statistics.median(seconds), 4),
            "median_s": round(statistics.median(seconds), 3),
            "seconds": seconds,
            "cpu_stall_pct_per_worker": [run["cpu_stall_pct"] for run in side_runs],
            "peak_memory_mib": memory["peak_memory_mib"],
            "peak_memory_delta_mib": memory["peak_memory_delta_mib"],
            "default_malloc_peak_memory_mib_per_worker": [run["peak_memory_mib"] for run in side_runs],
            "default_malloc_peak_memory_delta_mib_per_worker": [run["peak_memory_delta_mib"] for run in side_runs],
        }
    for key in ("images_per_s", "peak_memory_mib", "peak_memory_delta_mib"):
        result[f"{key}_ratio_ours_over_official"] = round(result["ours"][key] / result["official"][key], 3)
    result["roof"] = roof_fractions(args, {side: result[side]["median_s"] for side in runs})
    return result


def roof_fractions(args: argparse.Namespace, median_s: dict) -> dict:
    """The sampling call's matrix FLOPs (transformer products with guidance, decoder convolutions) over the GEMM roof
    measured now on this machine (``roofline.py``), against each side's median time: 1.0 would be the roof."""
    from roofline import decoder_gflop, gemm_roof, transformer_products

    from diffusers_var import MultiScaleVQVAE
    from diffusers_var.convert import component_configs

    vqvae_kwargs, transformer_kwargs, scheduler_kwargs = component_configs(**PRESETS[args.preset])
    rows = 2 * args.batch_size
    products = [
        p
        for pn in scheduler_kwargs["patch_nums"]
        for p in transformer_products(transformer_kwargs, rows, pn * pn, False)
    ]
    transformer_gflop = sum(2 * m * k * n for _, m, k, n in products) / 1e9
    vqvae = MultiScaleVQVAE(**vqvae_kwargs).eval()
    decoder = decoder_gflop(vqvae, vqvae.image_size) * args.batch_size
    roof = gemm_roof(torch.device(args.device), AUTOCAST[args.dtype] or torch.float32, repeats=3)["gemm_roof_gflops"]
    bound_s = (transformer_gflop + decoder) / roof
    fractions = {f"{side}_fraction_of_roof": round(bound_s / seconds, 3) for side, seconds in median_s.items()}
    return {
        "gemm_roof_gflops": roof,
        "transformer_gflop": round(transformer_gflop, 1),
        "decoder_gflop": round(decoder, 1),
        "bound_s": round(bound_s, 3),
        **fractions,
    }


def machine(device: str) -> str:
    """The device in words: the GPU's name, or the CPU model and core count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "cpu"
    return f"{model} ({os.cpu_count()} cores)"


def git_commit() -> str | None:
    """The commit of this checkout (``+dirty`` with local changes), to tell benchmark runs apart."""
    try:
        git = ["git", "-C", str(Path(__file__).resolve().parent)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-repo", default="/tmp/var_official", help="a checkout of FoundationVision/VAR")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="var-d16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed sampling calls per worker")
    parser.add_argument("--warmup", type=int, default=1, help="untimed sampling calls per worker")
    parser.add_argument("--rounds", type=int, default=2, help="worker pairs, alternating which side goes first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--dtype", choices=sorted(AUTOCAST), default="fp32", help="both sides under torch.autocast to this dtype"
    )
    parser.add_argument("--compiled", action="store_true", help="ours after pipe.compile() (first call compiles)")
    parser.add_argument("--skip-parity", action="store_true", help="only build, convert and time")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--worker", choices=("official", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "compare_official.py: --device cuda was asked for, but this machine has no CUDA device.\n")
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args)))
        return

    clock, start = {}, time.perf_counter()
    labels = torch.tensor(spread_labels(args.batch_size, 1000), device=args.device)
    report = {"preset": args.preset, "threads": args.threads, "batch_size": args.batch_size, "labels": labels.tolist()}
    report.update(device=args.device, dtype=args.dtype, compiled=args.compiled, machine=machine(args.device))
    report["commit"] = git_commit()
    with tempfile.TemporaryDirectory(prefix="var-compare-") as workdir:
        vae, var = official_models(args.official_repo, args.preset)
        report["init"] = reinit_(vae, var, args.seed)
        torch.save(vae.state_dict(), Path(workdir, "vae.pth"))
        torch.save(var.state_dict(), Path(workdir, "var.pth"))
        clock["build_official_s"] = time.perf_counter() - start
        pipe = convert(
            Path(workdir, "vae.pth"), Path(workdir, "var.pth"), Path(workdir, "pipeline"), preset=args.preset
        )
        pipe = prepare_ours(pipe, args)
        vae, var = vae.to(args.device), var.to(args.device)
        clock["convert_s"] = time.perf_counter() - start - sum(clock.values())
        if not args.skip_parity:
            report["teacher_forcing"] = teacher_forcing(vae, var, pipe, labels, args.seed, precision(args))
            with contextlib.redirect_stdout(sys.stderr), precision(args):
                report["greedy"] = autoregressive(vae, var, pipe, labels, args.seed, top_k=1, top_p=1.0)
                report["sampled"] = autoregressive(vae, var, pipe, labels, args.seed, **SAMPLED)
        clock["parity_s"] = time.perf_counter() - start - sum(clock.values())
        del vae, var, pipe
        if not args.skip_speed:
            report["speed"] = {"repeats": args.repeats, "warmup": args.warmup, "rounds": args.rounds}
            report["speed"].update(speed(workdir, args))
            clock["speed_s"] = time.perf_counter() - start - sum(clock.values())
    clock["total_s"] = time.perf_counter() - start
    report["wall_clock"] = {k: round(v, 1) for k, v in clock.items()}
    report["torch"] = torch.__version__
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
