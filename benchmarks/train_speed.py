"""Training throughput and peak memory of one optimiser step, printed as one JSON object.

A step is what the training scripts do per batch: for ``--target transformer`` tokenize the images with the frozen
tokenizer, teacher-forced forward, backward, gradient clipping and AdamW; for ``--target vqvae`` the tokenizer's
forward with its VQ loss, backward and AdamW. Tokens/s is batch × L (tokens per image, all scales) over the median
step time of ``--repeats`` steps after ``--warmup`` untimed ones. ``--lora-rank R`` trains LoRA adapters only (as
``train_var.py --lora_rank``); the JSON gives the trainable parameters either way. Peak memory is measured as in
``sample_speed.py`` (CUDA allocator peak, or the process peak RSS on CPU). Random weights time the same work as
real ones.

``--objective cca|ddo`` times a post-training step instead (train_var.py ``--objective``): the trained model and a
frozen reference (``--offload-reference``: kept in CPU memory) scoring each image under two labels (CCA) or the real
images beside as many reference samples (DDO; random token pyramids stand in for the samples, whose drawing once per
round is not part of the step). Tokens/s counts the real images' tokens, so it compares the cost per training image.
``--objective all`` runs ce, cca and ddo each in its own process (peak memory is per process) and prints the three
results with their ratios to ce.

``--official-repo DIR`` (with ``--preset``) compares our step with the official code's on the same weights: the
official VQVAE and VAR are built by their own constructors with seeded weights (as ``compare_official.py``),
converted, and each side runs in its own process: the official tokenizes with ``img_to_idxBl``, runs ``VAR.forward``
in training mode, cross-entropy, backward, clipping and AdamW; ours is the step above. Prints both and the ratios.

Examples::

    python benchmarks/train_speed.py --preset var-d16 --batch-size 4 --threads 2
    python benchmarks/train_speed.py --preset var-d16 --device cuda --precision bf16 --batch-size 64
    python benchmarks/train_speed.py --tiny --target vqvae --repeats 5
    python benchmarks/train_speed.py --model var-digits --batch-size 64 --lora-rank 4   # vs. without --lora-rank
    python benchmarks/train_speed.py --model var-digits --batch-size 64 --objective all --threads 2
    python benchmarks/train_speed.py --preset var-d16 --batch-size 2 --threads 2 --official-repo /tmp/var_official
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling sample_speed.py, also when imported
from sample_speed import random_pipeline, spread_labels, time_sampling  # noqa: E402

from diffusers_var import VARPipeline  # noqa: E402
from diffusers_var.convert import PRESETS  # noqa: E402
from diffusers_var.training.cca import cca_batch_loss  # noqa: E402
from diffusers_var.training.ddo import ddo_batch_loss  # noqa: E402
from diffusers_var.training.objective import teacher_forcing_batch, var_loss  # noqa: E402
from diffusers_var.training.optim import make_optimizer  # noqa: E402
from diffusers_var.training.reference import disable_dropout, frozen_reference  # noqa: E402
from diffusers_var.training.self_play import split_token_maps  # noqa: E402

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a VARPipeline folder")
    source.add_argument("--preset", choices=sorted(PRESETS), help="random weights at an official size")
    source.add_argument("--tiny", action="store_true", help="a tiny random model (smoke test)")
    parser.add_argument("--target", choices=("transformer", "vqvae"), default="transformer")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32", help="autocast dtype")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank only (transformer)")
    parser.add_argument(
        "--objective", choices=("ce", "cca", "ddo", "all"), default="ce", help="the transformer's training objective"
    )
    parser.add_argument("--offload-reference", action="store_true", help="cca/ddo: the reference in CPU memory")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--official-repo", help="a FoundationVision/VAR checkout: compare with its training step")
    parser.add_argument("--official-worker", help=argparse.SUPPRESS)  # a folder with vae.pth and var.pth
    return parser.parse_args(argv)


def official_step(args: argparse.Namespace):
    """The official code's training step on the weights in ``args.official_worker``, as a ``step()`` callable."""
    from compare_official import official_models

    vae, var = official_models(args.official_repo, args.preset)
    vae.load_state_dict(torch.load(Path(args.official_worker, "vae.pth"), weights_only=True))
    var.load_state_dict(torch.load(Path(args.official_worker, "var.pth"), weights_only=True))
    vae, var = vae.to(args.device).requires_grad_(False), var.to(args.device).train()
    var.cond_drop_rate = 0.1  # the official training default, as our config's class_dropout_prob
    size = vae.quantize.v_patch_nums[-1] * 16
    generator = torch.Generator().manual_seed(args.seed)
    images = (torch.rand(args.batch_size, 3, size, size, generator=generator) * 2 - 1).to(args.device)
    labels = torch.tensor(spread_labels(args.batch_size, var.num_classes), device=args.device)
    autocast = torch.autocast(args.device, dtype=PRECISIONS[args.precision], enabled=args.precision != "fp32")
    optimizer = torch.optim.AdamW(var.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)

    def step() -> None:
        with torch.no_grad():
            tokens = vae.img_to_idxBl(images)
            inputs = vae.quantize.idxBl_to_var_input(tokens)
        with autocast:
            logits = var(labels, inputs)
        targets = torch.cat(tokens, dim=1)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(var.parameters(), 2.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    tokens_per_image = sum(p * p for p in vae.quantize.v_patch_nums)
    return step, tokens_per_image, sum(p.numel() for p in var.parameters())


def compare_with_official(argv: list[str], args: argparse.Namespace) -> dict:
    """Both sides on the same seeded weights, each in its own process (peak memory is per process)."""
    import tempfile

    from compare_official import official_models, reinit_

    from diffusers_var.convert import convert

    base = _without_option(_without_option(argv, "--preset"), "--official-repo")
    with tempfile.TemporaryDirectory(prefix="var-train-speed-") as workdir:
        vae, var = official_models(args.official_repo, args.preset)
        reinit_(vae, var, args.seed)
        torch.save(vae.state_dict(), Path(workdir, "vae.pth"))
        torch.save(var.state_dict(), Path(workdir, "var.pth"))
        convert(Path(workdir, "vae.pth"), Path(workdir, "var.pth"), Path(workdir, "pipeline"), preset=args.preset)
        del vae, var
        script = [sys.executable, str(Path(__file__).resolve())]
        ours_command = [*script, *base, "--model", str(Path(workdir, "pipeline"))]
        official_command = [*script, *argv, "--official-worker", workdir]
        results = {}
        for side, command in (("official", official_command), ("ours", ours_command)):
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            results[side] = json.loads(done.stdout[done.stdout.index("{") :])
    summary = {
        "preset": args.preset,
        "official": results["official"],
        "ours": results["ours"],
        "tokens_per_s_ratio_ours_over_official": round(
            results["ours"]["tokens_per_s"] / results["official"]["tokens_per_s"], 3
        ),
        "peak_memory_ratio_ours_over_official": round(
            results["ours"]["peak_memory_mib"] / results["official"]["peak_memory_mib"], 3
        ),
    }
    print(json.dumps(summary, indent=1))
    return summary


def _without_option(command: list[str], option: str) -> list[str]:
    """``command`` without ``option`` and its value."""
    kept, skip = [], False
    for item in command:
        if skip:
            skip = False
        elif item == option:
            skip = True
        else:
            kept.append(item)
    return kept


def compare_objectives(argv: list[str]) -> dict:
    """``--objective all``: each objective in its own process (peak memory is per process), and ratios to ce."""
    base = _without_option(argv, "--objective")
    results = {}
    for objective in ("ce", "cca", "ddo"):
        command = [sys.executable, str(Path(__file__).resolve()), *base, "--objective", objective]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[objective] = json.loads(output)
    ce = results["ce"]
    summary = {
        "objectives": results,
        "relative_to_ce": {
            name: {
                "tokens_per_s": round(result["tokens_per_s"] / ce["tokens_per_s"], 3),
                "peak_memory": round(result["peak_memory_mib"] / ce["peak_memory_mib"], 3)
                if result.get("peak_memory_mib") and ce.get("peak_memory_mib")
                else None,
            }
            for name, result in results.items()
        },
    }
    print(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.objective == "all":
        return compare_objectives(argv)
    if args.official_repo and not args.preset:
        raise ValueError("--official-repo compares at an official size: give --preset (e.g. var-d16).")
    if args.official_repo and (args.objective != "ce" or args.target != "transformer" or args.lora_rank):
        raise ValueError(
            "--official-repo compares the plain transformer step: no --objective, --target or --lora-rank."
        )
    if args.official_repo and not args.official_worker:
        return compare_with_official(argv, args)
    if args.offload_reference and args.objective == "ce":
        raise ValueError("--offload-reference offloads the frozen reference of --objective cca or ddo; ce has none.")
    if args.objective != "ce" and (args.target != "transformer" or args.lora_rank):
        raise ValueError("--objective cca/ddo post-trains the whole transformer: --target transformer, no --lora-rank.")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision == "fp16" and args.device == "cpu":
        raise ValueError("--precision fp16 needs --device cuda (CPU autocast supports bf16).")
    if args.official_worker:
        step, tokens_per_image, parameters = official_step(args)
        timing = time_sampling(step, args.batch_size, args.repeats, args.warmup, args.device)
        result = {"side": "official", "preset": args.preset, "batch_size": args.batch_size}
        result.update(precision=args.precision, device=args.device, threads=torch.get_num_threads())
        result.update(parameters=parameters, tokens_per_image=tokens_per_image)
        result["tokens_per_s"] = round(timing.pop("images_per_s") * tokens_per_image, 1)
        print(json.dumps({**result, **timing, "torch": torch.__version__}, indent=1))
        return result
    pipe = VARPipeline.from_pretrained(args.model) if args.model else random_pipeline(args.preset, args.seed)
    vqvae, transformer = pipe.vqvae.to(args.device), pipe.transformer.to(args.device)
    size = vqvae.image_size
    generator = torch.Generator().manual_seed(args.seed)
    images = (torch.rand(args.batch_size, 3, size, size, generator=generator) * 2 - 1).to(args.device)
    labels = torch.tensor(spread_labels(args.batch_size, transformer.config.num_classes), device=args.device)
    autocast = torch.autocast(args.device, dtype=PRECISIONS[args.precision], enabled=args.precision != "fp32")
    scaler = torch.amp.GradScaler(args.device, enabled=args.precision == "fp16")

    if args.target == "transformer":
        vqvae.eval().requires_grad_(False)
        model = transformer.train()
        if args.lora_rank:
            from diffusers_var.lora import add_lora, lora_config

            add_lora(model, lora_config(args.lora_rank))
        if args.gradient_checkpointing:
            model.activation_checkpointing_enable()
            if args.lora_rank:
                model.enable_input_require_grads()

        reference = None
        if args.objective != "ce":
            model.config.class_dropout_prob = 0.0  # the objectives draw the null-class rows (as train_var.py)
            disable_dropout(model)
            offload = args.device if args.offload_reference else None
            reference = frozen_reference(model, offload_to=offload)
            reference = reference if offload else reference.to(args.device)
        tokens = sum(p * p for p in vqvae.config.patch_nums)
        fake_targets = torch.randint(transformer.config.vocab_size, (args.batch_size, tokens), generator=generator)
        fake_targets = fake_targets.to(args.device)

        def loss_fn() -> torch.Tensor:
            inputs, targets = teacher_forcing_batch(vqvae, images)
            with autocast:
                if args.objective == "cca":
                    return cca_batch_loss(model, reference, labels, inputs, targets)[0]
                if args.objective == "ddo":
                    fake_maps = split_token_maps(fake_targets, tuple(vqvae.config.patch_nums))
                    fake = (labels, vqvae.next_scale_inputs(fake_maps), fake_targets)
                    return ddo_batch_loss(model, reference, (labels, inputs, targets), fake)[0]
                return var_loss(model, labels, inputs, targets)[0]

    else:
        model = vqvae.train().requires_grad_(True)

        def loss_fn() -> torch.Tensor:
            with autocast:
                output = model(images)
            return F.l1_loss(output.sample.float(), images) + output.vq_loss

    optimizer = make_optimizer(model, 1e-4)

    def step() -> None:
        scaler.scale(loss_fn()).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    timing = time_sampling(step, args.batch_size, args.repeats, args.warmup, args.device)
    tokens_per_image = sum(p * p for p in vqvae.config.patch_nums)
    result = {
        "model": args.model or args.preset or "tiny",
        "target": args.target,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "gradient_checkpointing": args.gradient_checkpointing,
        "lora_rank": args.lora_rank,
        "objective": args.objective if args.target == "transformer" else None,
        "offload_reference": args.offload_reference,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens_per_image": tokens_per_image,
        "tokens_per_s": round(timing.pop("images_per_s") * tokens_per_image, 1),
        "images_per_s": round(args.batch_size / timing["median_s"], 4),
        **timing,
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
