"""Training throughput and peak memory of one optimiser step, printed as one JSON object.

A step is what the training scripts do per batch: for ``--target transformer`` tokenize the images with the frozen
tokenizer, teacher-forced forward, backward, gradient clipping and AdamW; for ``--target vqvae`` the tokenizer's
forward with its VQ loss, backward and AdamW. Tokens/s is batch × L (tokens per image, all scales) over the median
step time of ``--repeats`` steps after ``--warmup`` untimed ones. ``--lora-rank R`` trains LoRA adapters only (as
``train_var.py --lora_rank``); the JSON gives the trainable parameters either way. Peak memory is measured as in
``sample_speed.py`` (CUDA allocator peak, or the process peak RSS on CPU). Random weights time the same work as
real ones.

Examples::

    python benchmarks/train_speed.py --preset var-d16 --batch-size 4 --threads 2
    python benchmarks/train_speed.py --preset var-d16 --device cuda --precision bf16 --batch-size 64
    python benchmarks/train_speed.py --tiny --target vqvae --repeats 5
    python benchmarks/train_speed.py --model var-digits --batch-size 64 --lora-rank 4   # vs. without --lora-rank
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling sample_speed.py, also when imported
from sample_speed import random_pipeline, spread_labels, time_sampling  # noqa: E402

from diffusers_var import VARPipeline  # noqa: E402
from diffusers_var.convert import PRESETS  # noqa: E402
from diffusers_var.training.objective import teacher_forcing_batch, var_loss  # noqa: E402
from diffusers_var.training.optim import make_optimizer  # noqa: E402

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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision == "fp16" and args.device == "cpu":
        raise ValueError("--precision fp16 needs --device cuda (CPU autocast supports bf16).")
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

        def loss_fn() -> torch.Tensor:
            inputs, targets = teacher_forcing_batch(vqvae, images)
            with autocast:
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
