"""How much the evaluation protocol alone moves FID: the same var-digits samples, scored under the choices that make
people's ImageNet FIDs differ from the paper's (reference set, stored or recomputed reference statistics, JPEG,
resizing, the extractor's dtype, the sample count).

    python examples/digits/fid_sensitivity.py --output_dir fid-sensitivity

One ``diffusers-var generate --output-npz`` run (var-digits with its default sampling settings, 300 per class), and
the real digits of ``prepare_data.py``'s split. The extractor is the bundled ``digits-classifier`` (its pooled 64
features, images through its own processor), standing in for the FID Inception network. The baseline follows the
paper's protocol: PNG samples, float32 features, the reference statistics of the whole training split (as the ADM
reference batch stores statistics of the whole ImageNet training set), 3,000 samples. Every other row changes one
thing. Writes ``fid_sensitivity.json`` and prints a Markdown table (the README quotes it).
"""

from __future__ import annotations

import argparse
import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from evaluate import _write_json_atomically, refuse_foreign_outputs
from prepare_data import load_digits_split

from diffusers_var.evaluation.image_models import load_image_model
from diffusers_var.evaluation.metrics import FeatureStatistics, frechet_inception_distance
from diffusers_var.generate import add_arguments, generate


def sample(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """var-digits samples (uint8 NHWC, labels) from one generate run, kept in ``<output_dir>/samples.npz``."""
    path = Path(args.output_dir) / "samples.npz"
    argv = ["--model", args.model, "--num-per-class", str(args.num_per_class), "--seed", str(args.seed)]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    generate(parser.parse_args([*argv, "--batch-size", str(args.batch_size), "--output-npz", str(path)]))
    with np.load(path) as npz:
        return npz["arr_0"], npz["arr_1"]


def per_image(function: Callable[[PIL.Image.Image], PIL.Image.Image]) -> Callable[[np.ndarray], np.ndarray]:
    return lambda images: np.stack(
        [np.asarray(function(PIL.Image.fromarray(image)).convert("RGB")) for image in images]
    )


def jpeg(quality: int) -> Callable[[np.ndarray], np.ndarray]:
    def round_trip(image: PIL.Image.Image) -> PIL.Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        return PIL.Image.open(io.BytesIO(buffer.getvalue()))

    return per_image(round_trip)


def resized(size: int, method: PIL.Image.Resampling, back: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    def resize(image: PIL.Image.Image) -> PIL.Image.Image:
        out = image.resize((size, size), method)
        return out.resize(image.size, method) if back else out

    return per_image(resize)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="where samples.npz and fid_sensitivity.json go")
    parser.add_argument("--model", default="var-digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_per_class", type=int, default=300, help="300 per class: 3,000 samples")
    parser.add_argument("--batch_size", type=int, default=250)
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    refuse_foreign_outputs([Path(args.output_dir) / "fid_sensitivity.json"])
    torch.manual_seed(0)

    samples, labels = sample(args)
    train, _, test, _ = load_digits_split()
    extractors = {
        dtype: load_image_model("digits-classifier", dtype=dtype) for dtype in (torch.float32, torch.bfloat16)
    }

    def statistics(images: np.ndarray, dtype: torch.dtype = torch.float32) -> FeatureStatistics:
        model = extractors[dtype]
        return FeatureStatistics.of(
            torch.cat([model.features(images[i : i + 500]) for i in range(0, len(images), 500)])
        )

    reference = statistics(train)
    # a subset of 360 training images, as many as the held-out split: the digits' "10k images of the ADM batch"
    subset = np.random.default_rng(0).choice(len(train), size=len(test), replace=False)
    first_100_per_class = np.concatenate([np.flatnonzero(labels == c)[:100] for c in np.unique(labels)])
    rows = {
        "baseline: PNG, float32, stored statistics of the whole training split, 3,000 samples": (
            statistics(samples),
            reference,
        ),
        "reference: the 360 held-out images instead of the training split": (statistics(samples), statistics(test)),
        "reference statistics recomputed from 360 training images": (statistics(samples), statistics(train[subset])),
        "samples saved as JPEG, quality 95": (statistics(jpeg(95)(samples)), reference),
        "samples saved as JPEG, quality 75": (statistics(jpeg(75)(samples)), reference),
        "samples resized 32 → 24 → 32 px (bicubic) before evaluation": (
            statistics(resized(24, PIL.Image.Resampling.BICUBIC, back=True)(samples)),
            reference,
        ),
        "samples upsampled to 64 px (bicubic) before the extractor's own bilinear resize": (
            statistics(resized(64, PIL.Image.Resampling.BICUBIC)(samples)),
            reference,
        ),
        "samples and reference upsampled to 64 px (nearest) before it": (
            statistics(resized(64, PIL.Image.Resampling.NEAREST)(samples)),
            statistics(resized(64, PIL.Image.Resampling.NEAREST)(train)),
        ),
        "extractor in bfloat16 (samples and reference)": (
            statistics(samples, torch.bfloat16),
            statistics(train, torch.bfloat16),
        ),
        "1,000 samples (100 per class)": (statistics(samples[first_100_per_class]), reference),
        "floor: the 360 held-out real images in place of samples": (statistics(test), reference),
    }
    results = {name: frechet_inception_distance(ref, smp) for name, (smp, ref) in rows.items()}
    baseline = next(iter(results.values()))
    report = {
        "settings": {
            "model": args.model, "seed": args.seed, "samples": len(samples), "reference": f"{len(train)} train",
            "extractor": extractors[torch.float32].describe(),
        },
        "fid": results,
        "relative_to_baseline": {name: value / baseline for name, value in results.items()},
    }  # fmt: skip
    _write_json_atomically(report, Path(args.output_dir) / "fid_sensitivity.json")
    print("| evaluation choice | FID | × baseline |\n|---|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.3f} | {value / baseline:.2f} |")
    return report


if __name__ == "__main__":
    main()
