"""Inference-time search on var-digits: verifier score, class agreement and FID against the compute budget.

    python examples/search/digits_search.py --output_dir search-report              # budgets 1-16, plot + table
    python examples/search/digits_search.py --output_dir search-bar --bar --seed 1  # the issue's bar, 1,000 samples

Every algorithm (random, zero-order, paths) searches with the bundled ``digits-classifier`` as its verifier, on
var-digits sampled without guidance or top-k/top-p (guidance 1.0, top_k 0, top_p 1.0), so that a few percent of
plain samples are ambiguous digits. The results are judged by what the search never sees: the scikit-learn SVC of
``examples/digits/evaluate.py`` (class agreement; its misreads are the error rate) and the digits FID of that file
(its MLP features, against the held-out real digits).

Writes ``search.json`` (per algorithm and budget: mean verifier p(y|x), SVC agreement, FID, budget used, verifier
calls) and ``search.png`` (the three figures against the budget). With ``--bar``: budget 8 only, plus plain
sampling and random search with soft selection (``selection_temperature`` 0.5, against verifier overfitting),
100 per class, and ``bar.json`` with each algorithm's error rate against plain sampling's and every FID.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "digits"))
from evaluate import _write_json_atomically, default_reference, digits_fid, refuse_foreign_outputs  # noqa: E402
from prepare_data import load_digits_split  # noqa: E402

from diffusers_var import VARPipeline  # noqa: E402
from diffusers_var.generate import sample_seed, save_image_atomically  # noqa: E402
from diffusers_var.search import ClassifierVerifier  # noqa: E402
from diffusers_var.search.algorithms import ALGORITHMS, SearchSampler  # noqa: E402

UNGUIDED = {"guidance_scale": 1.0, "top_k": 0, "top_p": 1.0}
COLOURS = {"random": (31, 119, 180), "zero-order": (255, 127, 14), "paths": (44, 160, 44)}


def run(
    pipe, verifier, algorithm: str, budget: float, labels: list[int], seed: int, batch_size: int, **options
) -> dict:
    """One search over ``labels`` (in batches); the figures that judge it."""
    reference = default_reference()
    images, scores, used, calls = [], [], 0.0, 0
    jobs = [(c, sum(1 for d in labels[:k] if d == c)) for k, c in enumerate(labels)]  # (class, index in class)
    for start in range(0, len(labels), batch_size):
        chunk = labels[start : start + batch_size]
        # each image's seed is generate's for its (class, index): independent of the batching
        generators = [
            torch.Generator().manual_seed(sample_seed(seed, c, i)) for c, i in jobs[start : start + batch_size]
        ]
        search = SearchSampler(pipe, verifier, algorithm, budget, **options)
        out = search(chunk, generators, **UNGUIDED)
        images.append(out.images)
        scores.append(out.scores.exp())
        used += out.total_budget_used
        calls += out.verifier_calls
    images, labels_array = np.concatenate(images), np.array(labels)
    _, _, test_images, _ = load_digits_split()
    misread = reference.predict(images) != labels_array
    return {
        "algorithm": algorithm,
        "options": options,
        "budget": budget,
        "samples": len(labels),
        "verifier_p_mean": float(torch.cat(scores).mean()),
        "svc_agreement": float(1 - misread.mean()),
        "svc_error_rate": float(misread.mean()),
        "fid_vs_heldout": digits_fid(images, test_images, reference),
        "budget_used_per_image": used / len(labels),
        "verifier_calls_per_image": calls / len(labels),
    }


def plot(results: list[dict], path: Path) -> None:
    """Three panels (verifier p, SVC agreement, FID) against the budget, one line per algorithm (PIL, no plotting
    library needed)."""
    panels = [("verifier_p_mean", "verifier p(y|x)"), ("svc_agreement", "SVC agreement"), ("fid_vs_heldout", "FID")]
    width, height, margin = 360, 260, 48
    canvas = PIL.Image.new("RGB", (len(panels) * width, height + 40), "white")
    draw = PIL.ImageDraw.Draw(canvas)
    budgets = sorted({r["budget"] for r in results})
    for p, (key, title) in enumerate(panels):
        left = p * width + margin
        values = [r[key] for r in results]
        low, high = min(values), max(values)
        pad = (high - low) * 0.1 or 1e-3
        low, high = low - pad, high + pad

        def xy(budget, value, left=left, low=low, high=high):
            x = left + (np.log2(budget) / max(np.log2(budgets[-1]), 1)) * (width - 2 * margin)
            y = 20 + (1 - (value - low) / (high - low)) * (height - 40)
            return x, y

        draw.rectangle([left, 20, left + width - 2 * margin, height - 20], outline="black")
        draw.text((left + (width - 2 * margin) / 2, 8), title, fill="black", anchor="mm")
        for budget in budgets:
            x, _ = xy(budget, low)
            draw.text((x, height - 8), f"{budget:g}", fill="black", anchor="mm")
        for value in (low + pad, high - pad):
            _, y = xy(budgets[0], value)
            draw.text((left - 4, y), f"{value:.3g}", fill="black", anchor="rm")
        for algorithm in ALGORITHMS:
            points = [xy(r["budget"], r[key]) for r in results if r["algorithm"] == algorithm]
            if len(points) > 1:
                draw.line(points, fill=COLOURS[algorithm], width=2)
            for x, y in points:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=COLOURS[algorithm])
    for k, algorithm in enumerate(ALGORITHMS):
        x = margin + k * 140
        draw.line([(x, height + 22), (x + 24, height + 22)], fill=COLOURS[algorithm], width=3)
        draw.text((x + 30, height + 22), algorithm, fill="black", anchor="lm")
    draw.text((len(panels) * width - 8, height + 22), "budget (plain samples, log scale)", fill="black", anchor="rm")
    save_image_atomically(canvas, path, "search against budget")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model", default="var-digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_per_class", type=int, default=None, help="default 20 (100 with --bar)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--bar", action="store_true", help="budget 8 against plain sampling, 100 per class")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    os.makedirs(out, exist_ok=True)
    refuse_foreign_outputs([out / name for name in ("search.json", "search.png", "bar.json")])
    pipe = VARPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    verifier = ClassifierVerifier("digits-classifier")
    per_class = args.num_per_class or (100 if args.bar else 20)
    labels = [c for c in range(pipe.transformer.config.num_classes) for _ in range(per_class)]
    if args.bar:
        report = {"plain": run(pipe, verifier, "random", 1, labels, args.seed, args.batch_size)}
        for algorithm in ALGORITHMS:
            report[algorithm] = run(pipe, verifier, algorithm, 8, labels, args.seed, args.batch_size)
            report[algorithm]["error_vs_plain"] = report[algorithm]["svc_error_rate"] / max(
                report["plain"]["svc_error_rate"], 1e-12
            )
            print(algorithm, json.dumps(report[algorithm]), flush=True)
        # against verifier overfitting: the kept image drawn ∝ exp(log p / T) instead of the best
        soft = run(pipe, verifier, "random", 8, labels, args.seed, args.batch_size, selection_temperature=0.5)
        report["random, selection_temperature 0.5"] = soft
        print("random soft", json.dumps(soft), flush=True)
        _write_json_atomically(report, out / "bar.json")
        return report
    results = []
    for algorithm in ALGORITHMS:
        for budget in args.budgets:
            if algorithm == "zero-order" and budget < 4:  # a pivot and one round of 3 neighbours: budget ≥ 4
                continue
            results.append(run(pipe, verifier, algorithm, budget, labels, args.seed, args.batch_size))
            print(json.dumps(results[-1]), flush=True)
    report = {"settings": {"model": args.model, "seed": args.seed, "per_class": per_class, **UNGUIDED}}
    report["results"] = results
    _write_json_atomically(report, out / "search.json")
    plot(results, out / "search.png")
    return report


if __name__ == "__main__":
    main()
