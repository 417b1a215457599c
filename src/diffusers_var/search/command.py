"""``diffusers-var search``: sample with inference-time search (random, zero-order, paths) under a budget.

Usage::

    diffusers-var search --verifier digits-classifier --algorithm paths --budget 8 --output-dir found/
    diffusers-var search --model var-d16 --class-labels 207 --verifier clip:openai/clip-vit-base-patch32 ...

``--verifier``: a classifier (an ``AutoModelForImageClassification`` folder, repo id or bundled name), or
``clip:SPEC`` (CLIP zero-shot over the model's class names), ``linear:BACKBONE:HEAD.safetensors`` (a linear head on a
backbone's features) or ``self:BACKBONE@SCALE`` (agreement of the final image with its preview at SCALE). Each image
``(class, index)`` starts from the seed ``generate`` gives it, so budget 1 (random, paths) writes ``generate``'s
images. A JSON report
(``--report``, default ``search_report.json`` beside the output) holds every image's score and compute.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import PIL.Image
import torch
from tqdm.auto import tqdm

from ..generate import (
    DTYPES,
    GridCanvas,
    _parse_labels,
    _writable_folder,
    check_device,
    check_grid_size,
    check_outputs,
    class_name,
    grid_path,
    sample_seed,
    save_image_atomically,
    wants_grid,
)
from ..saving import write_text_atomically
from .algorithms import ALGORITHMS, SearchSampler
from .verifiers import ClassifierVerifier, CLIPVerifier, LinearHeadVerifier, SelfConsistencyVerifier


def load_verifier(spec: str, pipe, device: torch.device):
    """The verifier a ``--verifier`` spec names (see the module docstring)."""
    kind, _, rest = spec.partition(":")
    if kind == "clip" and rest:
        return CLIPVerifier(rest, pipe.config.id2label, device=device)
    if kind == "linear" and rest:
        backbone, _, head = rest.rpartition(":")
        if not backbone:
            raise ValueError(f"--verifier {spec}: write linear:BACKBONE:HEAD.safetensors.")
        return LinearHeadVerifier(backbone, head, device)
    if kind == "self" and rest:
        backbone, _, scale = rest.rpartition("@")
        if not backbone or not scale.isdigit():
            raise ValueError(f"--verifier {spec}: write self:BACKBONE@SCALE, SCALE a scale index.")
        if int(scale) >= len(pipe.vqvae.config.patch_nums) - 1:
            raise ValueError(
                f"--verifier {spec}: the preview scale must be before the last, in [0, "
                f"{len(pipe.vqvae.config.patch_nums) - 2}]."
            )
        return SelfConsistencyVerifier(backbone, int(scale), device=device)
    return ClassifierVerifier(spec, device)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="var-digits", help="a pipeline folder, bundled name or repo id")
    parser.add_argument("--class-labels", nargs="+", default=None, help="class ids or names (default: every class)")
    parser.add_argument("--num-per-class", type=int, default=4, help="images per class (default: 4)")
    parser.add_argument("--verifier", required=True, help="what scores the candidates (see the description)")
    parser.add_argument("--algorithm", choices=ALGORITHMS, default="random", help="(default: random)")
    parser.add_argument("--budget", type=float, default=4.0, help="compute per image, in plain samples (default: 4)")
    parser.add_argument("--neighbours", type=int, default=None, help="zero-order: neighbours per round (3)")
    parser.add_argument("--redraw-fraction", type=float, default=None, help="zero-order: tokens re-drawn (0.5)")
    parser.add_argument("--redraw-scales", type=int, nargs="+", default=None, help="zero-order (default: all)")
    parser.add_argument("--beam-width", type=int, default=None, help="paths: kept per image (default: budget / 4)")
    parser.add_argument("--branch-factor", type=int, default=None, help="paths: forks (default: what fits)")
    parser.add_argument("--branch-scales", type=int, nargs="+", default=None, help="paths: where to prune")
    parser.add_argument(
        "--selection-temperature",
        type=float,
        default=None,
        help="random and paths: draw the kept image ∝ exp(score / T) instead of the best, against verifier "
        "overfitting (default: the best)",
    )
    parser.add_argument("--guidance-scale", type=float, default=None, help="(default: the pipeline's, 2.5)")
    parser.add_argument("--top-k", type=int, default=None, help="0 = off (default: the pipeline's, 900)")
    parser.add_argument("--top-p", type=float, default=None, help="1.0 = off (default: the pipeline's, 0.96)")
    parser.add_argument("--temperature", type=float, default=None, help="(default: 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="as generate's: an image depends on (seed, class, index)")
    parser.add_argument("--batch-size", type=int, default=16, help="images searched together (default: 16)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="(default: fp32)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--output", default=None, help="a grid image (default: grid.png)")
    target.add_argument("--output-dir", default=None, help="one <class id>_<index>.png per image")
    parser.add_argument("--report", default=None, help="the JSON report (default: search_report.json beside it)")
    parser.add_argument("--overwrite", action="store_true", help="replace files not written by diffusers-var")


OPTIONS = {
    "neighbours": "neighbours", "redraw_fraction": "redraw_fraction", "redraw_scales": "redraw_scales",
    "beam_width": "beam_width", "branch_factor": "branch_factor", "branch_scales": "branch_scales",
    "selection_temperature": "selection_temperature",
}  # fmt: skip


def _report_path(args: argparse.Namespace) -> Path:
    """Where the JSON report goes; a file there that is not an earlier report of this command is never replaced
    without --overwrite."""
    if args.report:
        path = Path(args.report)
    elif args.output_dir:
        path = Path(args.output_dir) / "search_report.json"
    else:
        path = grid_path(args).with_name("search_report.json")
    if path.is_dir():
        raise ValueError(f"--report {path} is a folder; give a file name such as search_report.json.")
    _writable_folder(path.parent, "--report's folder")
    if path.exists() and not args.overwrite:
        try:
            ours = {"algorithm", "per_image"} <= set(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            raise ValueError(f"{path} exists and is not a search report; pass --overwrite or choose --report.")
    return path


def search(args: argparse.Namespace) -> list[Path]:
    """Run the command; returns the written paths."""
    from ..pipelines.search import ALGORITHM_OPTIONS
    from ..pipelines.var import VARPipeline

    for flag in ("num_per_class", "batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be ≥ 1, got {getattr(args, flag)}.")
    options = {name: getattr(args, name) for name in OPTIONS if getattr(args, name) is not None}
    foreign = sorted(set(options) - set(ALGORITHM_OPTIONS[args.algorithm]))
    if foreign:
        flags = ", ".join("--" + name.replace("_", "-") for name in foreign)
        raise ValueError(f"{flags} do not apply to --algorithm {args.algorithm}.")
    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_outputs(args)
    report_path = _report_path(args)
    pipe = VARPipeline.from_pretrained(args.model, dtype=DTYPES[args.dtype]).to(device)
    pipe.set_progress_bar_config(disable=True)
    class_ids = _parse_labels(args.class_labels, pipe)
    jobs = [(c, i) for c in class_ids for i in range(args.num_per_class)]
    check_outputs(args, jobs)
    if wants_grid(args):
        check_grid_size(grid_path(args), len(class_ids), args.num_per_class, pipe.vqvae.image_size)
    verifier = load_verifier(args.verifier, pipe, device)
    if hasattr(verifier, "check_classes"):
        verifier.check_classes(pipe.transformer.config.num_classes)
    for name in ("redraw_scales", "branch_scales"):
        if name in options:
            options[name] = tuple(options[name])
    sampler = SearchSampler(pipe, verifier, args.algorithm, args.budget, **options)
    flags = ("guidance_scale", "top_k", "top_p", "temperature")
    sampling = {name: getattr(args, name) for name in flags if getattr(args, name) is not None}

    written, records = [], []
    canvas = (
        GridCanvas([class_name(pipe, c) for c in class_ids], args.num_per_class, pipe.vqvae.image_size)
        if wants_grid(args)
        else None
    )
    row_of = {c: row for row, c in enumerate(class_ids)}
    with tqdm(total=len(jobs), desc=f"Searching ({args.algorithm}, budget {args.budget:g})", unit="img") as bar:
        for start in range(0, len(jobs), args.batch_size):
            chunk = jobs[start : start + args.batch_size]
            generators = [torch.Generator(device).manual_seed(sample_seed(args.seed, c, i)) for c, i in chunk]
            found = sampler([c for c, _ in chunk], generators, **sampling)
            for k, ((class_id, index), image) in enumerate(zip(chunk, found.images)):
                records.append({
                    "class_id": class_id, "index": index, "score": float(found.scores[k]),
                    "first_score": float(found.first_scores[k]), "budget_used": float(found.budget_used[k]),
                })  # fmt: skip
                if args.output_dir:
                    path = Path(args.output_dir) / f"{class_id}_{index}.png"
                    description = f"{args.model} search={args.algorithm} budget={args.budget:g} seed={args.seed}"
                    save_image_atomically(PIL.Image.fromarray(image), path, description)
                    written.append(path)
                if canvas is not None:
                    canvas.paste(row_of[class_id], index, PIL.Image.fromarray(image))
            records[-1]["verifier_calls_in_batch"] = found.verifier_calls
            bar.update(len(chunk))
    if canvas is not None:
        save_image_atomically(canvas.grid, grid_path(args), f"{args.model} search={args.algorithm}")
        written.append(grid_path(args))
    calls = sum(r.get("verifier_calls_in_batch", 0) for r in records)
    report = {
        "model": str(args.model), "verifier": getattr(verifier, "name", args.verifier), "algorithm": args.algorithm,
        "budget": args.budget, "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
        "sampling": sampling, "seed": args.seed, "images": len(records),
        "budget_used_total": sum(r["budget_used"] for r in records), "verifier_calls": calls,
        "mean_score": sum(r["score"] for r in records) / len(records),
        "mean_first_score": sum(r["first_score"] for r in records) / len(records),
        "per_image": [{k: v for k, v in r.items() if k != "verifier_calls_in_batch"} for r in records],
    }  # fmt: skip
    write_text_atomically(report_path, json.dumps(report, indent=2))
    written.append(report_path)
    print(
        f"{len(records)} images; mean score {report['mean_score']:.4g} (first candidates "
        f"{report['mean_first_score']:.4g}); compute {report['budget_used_total'] / len(records):.2f} plain samples "
        f"per image; {calls} verifier calls."
    )
    return written


def main(argv: list[str] | None = None) -> None:
    """``python -m diffusers_var.search.command``: the same as ``diffusers-var search``."""
    from ..cli import command_main

    command_main("search", argv)


if __name__ == "__main__":
    main()
