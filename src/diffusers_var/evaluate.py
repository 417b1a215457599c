"""``diffusers-var evaluate``: FID, Inception Score, KID and precision/recall of samples against a reference.

Usage::

    diffusers-var evaluate --samples samples/ --reference real/ --features digits-classifier --output metrics.json
    diffusers-var evaluate --samples samples.npz --reference VIRTUAL_imagenet256_labeled.npz \\
        --features inception=pt_inception-2015-12-05-6726825d.pth --output metrics.json
    diffusers-var evaluate --samples a/ --reference real/ --features facebook/dinov2-base --save-stats real.npz ...

``--samples`` and ``--reference`` are folders of images or ``.npz`` files (``arr_0``: uint8 N×H×W×3); the
reference may also be statistics (an ``.npz`` with ``mu`` and ``sigma``): FID then needs nothing else, KID and
precision/recall are skipped. The ADM reference batch holds both; its stored Inception statistics are used, not
recomputed, when ``--features`` is the FID Inception network. ``--features`` is any spec of
:mod:`diffusers_var.evaluation.image_models`.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .evaluation.image_models import ImageModel, load_image_model
from .evaluation.metrics import (
    FeatureStatistics,
    frechet_inception_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from .evaluation.samples import ImageSet


def extract(model: ImageModel, images: ImageSet, batch_size: int, want_log_probs: bool, desc: str):
    """(features (N, d), log-probabilities (N, C) or None) of every image of a set."""
    features, log_probs = [], []
    with tqdm(total=len(images), desc=desc, unit="img") as progress:
        for batch in images.batches(batch_size):
            features.append(model.features(batch))
            if want_log_probs:
                log_probs.append(model.log_probs(batch))
            progress.update(len(batch))
    return torch.cat(features), torch.cat(log_probs) if want_log_probs else None


def read_statistics(path: Path, model: ImageModel) -> FeatureStatistics | None:
    """Stored statistics usable in ``model``'s feature space, or None if the file holds only images (or stored
    statistics of another network, which the caller then recomputes from the images)."""
    with np.load(path) as data:
        keys = set(data.files)
        if not {"mu", "sigma"} <= keys:
            if "arr_0" not in keys:
                raise ValueError(
                    f"{path} holds neither statistics (mu, sigma) nor images (arr_0): its arrays are {sorted(keys)}. "
                    "Write statistics with --save-stats, or pass a folder of images."
                )
            return None
        stored_by = str(data["weights_sha256"]) if "weights_sha256" in keys else None
        count = int(data["count"]) if "count" in keys else len(data["arr_0"]) if "arr_0" in keys else 2
        stats = FeatureStatistics(data["mu"].astype(np.float64), data["sigma"].astype(np.float64), count)
    description = model.describe()
    if stored_by is not None and stored_by != description["weights_sha256"]:
        raise ValueError(
            f"{path} holds statistics of another feature network (weights {stored_by[:12]}…, not "
            f"{description['weights_sha256'][:12]}…). Compute the reference with the same --features."
        )
    if stored_by is None and not description["extractor"].startswith("FID Inception"):
        if "arr_0" in keys:
            return None  # e.g. the ADM batch: its statistics are Inception's; recompute in this space from arr_0
        warnings.warn(
            f"{path} does not say which network made its statistics; they are taken as {model.name}'s.", stacklevel=2
        )
    if stats.mu.shape[0] != stats.sigma.shape[0]:
        raise ValueError(f"{path}: mu has {stats.mu.shape[0]} dimensions but sigma is {stats.sigma.shape}.")
    return stats


def _has_images(path: Path) -> bool:
    if path.is_dir():
        return True
    with np.load(path) as data:
        return "arr_0" in data.files


def evaluate(args: argparse.Namespace) -> dict:
    """Run the command; returns the metrics it wrote."""
    for flag in ("batch_size", "is_splits", "kid_subsets", "kid_subset_size", "pr_k"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be ≥ 1, got {getattr(args, flag)}.")
    reference_path = Path(args.reference)
    if not reference_path.exists():
        raise ValueError(f"--reference {reference_path} does not exist.")
    from .generate import DTYPES, check_device

    dtype = DTYPES[args.dtype]
    if args.features.startswith("inception=") and dtype != torch.float32:
        raise ValueError(
            f"--dtype {args.dtype}: the FID Inception network runs in fp32, as the published FIDs were measured; "
            "drop --dtype (lower precision moves FID, see the README)."
        )
    model = load_image_model(args.features, check_device(args.device), dtype)
    samples = ImageSet(args.samples)
    stored = read_statistics(reference_path, model) if reference_path.suffix == ".npz" else None
    reference_images = ImageSet(reference_path) if _has_images(reference_path) else None
    if reference_images is not None and reference_images.image_size != samples.image_size:
        (h1, w1), (h2, w2) = samples.image_size, reference_images.image_size
        raise ValueError(
            f"The samples are {w1}×{h1} px but the reference {reference_path} is {w2}×{h2}: FID depends on the "
            "resolution. Sample at the reference's resolution (or resize both knowingly, the same way)."
        )
    sample_features, sample_log_probs = extract(model, samples, args.batch_size, model.has_logits, "Samples")
    reference_features = None
    if reference_images is not None:
        reference_features, _ = extract(model, reference_images, args.batch_size, False, "Reference")
    reference_stats = stored if stored is not None else FeatureStatistics.of(reference_features)

    metrics = {"fid": frechet_inception_distance(reference_stats, FeatureStatistics.of(sample_features))}
    if sample_log_probs is not None:
        metrics["inception_score"], metrics["inception_score_std"] = inception_score(sample_log_probs, args.is_splits)
    if reference_features is not None:
        metrics["kid_mean"], metrics["kid_std"] = kernel_inception_distance(
            reference_features, sample_features, args.kid_subsets, args.kid_subset_size
        )
        metrics["precision"], metrics["recall"] = precision_recall(reference_features, sample_features, args.pr_k)
    else:  # statistics alone: FID only
        metrics.update(kid_mean=None, kid_std=None, precision=None, recall=None)
    description = model.describe()
    report = {
        **metrics,
        **description,
        "num_samples": len(samples),
        "num_reference": reference_stats.count,
        "reference_statistics": "stored in the reference file" if stored is not None else "computed from its images",
        "samples": str(args.samples),
        "reference": str(args.reference),
        "image_size": list(samples.image_size),
        "sample_dtype": "uint8",  # PNG/npz pixels as written: nothing is re-quantised or resized before the extractor
        "statistics_dtype": "float64",
    }
    if args.save_stats:
        _write_json_or_npz(
            Path(args.save_stats),
            mu=reference_stats.mu,
            sigma=reference_stats.sigma,
            count=np.int64(reference_stats.count),
            extractor=np.str_(description["extractor"]),
            weights_sha256=np.str_(description["weights_sha256"]),
        )
    _write_json_or_npz(Path(args.output), report=report)
    print(json.dumps({k: report[k] for k in metrics}))
    return report


def _write_json_or_npz(path: Path, report: dict | None = None, **arrays) -> None:
    from .saving import write_text_atomically

    if report is not None:
        write_text_atomically(path, json.dumps(report, indent=1) + "\n")
        return
    import os
    import tempfile

    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent or ".")
    os.close(handle)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", required=True, help="a folder of images or an .npz (arr_0) (required)")
    parser.add_argument(
        "--reference", required=True, help="a folder of images, an .npz of images, or statistics (mu, sigma) (required)"
    )
    parser.add_argument(
        "--features",
        required=True,
        help="the feature network: a transformers image model folder, repo id or bundled name (digits-classifier), "
        "or inception=PATH (required)",
    )
    parser.add_argument("--output", default="metrics.json", help="the metrics JSON (default: metrics.json)")
    parser.add_argument("--save-stats", default=None, help="also write the reference's statistics to this .npz")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    parser.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="the feature network's weights and compute; published FIDs use fp32 (default: fp32)",
    )
    parser.add_argument("--is-splits", type=int, default=10, help="Inception Score splits (default: 10)")
    parser.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default: 100)")
    parser.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (default: 1000)")
    parser.add_argument("--pr-k", type=int, default=3, help="k of the k-NN precision/recall (default: 3)")


def main(argv: list[str] | None = None) -> None:
    """``python -m diffusers_var.evaluate``: the same as ``diffusers-var evaluate``."""
    from .cli import command_main

    command_main("evaluate", argv)


if __name__ == "__main__":
    main()
