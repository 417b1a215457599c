"""Write scikit-learn's bundled digits as an image folder that examples/train_var.py can train on, offline.

    python examples/digits/prepare_data.py --output_dir data/digits [--resolution 32] [--test_fraction 0.2] [--seed 0]

Layout: ``<output_dir>/{train,test}/<class>/<index>.png`` with classes "0".."9" (sorted folder names are the class
ids) and ``<index>`` the image's row in ``sklearn.datasets.load_digits()``. ``digits_info.json`` records the
split (seed, fraction, the indices) and how the pixels were made:

- The split is ``train_test_split(stratify=labels, test_size=test_fraction, random_state=seed)``: every class
  keeps the same share in both halves, and the same arguments always give the same split.
- Values 0..16 map linearly to 0..255, white digit on black: the raw sklearn look, no inversion.
- The 8×8 grid is upscaled with PIL's bicubic filter. Each digits value is the ink count of a 4×4 block of a
  32×32 scan, so 32 px is the scan's own size. Nearest gives 4×4 squares that no handwriting has; bilinear is
  blurrier; Lanczos leaves faint ringing stripes on the black background; bicubic gives the cleanest strokes.
- Images are saved as RGB (grey in all three channels), as the VAR tokenizer expects three channels.

The folder is written under a temporary name and renamed, so it is either complete or absent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
import PIL.Image
import sklearn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from diffusers_var.hub import atomic_directory

INFO_FILE = "digits_info.json"
NUM_CLASSES = 10


def _check_arguments(resolution: int, test_fraction: float, num_images: int) -> None:
    if not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"resolution must be an integer ≥ 8 (the digits are 8×8), got {resolution!r}; use 32.")
    num_test = math.ceil(test_fraction * num_images) if 0 < test_fraction < 1 else 0
    if not NUM_CLASSES <= num_test <= num_images - NUM_CLASSES:
        raise ValueError(
            f"test_fraction must leave at least one image per class on each side of the split, got "
            f"{test_fraction!r}; use a value such as 0.2."
        )


def _split(resolution: int, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Indices, labels and RGB uint8 images of both halves of the split."""
    digits = load_digits()
    _check_arguments(resolution, test_fraction, len(digits.target))
    indices = np.arange(len(digits.target))
    train, test = train_test_split(indices, test_size=test_fraction, random_state=seed, stratify=digits.target)
    train, test = np.sort(train), np.sort(test)  # file order follows the dataset, not the shuffle
    grey = np.round(digits.images * (255 / 16)).astype(np.uint8)
    upscaled = np.stack(
        [np.asarray(PIL.Image.fromarray(g, "L").resize((resolution, resolution), PIL.Image.BICUBIC)) for g in grey]
    )
    rgb = np.repeat(upscaled[..., None], 3, axis=-1)
    return {
        "train_indices": train,
        "test_indices": test,
        "train_images": rgb[train],
        "test_images": rgb[test],
        "train_labels": digits.target[train].astype(np.int64),
        "test_labels": digits.target[test].astype(np.int64),
    }


def load_digits_split(
    resolution: int = 32, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits split as arrays: the exact pixels ``write_digits_imagefolder`` writes.

    Returns ``(train_images, train_labels, test_images, test_labels)``; images are uint8 ``(N, R, R, 3)``.

    Example::

        >>> train_x, train_y, test_x, test_y = load_digits_split()
        >>> train_x.shape, test_x.shape
        ((1437, 32, 32, 3), (360, 32, 32, 3))
    """
    parts = _split(resolution, test_fraction, seed)
    return parts["train_images"], parts["train_labels"], parts["test_images"], parts["test_labels"]


def _save_png(pixels: np.ndarray, path: Path) -> None:
    PIL.Image.fromarray(pixels, "RGB").save(path, format="PNG")


def write_digits_imagefolder(
    output_dir: str | os.PathLike,
    resolution: int = 32,
    test_fraction: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Write the split as ``<output_dir>/{train,test}/<class>/<index>.png``; returns what digits_info.json records.

    An existing ``output_dir`` is refused unless ``overwrite``, and even then only a folder this function wrote
    (its ``digits_info.json``, ``train/`` and ``test/`` and nothing else) is replaced, so a typo cannot delete an
    unrelated folder.

    Example::

        >>> info = write_digits_imagefolder("data/digits")
        >>> info["num_train"], info["num_test"]
        (1437, 360)
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise ValueError(f"{output_dir} already exists; pass overwrite=True (--overwrite) or choose another folder.")
    if output_dir.exists():
        ours = {INFO_FILE, "train", "test"}
        entries = {p.name for p in output_dir.iterdir()} if output_dir.is_dir() else {output_dir.name}
        if not output_dir.is_dir() or INFO_FILE not in entries or entries - ours:
            raise ValueError(
                f"{output_dir} is not a digits folder written by this script (it holds {sorted(entries - ours)[:5]} "
                f"or lacks {INFO_FILE}); --overwrite only replaces those. Choose another folder."
            )
    parts = _split(resolution, test_fraction, seed)
    info = {
        "source": f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__})",
        "resolution": resolution,
        "test_fraction": test_fraction,
        "seed": seed,
        "split": "sklearn.model_selection.train_test_split(stratify=labels, random_state=seed)",
        "pixels": "value v in 0..16 -> round(v * 255 / 16), white digit on black, PIL bicubic upscale, RGB",
        "num_train": len(parts["train_indices"]),
        "num_test": len(parts["test_indices"]),
    }
    with atomic_directory(output_dir, replace_existing=True) as tmp:  # checked above: only an earlier run's folder
        for split in ("train", "test"):
            counts = {str(c): 0 for c in range(NUM_CLASSES)}
            for index, label, pixels in zip(
                parts[f"{split}_indices"], parts[f"{split}_labels"], parts[f"{split}_images"]
            ):
                folder = Path(tmp) / split / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                _save_png(pixels, folder / f"{index}.png")
                counts[str(label)] += 1
            info[f"{split}_counts"] = counts
            info[f"{split}_indices"] = parts[f"{split}_indices"].tolist()
        # one key per line, each value on one line: readable, without 1797 lines of indices
        lines = ",\n".join(f" {json.dumps(key)}: {json.dumps(value)}" for key, value in info.items())
        (Path(tmp) / INFO_FILE).write_text("{\n" + lines + "\n}\n", encoding="utf-8")
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="the image folder to create")
    parser.add_argument("--resolution", type=int, default=32, help="image size in pixels (default 32)")
    parser.add_argument("--test_fraction", type=float, default=0.2, help="share held out per class (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
    args = parser.parse_args(argv)
    try:
        info = write_digits_imagefolder(args.output_dir, args.resolution, args.test_fraction, args.seed, args.overwrite)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    print(f"{args.output_dir}: {info['num_train']} train and {info['num_test']} test images at {args.resolution} px")
    return info


if __name__ == "__main__":
    main()
