"""``diffusers-var generate``: sample class-conditional images from a VARPipeline.

Usage::

    diffusers-var generate                      # the bundled var-digits model, every class → grid.png
    diffusers-var generate --model path/to/pipeline --class-labels 0 1 "golden retriever" --output grid.png
    diffusers-var generate --model org/var-d16 --num-per-class 50 --seed 0 --output-dir samples/

``--output`` writes one labelled grid (a row per class); ``--output-dir`` writes ``<class id>_<index>.png`` per
sample. Files are written to a temporary name and renamed, so an interrupted run leaves no partial image.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import torch
from tqdm.auto import tqdm

from .pipelines.var import VARPipeline

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_MODEL = "var-digits"  # bundled with the package: the command works offline with no arguments


def sample_seed(seed: int, class_id: int, index: int) -> int:
    """A fixed, well-spread seed for each (run seed, class, index)."""
    return (seed * 1_000_000_007 + class_id * 1_000_003 + index) % (2**63)


def save_png_atomically(image: PIL.Image.Image, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(handle)
    try:
        image.save(tmp, format="PNG")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; the image should read like any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def labelled_grid(rows: list[list[PIL.Image.Image]], names: list[str], label_width: int = 0) -> PIL.Image.Image:
    """One row per class, its name written in a margin on the left."""
    width, height = rows[0][0].size
    draw_probe = PIL.ImageDraw.Draw(PIL.Image.new("RGB", (1, 1)))
    label_width = label_width or max(int(draw_probe.textlength(n)) for n in names) + 8
    columns = max(len(r) for r in rows)
    grid = PIL.Image.new("RGB", (label_width + columns * width, len(rows) * height), "white")
    draw = PIL.ImageDraw.Draw(grid)
    for r, (row, name) in enumerate(zip(rows, names)):
        draw.text((4, r * height + max(height // 2 - 6, 0)), name, fill="black")
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB"), (label_width + c * width, r * height))
    return grid


def _class_name(pipe: VARPipeline, class_id: int) -> str:
    id2label = pipe.config.id2label or {}
    name = id2label.get(class_id, id2label.get(str(class_id)))
    return f"{class_id}: {name.split(',')[0]}" if name else str(class_id)


def add_arguments(parser: argparse.ArgumentParser, default_model: str | None = DEFAULT_MODEL) -> None:
    parser.add_argument(
        "--model",
        default=default_model,
        required=default_model is None,
        help="a pipeline folder, a bundled model name (e.g. var-digits) or a Hub repo id",
    )
    parser.add_argument(
        "--class-labels", nargs="+", default=None, help="class ids or names (default: every class of the model)"
    )
    parser.add_argument("--num-per-class", type=int, default=1)
    parser.add_argument("--guidance-scale", type=float, default=None, help="1.0 = no guidance (pipeline default)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--output", default=None, help="labelled grid PNG (default: grid.png)")
    target.add_argument("--output-dir", default=None, help="folder for one PNG per sample")


def _parse_labels(values: list[str] | None, pipe: VARPipeline) -> list[int]:
    if values is None:
        return list(range(pipe.transformer.config.num_classes))
    return pipe._class_ids([int(v) if v.lstrip("-").isdigit() else v for v in values])


def generate(args: argparse.Namespace) -> list[Path]:
    """Run the command; returns the written paths."""
    if args.num_per_class < 1:
        raise ValueError(f"--num-per-class must be ≥ 1, got {args.num_per_class}.")
    pipe = VARPipeline.from_pretrained(args.model, dtype=DTYPES[args.dtype]).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    class_ids = _parse_labels(args.class_labels, pipe)
    sampling = {
        k: v
        for k, v in (("guidance_scale", args.guidance_scale), ("top_k", args.top_k), ("top_p", args.top_p))
        if v is not None
    }
    # one generator per image: a sample depends only on (seed, class, index), not on batching or --class-labels
    jobs = [(c, i) for c in class_ids for i in range(args.num_per_class)]
    images = []
    with tqdm(total=len(jobs), desc="Sampling", unit="img") as progress:
        for start in range(0, len(jobs), args.batch_size):
            chunk = jobs[start : start + args.batch_size]
            generators = [torch.Generator().manual_seed(sample_seed(args.seed, c, i)) for c, i in chunk]
            images += pipe(class_labels=[c for c, _ in chunk], generator=generators, **sampling).images
            progress.update(len(chunk))

    written = []
    if args.output_dir:
        for (class_id, index), image in zip(jobs, images):
            path = Path(args.output_dir) / f"{class_id}_{index}.png"
            save_png_atomically(image, path)
            written.append(path)
    else:
        rows = [images[r * args.num_per_class : (r + 1) * args.num_per_class] for r in range(len(class_ids))]
        path = Path(args.output or "grid.png")
        save_png_atomically(labelled_grid(rows, [_class_name(pipe, c) for c in class_ids]), path)
        written.append(path)
        print(path)
    return written
