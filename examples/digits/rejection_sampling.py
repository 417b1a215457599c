"""Measure classifier rejection sampling on var-digits: how much it cuts the share of samples an outside classifier
misreads, in final and early mode, and what it costs.

    python examples/digits/rejection_sampling.py --output_dir rejection-report --seed 1

Three runs of ``diffusers-var generate`` (``--output-npz``), unguided and unfiltered (guidance 1.0, top-k 0, top-p
1.0) so that a few percent of plain samples are ambiguous digits: plain sampling, then ``--rejection-classifier
digits-classifier --oversample 4`` in final mode and in early mode (its default scale). Each sample is read by the
scikit-learn SVC of ``evaluate.py`` (trained on the real digits' training split, outside this project's models),
whose misreads give the error rate. The ``digits-classifier`` that chose the samples is not the judge.

Writes ``report.json`` (error rates, confidence, acceptance rate and compute of each run) and ``misread.png``: the
plain samples the SVC misreads (top row) above the images rejection kept for the same (class, index) in final and
early mode. The npz files stay beside them.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
from evaluate import _write_json_atomically, default_reference, refuse_foreign_outputs

from diffusers_var.generate import add_arguments, generate, save_image_atomically

RUNS = {
    "plain": [],
    "final": ["--rejection-classifier", "digits-classifier", "--rejection-mode", "final"],
    "early": ["--rejection-classifier", "digits-classifier", "--rejection-mode", "early"],
}
UNGUIDED = ["--guidance-scale", "1.0", "--top-k", "0", "--top-p", "1.0"]


def sample(run: str, args: argparse.Namespace) -> Path:
    """One generate run into ``<output_dir>/<run>.npz``."""
    path = Path(args.output_dir) / f"{run}.npz"
    argv = ["--model", args.model, "--num-per-class", str(args.num_per_class), "--seed", str(args.seed)]
    argv += ["--batch-size", str(args.batch_size), "--output-npz", str(path), *UNGUIDED, *RUNS[run]]
    if run != "plain":
        argv += ["--oversample", str(args.oversample)]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    generate(parser.parse_args(argv))
    return path


def _settings(path: Path) -> dict:
    with np.load(path) as npz:
        return json.loads(str(npz["diffusers_var_settings"]))


def measure(path: Path) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """The run's error rate under the SVC, and its images, labels and per-image misread flags."""
    from diffusers_var.search import ClassifierVerifier

    with np.load(path) as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    settings = _settings(path)
    misread = default_reference().predict(images) != labels
    confidence = ClassifierVerifier("digits-classifier")(images, labels).exp().numpy()
    figures = {
        "samples": len(labels),
        "svc_error_rate": float(misread.mean()),
        "svc_misread": int(misread.sum()),
        "digits_classifier_confidence_mean": float(confidence.mean()),
        "digits_classifier_confidence_below_0.5": float((confidence < 0.5).mean()),
    }
    rejection = settings.get("rejection")
    if rejection:
        totals = rejection["totals"]
        figures |= {
            "mode": rejection["mode"],
            "oversample": rejection["oversample"],
            "rejection_scale": rejection["rejection_scale"],
            "acceptance_rate": totals["acceptance_rate"],
            "relative_compute": totals["relative_compute"],
            "previews_decoded": totals["previews_decoded"],
        }
    return figures, images, labels, misread


def misread_figure(images: dict[str, np.ndarray], misread: np.ndarray, labels: np.ndarray, limit: int = 24):
    """Columns: plain samples the SVC misreads, taken from every class in turn; rows: plain, final, early (the
    same class and index)."""
    by_class = [np.flatnonzero(misread & (labels == c)) for c in np.unique(labels)]
    columns = [i for rank in range(limit) for found in by_class for i in found[rank : rank + 1]][:limit]  # round robin
    columns.sort()
    cell, label_width, gutter = 96, 70, 4
    canvas = PIL.Image.new(
        "RGB", (label_width + max(len(columns), 1) * (cell + gutter), 22 + len(images) * (cell + gutter)), "white"
    )
    draw = PIL.ImageDraw.Draw(canvas)
    for row, (name, run_images) in enumerate(images.items()):
        top = 22 + row * (cell + gutter)
        draw.text((4, top + cell // 2), name, fill="black", anchor="lm")
        for column, index in enumerate(columns):
            left = label_width + column * (cell + gutter)
            if row == 0:
                draw.text((left + cell // 2, 11), f"class {labels[index]}", fill="black", anchor="mm")
            tile = PIL.Image.fromarray(run_images[index]).resize((cell, cell), PIL.Image.Resampling.NEAREST)
            canvas.paste(tile, (left, top))
    return canvas


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="where the npz files, report.json and misread.png go")
    parser.add_argument("--model", default="var-digits")
    parser.add_argument("--seed", type=int, default=1, help="generate's --seed (the bar is checked on others too)")
    parser.add_argument("--num_per_class", type=int, default=300, help="300 per class: 3,000 samples per run")
    parser.add_argument("--oversample", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=250)
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    refuse_foreign_outputs([Path(args.output_dir) / "report.json", Path(args.output_dir) / "misread.png"])

    report, images = {}, {}
    for run in RUNS:
        figures, images[run], labels, misread = measure(sample(run, args))
        report[run] = figures
        if run == "plain":
            plain_misread = misread
    for run in ("final", "early"):
        report[run]["error_rate_vs_plain"] = report[run]["svc_error_rate"] / max(
            report["plain"]["svc_error_rate"], 1e-12
        )
    report["settings"] = {
        "model": args.model, "seed": args.seed, "num_per_class": args.num_per_class, "oversample": args.oversample,
        "sampling": "guidance 1.0, top_k 0, top_p 1.0", "judge": "SVC(C=10, gamma='scale') on 8x8 box-averaged grey",
    }  # fmt: skip
    out = Path(args.output_dir)
    _write_json_atomically(report, out / "report.json")
    save_image_atomically(misread_figure(images, plain_misread, labels), out / "misread.png", "rejection sampling")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
