"""Where in the token pyramid a post-trained digits model moved its likelihood, scale by scale.

    python examples/post_training/likelihood_by_scale.py --model ddo-run/pipeline [--model cca-run/pipeline ...]

Prints one JSON object:

- ``nats_per_token``: the reference's (default var-digits) mean −log p per token at each scale, teacher forced, on
  the real training digits; on the same after a tokenizer round trip (tokenize → decode → 8-bit → tokenize); on its
  own unguided samples as drawn; on the same samples decoded to 8-bit and tokenized again (DDO's re-encoded fakes);
  and ``reencode_changes``: the share of each scale's tokens that the round trip of a sample changes.
- for each ``--model``: the log-likelihood ratio r = log p_model(x|c) − log p_reference(x|c) summed per scale, on
  the reference's own unguided samples (re-encoded), split by whether the digits SVC of ``examples/digits/evaluate.py``
  reads them as their class or misreads them. A post-training that removes misread digits lowers r on the misread
  ones more than on the others, at the scales where a digit's class is decided.

Every figure comes from the given seed's samples; 1,000 samples take about a minute per model on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "digits"))

from evaluate import default_reference  # noqa: E402  (examples/digits)
from prepare_data import load_digits_split  # noqa: E402

from diffusers_var import VARPipeline  # noqa: E402


def _to_model_range(images: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) in [0, 1] → what an 8-bit PNG of them holds, in the tokenizer's [-1, 1]."""
    return (images.float() * 255).round() / 255 * 2 - 1


def _pyramid(token_maps: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten(1) for t in token_maps], dim=1)


@torch.no_grad()
def token_log_likelihoods(pipe: VARPipeline, labels: torch.Tensor, token_maps: list[torch.Tensor]) -> torch.Tensor:
    """(n, L) log p of each target token, teacher forced, in batches of 250."""
    out = []
    for i in range(0, len(labels), 250):
        maps = [t[i : i + 250] for t in token_maps]
        logits = pipe.transformer(labels[i : i + 250], pipe.vqvae.next_scale_inputs(maps)).logits.float()
        out.append(-F.cross_entropy(logits.transpose(1, 2), _pyramid(maps), reduction="none"))
    return torch.cat(out)


def per_scale(values: torch.Tensor, begin_ends, reduce: str) -> list[float] | None:
    """Per scale: the mean over rows of the per-token mean (``"mean"``) or of the per-scale sum (``"sum"``);
    ``None`` without rows (e.g. no misread sample)."""
    if len(values) == 0:
        return None
    parts = [values[:, b:e].mean(1) if reduce == "mean" else values[:, b:e].sum(1) for b, e in begin_ends]
    return [round(float(p.mean()), 3) for p in parts]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=[], help="a post-trained pipeline folder (repeatable)")
    parser.add_argument("--reference", default="var-digits", help="the model the others are compared with")
    parser.add_argument("--num-samples", type=int, default=1000, help="reference samples (cycling through digits)")
    parser.add_argument("--num-real", type=int, help="real training digits to read (default: all 1,437)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be ≥ 1, got {args.threads}")
    if args.num_real is not None and args.num_real < 1:
        parser.error(f"--num-real must be ≥ 1, got {args.num_real}")
    if args.num_samples < 10:
        parser.error(f"--num-samples must be ≥ 10 (one per digit), got {args.num_samples}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    reference = VARPipeline.from_pretrained(args.reference)
    reference.set_progress_bar_config(disable=True)
    begin_ends = reference.transformer.begin_ends
    vqvae = reference.vqvae

    train_images, train_labels, _, _ = load_digits_split()
    train_images, train_labels = train_images[: args.num_real], train_labels[: args.num_real]
    real = torch.from_numpy(train_images).permute(0, 3, 1, 2).float() / 255
    real_labels = torch.from_numpy(train_labels).long()
    real_maps = vqvae.tokenize(_to_model_range(real))
    round_trip = vqvae.tokenize(_to_model_range(((vqvae.detokenize(real_maps) + 1) / 2).clamp(0, 1)))

    labels = torch.arange(args.num_samples) % 10
    generator = torch.Generator().manual_seed(args.seed)
    output = reference(
        class_labels=labels.tolist(), guidance_scale=1.0, top_k=0, top_p=1.0, generator=generator, output_type="pt"
    )
    reencoded = vqvae.tokenize(_to_model_range(output.images))
    pixels = (output.images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    misread = torch.from_numpy(default_reference().predict(pixels) != labels.numpy())

    def nats(pipe, lab, maps):
        return per_scale(-token_log_likelihoods(pipe, lab, maps), begin_ends, "mean")

    report = {
        "reference": args.reference,
        "seed": args.seed,
        "num_samples": args.num_samples,
        "patch_nums": list(reference.transformer.patch_nums),
        "misread_share": round(float(misread.float().mean()), 4),
        "nats_per_token": {
            "real": nats(reference, real_labels, real_maps),
            "real_round_trip": nats(reference, real_labels, round_trip),
            "samples_as_drawn": nats(reference, labels, output.token_maps),
            "samples_reencoded": nats(reference, labels, reencoded),
        },
        "reencode_changes": [round(float((a != b).float().mean()), 3) for a, b in zip(output.token_maps, reencoded)],
        "models": {},
    }
    base = token_log_likelihoods(reference, labels, reencoded)
    for folder in args.model:
        model = VARPipeline.from_pretrained(folder)
        ratio = token_log_likelihoods(model, labels, reencoded) - base
        report["models"][folder] = {
            "r_read_right": per_scale(ratio[~misread], begin_ends, "sum"),
            "r_misread": per_scale(ratio[misread], begin_ends, "sum"),
        }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
