"""``diffusers-var generate``: sample class-conditional images from a VARPipeline.

Usage::

    diffusers-var generate                      # the bundled var-digits model, 8 per class → grid.png
    diffusers-var generate --model path/to/pipeline --class-labels 0 1 "golden retriever" --output grid.png
    diffusers-var generate --model org/var-d16 --num-per-class 50 --seed 0 --output-dir samples/
    diffusers-var generate --model DIR/pipeline --datastore DIR/datastore --class-labels 3 7 --num-per-class 8

``--output`` writes one grid (a labelled row per class; PNG, JPEG, WebP or TIFF by its extension); ``--output-dir``
writes ``<class id>_<index>.png`` per sample, each as soon as its batch is done. Every path is checked before
sampling starts. Files are written to a temporary name and renamed, so an interrupted run leaves no partial image,
and a file that diffusers-var did not write is never replaced without ``--overwrite`` (our images say so in their
EXIF ``Software`` tag).

``--datastore`` samples with retrieval (:class:`~diffusers_var.VARRetrievalPipeline`): each image is conditioned on
``--num-neighbours`` real images of its label drawn from a datastore built by ``diffusers-var index``.
``--class-labels`` are then the datastore's label names (default: all of them), and files are
``<label>_<index>.png``. A label the model never trained on is drawn from the null class and its neighbours alone.
A label the model knows keeps plain sampling's seeds, so ``--retrieval-weight 0`` gives plain generate's images.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch
from tqdm.auto import tqdm

from .evaluation.samples import to_uint8
from .pipelines.retrieval import (
    DEFAULT_RETRIEVAL_GUIDANCE_SCALE,
    DEFAULT_RETRIEVAL_WEIGHT,
    DEFAULT_TRAINING_FREE_NEIGHBOURS,
    VARRetrievalPipeline,
)
from .pipelines.var import VARPipeline
from .retrieval.conditioning import RETRIEVAL_MODES
from .saving import current_umask

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_MODEL = "var-digits"  # bundled with the package: the command works offline with no arguments
GRID_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}
SOFTWARE = "diffusers-var"
_EXIF_SOFTWARE, _EXIF_DESCRIPTION = 0x0131, 0x010E
NPZ_MARKER = "diffusers_var_settings"  # the run's settings, stored beside arr_0/arr_1 (the ADM evaluator ignores it)
MIN_CELL = 128  # grid cells are scaled up (nearest) to at least this many pixels, so 32 px samples are readable
GUTTER = 4


def sample_seed(seed: int, class_id: int, index: int, candidate: int = 0) -> int:
    """A fixed, well-spread seed for each (run seed, class, index) and rejection candidate; candidate 0 is the plain
    sample, so rejection with one candidate gives plain generation's images."""
    return (seed * 1_000_000_007 + class_id * 1_000_003 + index + candidate * 0x9E3779B97F4A7C15) % (2**63)


# -- files -------------------------------------------------------------------------------------------------------


def written_by_us(path: Path) -> bool:
    """Whether the file at ``path`` is one of ours (so replacing it loses nothing of the user's): an image carrying
    our EXIF ``Software`` tag, or an ``.npz`` holding our ``diffusers_var_settings`` beside the ADM arrays."""
    if path.suffix == ".npz":
        try:
            with zipfile.ZipFile(path) as archive:
                return f"{NPZ_MARKER}.npy" in archive.namelist()
        except (OSError, zipfile.BadZipFile):
            return False
    try:
        with PIL.Image.open(path) as image:
            return str(image.getexif().get(_EXIF_SOFTWARE, "")).startswith(SOFTWARE)
    except (OSError, ValueError, SyntaxError):  # not an image PIL can read
        return False


def save_image_atomically(image: PIL.Image.Image, path: str | os.PathLike, description: str = "") -> None:
    """Save ``image`` in the format of ``path``'s extension, tagged as ours, through a temporary file and a rename."""
    from . import __version__

    path = Path(path)
    exif = PIL.Image.Exif()
    exif[_EXIF_SOFTWARE] = f"{SOFTWARE} {__version__}"
    if description:
        exif[_EXIF_DESCRIPTION] = description
    file_format = GRID_FORMATS.get(path.suffix.lower(), "PNG")
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        options = {"quality": 95} if file_format in ("JPEG", "WEBP") else {}
        image.save(tmp, format=file_format, exif=exif, **options)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes the file private; it should read like any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _writable_folder(folder: Path, flag: str) -> None:
    """Create ``folder`` if needed and prove a file can be written there, or raise a ValueError naming why."""
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {folder} cannot be created: {parent} is a file.")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"{flag} {folder} is not writable: {error.strerror or error}.") from error


def _check_replaceable(path: Path, overwrite: bool, flag: str) -> None:
    if path.is_dir():
        raise ValueError(f"{flag}: {path} is a folder where an image goes; move it away.")
    if path.exists() and not overwrite and not written_by_us(path):
        raise ValueError(
            f"{path} exists and was not written by diffusers-var; pass --overwrite to replace it, or choose "
            "another name."
        )


def check_outputs(args: argparse.Namespace, jobs: list[tuple[int | str, int]] | None = None) -> None:
    """Validate the output paths before any sampling (``jobs``: the (class id or file stem, index) of every sample,
    to check the ``<class>_<index>.png`` files a folder run would replace)."""
    if getattr(args, "output_npz", None):
        path = Path(args.output_npz)
        if path.suffix != ".npz":
            raise ValueError(f"--output-npz {path}: the file name must end in .npz.")
        _check_replaceable(path, args.overwrite, "--output-npz")
        _writable_folder(path.parent, "--output-npz's folder")
    if args.output_dir:
        folder = Path(args.output_dir)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--output-dir {folder} is a file; give a folder.")
        _writable_folder(folder, "--output-dir")
        for class_id, index in jobs or []:
            _check_replaceable(folder / f"{class_id}_{index}.png", args.overwrite, "--output-dir")
    if wants_grid(args):
        path = grid_path(args)
        if path.is_dir():
            raise ValueError(f"--output {path} is a folder; give a file name such as grid.png, or use --output-dir.")
        if path.suffix.lower() not in GRID_FORMATS:
            raise ValueError(
                f"--output {path}: unsupported extension {path.suffix or '(none)'!r}; use one of "
                f"{sorted(set(GRID_FORMATS))}."
            )
        _check_replaceable(path, args.overwrite, "--output")
        _writable_folder(path.parent, "--output's folder")


def wants_grid(args: argparse.Namespace) -> bool:
    """A grid unless the run writes something else: --output, or no --output-dir and no --output-npz."""
    return bool(args.output) or not (args.output_dir or getattr(args, "output_npz", None))


def grid_path(args: argparse.Namespace) -> Path:
    return Path(args.output or "grid.png")


# the largest grid each format can hold (WebP and JPEG limit each side; PNG and TIFF are capped here at what fits in
# memory comfortably: a grid is held whole until it is written)
GRID_SIDE_LIMITS = {"WEBP": 16383, "JPEG": 65500}
GRID_PIXEL_LIMIT = 2**28


def check_grid_size(path: Path, rows: int, columns: int, image_size: int) -> None:
    """Refuse, before sampling, a grid too large for its format or for memory, with the way out."""
    cell = image_size * max(1, math.ceil(MIN_CELL / image_size)) + GUTTER
    width, height = 400 + columns * cell, GUTTER + rows * cell  # (400: room for the row labels)
    file_format = GRID_FORMATS[path.suffix.lower()]
    limit = GRID_SIDE_LIMITS.get(file_format)
    if (limit and max(width, height) > limit) or width * height > GRID_PIXEL_LIMIT:
        raise ValueError(
            f"A grid of {rows} classes × {columns} samples would be about {width}×{height} px, more than "
            f"{'a ' + file_format + ' image can hold' if limit and max(width, height) > limit else 'fits in memory'}."
            " Use --output-dir for one file per sample, or fewer --class-labels / --num-per-class."
        )


def check_device(name: str) -> torch.device:
    """``--device`` as a torch device that exists on this machine, or a ValueError saying what is available."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r} is not a device name; use cpu, cuda, cuda:N or mps.") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device cpu.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: unsupported device type {device.type!r}; use cpu, cuda or mps.")
    return device


# -- the grid ---------------------------------------------------------------------------------------------------------


def _font(size: int) -> PIL.ImageFont.ImageFont:
    try:
        return PIL.ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return PIL.ImageFont.load_default()


class GridCanvas:
    """A grid with one labelled row per class, filled in as samples arrive (nothing else is held in memory).

    Samples are scaled up by a whole factor (nearest neighbour) to at least ``MIN_CELL`` pixels, so small models'
    pixels stay crisp and readable at 100 % zoom; cells are separated by a gutter.
    """

    def __init__(self, names: list[str], columns: int, image_size: int, column_titles: list[str] | None = None):
        self.scale = max(1, math.ceil(MIN_CELL / image_size))
        self.cell = image_size * self.scale
        self.font = _font(max(12, min(28, self.cell // 5)))
        probe = PIL.ImageDraw.Draw(PIL.Image.new("RGB", (1, 1)))
        self.label_width = max(int(probe.textlength(name, font=self.font)) for name in names) + 3 * GUTTER
        self.top = 2 * getattr(self.font, "size", 11) + GUTTER if column_titles else GUTTER  # (bitmap font: 11 px)
        self.grid = PIL.Image.new(
            "RGB",
            (self.label_width + columns * (self.cell + GUTTER), self.top + len(names) * (self.cell + GUTTER)),
            "white",
        )
        draw = PIL.ImageDraw.Draw(self.grid)
        for row, name in enumerate(names):
            top = self.top + row * (self.cell + GUTTER)
            draw.text((2 * GUTTER, top + self.cell // 2), name, fill="black", font=self.font, anchor="lm")
        for column, title in enumerate(column_titles or []):
            centre = self.label_width + column * (self.cell + GUTTER) + self.cell // 2
            draw.text((centre, self.top // 2), title, fill="black", font=self.font, anchor="mm")

    def paste(self, row: int, column: int, image: PIL.Image.Image) -> None:
        image = image.convert("RGB")
        if self.scale > 1:
            image = image.resize((self.cell, self.cell), PIL.Image.Resampling.NEAREST)
        self.grid.paste(
            image, (self.label_width + column * (self.cell + GUTTER), self.top + row * (self.cell + GUTTER))
        )


def class_name(pipe: VARPipeline, class_id: int, max_length: int = 28) -> str:
    """A row label: the class's first name, with its id unless the name is the id ("7", "207: golden retriever")."""
    id2label = pipe.config.id2label or {}
    name = id2label.get(class_id, id2label.get(str(class_id)))
    if not name:
        return str(class_id)
    name = name.split(",")[0].strip()
    if name == str(class_id):
        return name
    return _shorten(f"{class_id}: {name}", max_length)


def _shorten(text: str, max_length: int = 28) -> str:
    return text if len(text) <= max_length else text[: max_length - 1] + "…"


@dataclass(frozen=True)
class SampleLabel:
    """One label a run samples: a grid row, and the files ``<stem>_<index>.png``.

    Attributes:
        label: what the pipeline is called with: a class id, or with ``--datastore`` a datastore label name.
        title: the grid row's label. stem: the start of its file names.
        seed_key: the class part of its images' seeds (:func:`sample_seed`).
        class_id: the model's class id (``arr_1`` of an npz); ``None`` for a label the model never trained on.
    """

    label: int | str
    title: str
    stem: str
    seed_key: int
    class_id: int | None

    def describe(self) -> str:
        return f"class={self.label}" if isinstance(self.label, int) else f"label={self.label!r}"


def unseen_seed_key(name: str, num_classes: int) -> int:
    """The class part of the seeds of a datastore label the model never trained on: past the model's class ids,
    from the name alone (the same in every run, whatever the other labels)."""
    return num_classes + 1 + int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:6], "big")


_UNSAFE_IN_FILE_NAMES = re.compile(r"[^A-Za-z0-9._-]")


def file_stem(name: str) -> str:
    """A label name as the start of a file name: characters other than A-Z, a-z, 0-9, ".", "_" and "-" become "_"."""
    return _UNSAFE_IN_FILE_NAMES.sub("_", name)


def check_distinct_files(labels: list[SampleLabel]) -> None:
    """Refuse labels that would write the same files: equal stems, or stems equal but for case (some disks ignore
    it)."""
    taken: dict[str, SampleLabel] = {}
    for label in labels:
        other = taken.setdefault(label.stem.casefold(), label)
        if other is not label:
            raise ValueError(
                f"--class-labels {other.label!r} and {label.label!r} would both write {label.stem}_<index>.png (file "
                "names keep only A-Z, a-z, 0-9, '.', '_' and '-', and some disks ignore case); sample them into "
                "separate --output-dir folders."
            )


# -- the command ------------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser, default_model: str | None = DEFAULT_MODEL) -> None:
    parser.add_argument(
        "--model",
        default=default_model,
        required=default_model is None,
        help=f"a pipeline folder, a bundled model name or a Hub repo id (default: {default_model})",
    )
    parser.add_argument(
        "--class-labels",
        nargs="+",
        default=None,
        help="class ids or names, each once; with --datastore, the datastore's label names (default: every class, "
        "or every label of the datastore)",
    )
    parser.add_argument("--num-per-class", type=_positive_int, default=8, help="samples per class (default: 8)")
    parser.add_argument(
        "--guidance-scale", type=float, default=None, help="1.0 = no guidance (default: the pipeline's, 2.5)"
    )
    parser.add_argument("--top-k", type=int, default=None, help="0 = off (default: the pipeline's, 900)")
    parser.add_argument("--top-p", type=float, default=None, help="1.0 = off (default: the pipeline's, 0.96)")
    parser.add_argument(
        "--temperature", type=float, default=None, help="divides the guided logits (default: the pipeline's, 1.0)"
    )
    parser.add_argument(
        "--more-smooth",
        action="store_true",
        help="the official Gumbel smoothing of the code embeddings, for viewing, not for FID (default: off)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="a sample depends only on (seed, class, index) (default: 0)"
    )
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when available, else cpu)"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and compute (default: fp32)")
    parser.add_argument(
        "--progressive",
        action="store_true",
        help="draw how each sample forms: one grid row per sample, one column per scale (the image decoded from f̂ "
        "after that scale, coarse to fine) (default: off)",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--output", default=None, help="the grid image: .png, .jpg, .webp or .tiff (default: grid.png)")
    target.add_argument(
        "--output-dir", default=None, help="folder for one <class>_<index>.png per sample (default: a grid instead)"
    )
    parser.add_argument(
        "--output-npz",
        default=None,
        help="also (or only) an .npz in the ADM evaluator's layout: arr_0 uint8 N×H×W×3, arr_1 labels, ordered by "
        "(class, index) (default: none)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace existing files not written by diffusers-var (default: off)"
    )
    retrieval = parser.add_argument_group(
        "retrieval",
        "condition each image on real images of its label from a datastore (diffusers-var index), as Re-Imagen does",
    )
    retrieval.add_argument(
        "--datastore",
        default=None,
        metavar="DIR",
        help="a datastore folder with token maps of this model's tokenizer; --class-labels are then its label names "
        "and files <label>_<index>.png (default: no retrieval)",
    )
    retrieval.add_argument(
        "--num-neighbours",
        type=_positive_int,
        default=None,
        metavar="K",
        help="real images each sample is conditioned on (default: the model's num_neighbours when it attends, else "
        f"{DEFAULT_TRAINING_FREE_NEIGHBOURS})",
    )
    retrieval.add_argument(
        "--retrieval-mode",
        choices=RETRIEVAL_MODES,
        default=None,
        help="trained: the model's retrieval attention; training_free: mix each scale's distribution with the "
        "neighbours' codes, for any model; combined: both (default: combined when the model has retrieval "
        "attention, else training_free)",
    )
    retrieval.add_argument(
        "--retrieval-weight",
        type=float,
        default=None,
        metavar="λ",
        help="training_free and combined: λ in (1 − λ)·p_model + λ·p_retrieved, in [0, 1]; 0 = plain sampling "
        f"(default: {DEFAULT_RETRIEVAL_WEIGHT})",
    )
    retrieval.add_argument(
        "--retrieval-guidance-scale",
        type=float,
        default=None,
        metavar="S",
        help="trained: guidance on retrieval, contrasting rows with and without neighbours; 1.0 = none (default: 1.0)",
    )
    rejection = parser.add_argument_group(
        "rejection sampling", "keep the best of M candidates per image by a classifier's p(y|x), as VAR-d30-re does"
    )
    rejection.add_argument(
        "--rejection-classifier",
        default=None,
        metavar="SPEC",
        help="an AutoModelForImageClassification folder, repo id or bundled name (e.g. digits-classifier) whose "
        "class ids are the model's (default: no rejection)",
    )
    rejection.add_argument(
        "--oversample", type=_positive_int, default=None, metavar="M", help="candidates per image (default: 4)"
    )
    rejection.add_argument(
        "--rejection-mode",
        choices=("final", "early"),
        default=None,
        help="final: score finished images; early: score coarse previews at --rejection-scale and finish only the "
        "best candidate (default: final)",
    )
    rejection.add_argument(
        "--rejection-scale",
        type=int,
        default=None,
        help="early mode: the scale (an index into patch_nums) whose preview is scored (default: the first scale at "
        "least half the final side: 6, the 8×8 map, for VAR's 256 px models; 3 for var-digits)",
    )
    rejection.add_argument(
        "--accept-threshold",
        type=float,
        default=None,
        metavar="P",
        help="final mode: accept candidates with p(y|x) ≥ P, drawing each class's candidates (pooled over its images "
        "in a batch) until it has --num-per-class accepted or M per image were tried (default: best of M)",
    )


def _parse_labels(values: list[str] | None, pipe: VARPipeline) -> list[int]:
    if values is None:
        return list(range(pipe.transformer.config.num_classes))
    ids = pipe._class_ids([int(v) if v.lstrip("-").isdigit() else v for v in values])
    seen: dict[int, str] = {}
    for value, class_id in zip(values, ids):
        if class_id in seen:
            raise ValueError(
                f"--class-labels names class {class_id} twice ({seen[class_id]!r} and {value!r}); list each class "
                "once and set --num-per-class for more samples."
            )
        seen[class_id] = value
    return ids


def _class_labels(args: argparse.Namespace, pipe: VARPipeline) -> list[SampleLabel]:
    """A plain run's labels: the model's classes, in files ``<class id>_<index>.png``."""
    return [SampleLabel(c, class_name(pipe, c), str(c), c, c) for c in _parse_labels(args.class_labels, pipe)]


# -- retrieval ------------------------------------------------------------------------------------------------------


RETRIEVAL_FLAGS = {
    "--num-neighbours": "num_neighbours", "--retrieval-mode": "retrieval_mode",
    "--retrieval-weight": "retrieval_weight", "--retrieval-guidance-scale": "retrieval_guidance_scale",
}  # fmt: skip


def _check_retrieval_flags(args: argparse.Namespace) -> None:
    """Retrieval flags need --datastore, and retrieval does not combine with rejection sampling (its candidates
    are drawn without neighbours): refused before anything loads."""
    if getattr(args, "datastore", None) is None:
        given = [flag for flag, name in RETRIEVAL_FLAGS.items() if getattr(args, name, None) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} configure retrieval; add --datastore DIR.")
    elif getattr(args, "rejection_classifier", None) is not None:
        raise ValueError(
            "--datastore and --rejection-classifier do not combine: rejection sampling draws its candidates without "
            "neighbours. Use one or the other."
        )


def _load_datastore(path: str):
    """The ``--datastore`` folder, loaded (in one place, so that tests can stand in a datastore of their own)."""
    from .retrieval.datastore import RetrievalDatastore

    return RetrievalDatastore.load(path)


def _names(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _datastore_labels(args: argparse.Namespace, pipe: VARRetrievalPipeline, store) -> list[SampleLabel]:
    """``--class-labels`` as datastore label names (default: all of them). A label the model knows keeps its class
    id's seeds (``--retrieval-weight 0`` then gives plain generate's images); an unseen one gets seeds of its own."""
    names = list(store.label_names) if args.class_labels is None else list(args.class_labels)
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(
                f"--class-labels names {name!r} twice; list each label once and set --num-per-class for more samples."
            )
        seen.add(name)
    _, class_ids = pipe.datastore_labels(store, names, 1)  # the pipeline's check: each is one of the datastore's
    num_classes = pipe.transformer.config.num_classes
    labels = []
    for name, class_id in zip(names, class_ids.tolist()):
        if class_id == num_classes:  # the null class: a label the model never trained on
            title, seed_key, class_id = _shorten(name, 19) + " (unseen)", unseen_seed_key(name, num_classes), None
        else:
            title, seed_key = _shorten(name), class_id
        labels.append(SampleLabel(name, title, file_stem(name), seed_key, class_id))
    if args.output_dir:
        check_distinct_files(labels)
    unseen = [label.label for label in labels if label.class_id is None]
    if unseen and getattr(args, "output_npz", None):
        raise ValueError(
            f"--output-npz stores each image's class id (arr_1), and the model has none for {_names(unseen)}; write "
            "those labels with --output-dir or --output instead."
        )
    return labels


def _retrieval_arguments(args: argparse.Namespace, pipe: VARRetrievalPipeline, store, labels) -> dict:
    """The pipeline's retrieval arguments the flags ask for, checked against the model and the datastore before
    any sampling."""
    from .validation import check_real

    mode = args.retrieval_mode or pipe.default_retrieval_mode()
    attends, mixes = mode in ("trained", "combined"), mode in ("training_free", "combined")
    if attends and not pipe.transformer.has_retrieval:
        raise ValueError(
            f"--retrieval-mode {mode} needs a model trained with retrieval attention; {args.model} has none. "
            "Use --retrieval-mode training_free (any model)."
        )
    if not mixes and args.retrieval_weight is not None:
        raise ValueError(
            "--retrieval-weight is λ of --retrieval-mode training_free or combined; this run is in trained mode (the "
            "model's retrieval attention alone), which has --retrieval-guidance-scale. Drop it, or add "
            "--retrieval-mode combined."
        )
    if not attends and args.retrieval_guidance_scale is not None:
        raise ValueError(
            "--retrieval-guidance-scale belongs to --retrieval-mode trained or combined; this run is training_free, "
            "which has --retrieval-weight."
        )
    default_k = pipe.transformer.config.num_neighbours if attends else DEFAULT_TRAINING_FREE_NEIGHBOURS
    k = args.num_neighbours or default_k
    # the neighbours are an anchor image's k nearest of its label, the anchor excluded: k + 1 images needed
    counts = {label.label: store.count(label.label) for label in labels}
    fewest = min(counts, key=counts.get)
    if counts[fewest] < k + 1:
        raise ValueError(
            f"{k} neighbours per image{' (the default)' if args.num_neighbours is None else ''}, but label "
            f"{fewest!r} has only {counts[fewest]} image(s) in {args.datastore} (one is the anchor the neighbours "
            f"are near); pass --num-neighbours {max(counts[fewest] - 1, 0)} or less, or add images with "
            "diffusers-var index."
        )
    store.check_tokenizer(pipe.vqvae)
    arguments = {"datastore": store, "num_neighbours": k, "retrieval_mode": mode}
    if attends:
        scale = (
            DEFAULT_RETRIEVAL_GUIDANCE_SCALE if args.retrieval_guidance_scale is None else args.retrieval_guidance_scale
        )
        check_real("--retrieval-guidance-scale", scale, minimum=0, hint=" 1.0 means no guidance.")
        arguments["retrieval_guidance_scale"] = scale
    if mixes:
        weight = DEFAULT_RETRIEVAL_WEIGHT if args.retrieval_weight is None else args.retrieval_weight
        check_real("--retrieval-weight", weight, 0, 1, hint=" It is λ in (1 − λ)·p_model + λ·p_retrieved.")
        arguments["retrieval_weight"] = weight
    return arguments


def _process_state(device: torch.device):
    """(rank, world size, device of this process, barrier) for runs started by accelerate launch or torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device, lambda: None
    from accelerate import PartialState

    from .training.launch import cpu_only

    state = PartialState(cpu=cpu_only() or device.type == "cpu")
    if device.type == "cuda":
        device = torch.device("cuda", state.local_process_index)
    return state.process_index, state.num_processes, device, state.wait_for_everyone


def _work_folder(args: argparse.Namespace) -> Path:
    from .generation_run import WORK_FOLDER

    if args.output_dir:
        return Path(args.output_dir) / WORK_FOLDER
    first = Path(args.output_npz) if getattr(args, "output_npz", None) else grid_path(args)
    return first.parent / f".{first.name}{WORK_FOLDER}"


def generate(args: argparse.Namespace) -> list[Path]:
    """Run the command; returns the written paths (those of this process)."""
    from .generation_run import GenerationRun
    from .training.launch import spawn_cpu_processes

    if args.num_per_class < 1:
        raise ValueError(f"--num-per-class must be ≥ 1, got {args.num_per_class}.")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be ≥ 1, got {args.batch_size}.")
    _check_retrieval_flags(args)
    spawn_cpu_processes()  # `accelerate launch --cpu --num_processes N` runs one process: start the N workers
    rank, world, device, barrier = _process_state(
        check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    )
    check_outputs(args)  # before the model loads: a wrong path fails in a second, not after the download
    # the datastore before the model as well: a wrong folder fails in a second
    store = _load_datastore(args.datastore) if getattr(args, "datastore", None) else None
    pipe = VARPipeline.from_pretrained(args.model, dtype=DTYPES[args.dtype]).to(device)
    if store is None:
        labels, retrieval = _class_labels(args, pipe), {}
    else:
        pipe = VARRetrievalPipeline(**pipe.components, **pipe.parameters)
        labels = _datastore_labels(args, pipe, store)
        retrieval = _retrieval_arguments(args, pipe, store, labels)
    pipe.set_progress_bar_config(disable=True)
    flags = ("guidance_scale", "top_k", "top_p", "temperature")
    sampling = {name: getattr(args, name) for name in flags if getattr(args, name, None) is not None}
    if getattr(args, "more_smooth", False):
        sampling["more_smooth"] = True
    pipe.scheduler.check_sampling_args(
        sampling.get("guidance_scale", 1.0), args.top_k, args.top_p, sampling.get("temperature", 1.0)
    )
    sampler = _rejection_sampler(args, pipe, device)
    unseen = [label.label for label in labels if label.class_id is None]
    if unseen and rank == 0:
        print(f"Labels {args.model} never trained on, drawn from the null class and neighbours alone: {_names(unseen)}")
    if getattr(args, "progressive", False):
        if sampler is not None or args.output_dir or getattr(args, "output_npz", None) or world > 1:
            raise ValueError(
                "--progressive draws one picture of how samples form: use it with --output (or the default grid), "
                "in one process, without --output-dir, --output-npz or rejection sampling."
            )
        return [_progressive_grid(args, pipe, labels, sampling, retrieval, device)]
    # one generator per image: on one device and dtype, a sample depends only on (seed, class, index), not on the
    # batching or the other --class-labels
    jobs = [(label, i) for label in labels for i in range(args.num_per_class)]
    batches = [jobs[start : start + args.batch_size] for start in range(0, len(jobs), args.batch_size)]
    check_outputs(args, [(label.stem, i) for label, i in jobs])
    if wants_grid(args):
        check_grid_size(grid_path(args), len(labels), args.num_per_class, pipe.vqvae.image_size)
    settings = {
        "model": str(args.model), "class_ids": [label.class_id for label in labels],
        "num_per_class": args.num_per_class, "seed": args.seed,
        "batch_size": args.batch_size, "sampling": sampling, "dtype": args.dtype, "device": device.type,
        "outputs": [str(args.output_dir or ""), str(getattr(args, "output_npz", None) or ""), str(args.output or "")],
    }  # fmt: skip
    if sampler is not None:
        settings["rejection"] = {
            "classifier": sampler.verifier.description, "oversample": sampler.oversample, "mode": sampler.mode,
            "rejection_scale": sampler.rejection_scale, "accept_threshold": sampler.accept_threshold,
        }  # fmt: skip
    if retrieval:
        settings["retrieval"] = {
            "datastore": str(args.datastore), "labels": [label.label for label in labels],
            **{name: value for name, value in retrieval.items() if name != "datastore"},
        }  # fmt: skip
    run = GenerationRun(_work_folder(args), settings, len(batches), args.overwrite, check=rank == 0)
    if rank == 0:
        run.prepare()
    barrier()
    keep_shards = wants_grid(args) or bool(getattr(args, "output_npz", None))
    written, mine = [], [b for b in run.batches_of(rank, world) if not run.is_done(b)]
    spent = [0, 0]  # this process's accepted images and candidates, for the progress bar
    with tqdm(total=len(jobs), desc="Sampling", unit="img", disable=rank != 0) as progress:
        progress.update(len(jobs) - sum(len(batches[b]) for b in run.missing()))  # finished before a resume
        for batch in mine:
            chunk = batches[batch]
            # on the sampling device: CPU generators would make a GPU draw every random number on the host
            if sampler is None:
                generators = [
                    torch.Generator(device).manual_seed(sample_seed(args.seed, label.seed_key, i)) for label, i in chunk
                ]
                images = pipe(
                    class_labels=[label.label for label, _ in chunk], generator=generators, output_type="np",
                    **sampling, **retrieval,
                )  # fmt: skip
                images, record = to_uint8(images.images), {}
            else:
                generators = [
                    [
                        torch.Generator(device).manual_seed(sample_seed(args.seed, label.seed_key, i, m))
                        for m in range(args.oversample)
                    ]
                    for label, i in chunk
                ]
                kept = sampler([label.label for label, _ in chunk], generators, **sampling)
                images, record = kept.images, rejection_record(kept)
                spent = [a + b for a, b in zip(spent, (record["accepted"], record["candidates"]))]
                progress.set_postfix(accepted=f"{spent[0] / spent[1]:.0%}", refresh=False)
            if args.output_dir:
                for (label, index), image in zip(chunk, images):
                    path = Path(args.output_dir) / f"{label.stem}_{index}.png"
                    description = f"{args.model} {label.describe()} index={index} seed={args.seed}"
                    save_image_atomically(PIL.Image.fromarray(image), path, description)
                    written.append(path)
            if keep_shards:
                run.save_shard(batch, images)
            run.mark_done(batch, record)
            progress.update(len(chunk) * (world if rank == 0 else 1))
    barrier()
    if rank == 0:
        if sampler is not None:
            settings["rejection"]["totals"] = rejection_totals(run.records())
            print(rejection_summary(settings["rejection"]))
        written += _assemble(args, run, pipe, labels, jobs, settings)
    return written


def _progressive_grid(
    args, pipe: VARPipeline, labels: list[SampleLabel], sampling: dict, retrieval: dict, device
) -> Path:
    """``--progressive``: a grid with a row per sample and a column per scale. The last column is the sample that
    ``generate`` without it gives for the same (seed, label, index) and batch size."""
    patch_nums = pipe.vqvae.config.patch_nums
    jobs = [(label, i) for label in labels for i in range(args.num_per_class)]
    path = grid_path(args)
    check_grid_size(path, len(jobs), len(patch_nums), pipe.vqvae.image_size)
    names = [f"{label.title} #{i}" for label, i in jobs]
    titles = [f"{side}x{side}" for side in patch_nums]  # (not ×: the fallback bitmap font lacks it)
    canvas = GridCanvas(names, len(patch_nums), pipe.vqvae.image_size, titles)
    with tqdm(total=len(jobs), desc="Sampling", unit="img") as progress:
        for start in range(0, len(jobs), args.batch_size):
            chunk = jobs[start : start + args.batch_size]
            generators = [
                torch.Generator(device).manual_seed(sample_seed(args.seed, label.seed_key, i)) for label, i in chunk
            ]
            out = pipe(
                class_labels=[label.label for label, _ in chunk], generator=generators, output_type="np",
                output_scales=True, **sampling, **retrieval,
            )  # fmt: skip
            for column, images in enumerate(out.scale_images):
                for row, image in enumerate(to_uint8(images)):
                    canvas.paste(start + row, column, PIL.Image.fromarray(image))
            progress.update(len(chunk))
    save_image_atomically(canvas.grid, path, f"{args.model} seed={args.seed} progressive")
    print(path)
    return path


# -- rejection sampling -------------------------------------------------------------------------------------------


REJECTION_COUNTS = ("images", "candidates", "accepted", "transformer_tokens", "plain_tokens", "previews_decoded")


def _rejection_sampler(args: argparse.Namespace, pipe: VARPipeline, device: torch.device):
    """The :class:`~diffusers_var.search.RejectionSampler` the flags ask for, or ``None`` (flags that need
    ``--rejection-classifier`` without it are an error, not ignored)."""
    from .search import ClassifierVerifier, RejectionSampler

    options = {
        "--oversample": args.oversample, "--rejection-mode": args.rejection_mode,
        "--rejection-scale": args.rejection_scale, "--accept-threshold": args.accept_threshold,
    }  # fmt: skip
    if args.rejection_classifier is None:
        given = [flag for flag, value in options.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} configure rejection sampling; add --rejection-classifier SPEC.")
        return None
    args.oversample = args.oversample or 4
    verifier = ClassifierVerifier(args.rejection_classifier, device)
    verifier.check_classes(pipe.transformer.config.num_classes)
    try:
        return RejectionSampler(
            pipe, verifier, args.oversample, args.rejection_mode or "final", args.rejection_scale, args.accept_threshold
        )
    except ValueError as error:  # name the flags rather than the Python arguments
        message = str(error).replace("rejection_scale", "--rejection-scale").replace("mode=", "--rejection-mode ")
        raise ValueError(message.replace("accept_threshold", "--accept-threshold")) from None


def rejection_record(kept) -> dict:
    """What a batch's rejection cost and kept, for the run's records."""
    counts = {name: getattr(kept, name) for name in REJECTION_COUNTS if name != "images"}
    return {"images": len(kept.class_labels), **counts}


def rejection_totals(records) -> dict:
    totals = dict.fromkeys(REJECTION_COUNTS, 0)
    for record in records:
        for name in REJECTION_COUNTS:
            totals[name] += record.get(name, 0)
    totals["acceptance_rate"] = totals["accepted"] / max(totals["candidates"], 1)
    totals["relative_compute"] = totals["transformer_tokens"] / max(totals["plain_tokens"], 1)
    return totals


def rejection_summary(rejection: dict) -> str:
    totals = rejection["totals"]
    where = f" at scale {rejection['rejection_scale']}" if rejection["mode"] == "early" else ""
    threshold = f", p(y|x) ≥ {rejection['accept_threshold']}" if rejection["accept_threshold"] is not None else ""
    previews = f", {totals['previews_decoded']} previews decoded" if totals["previews_decoded"] else ""
    return (
        f"Rejection ({rejection['mode']}{where}, M={rejection['oversample']}{threshold}, "
        f"{rejection['classifier']['extractor']}): {totals['images']} images kept from {totals['candidates']} "
        f"candidates, {totals['accepted']} accepted (acceptance rate {totals['acceptance_rate']:.1%}); transformer "
        f"compute {totals['relative_compute']:.2f}× plain sampling{previews}."
    )


def _assemble(args, run, pipe: VARPipeline, labels: list[SampleLabel], jobs, settings: dict) -> list[Path]:
    """The main process, once every batch is done: the npz and the grid from the shards, in order."""
    from .evaluation.samples import NpzWriter

    missing = run.missing()
    if missing:
        raise RuntimeError(f"Batches {missing[:5]} of {run.folder} are not done; start the same command again.")
    written = []
    if getattr(args, "output_npz", None):
        size = pipe.vqvae.image_size
        what = {k: v for k, v in settings.items() if k != "outputs"}  # what the images are, not where they went
        with NpzWriter(args.output_npz, len(jobs), (size, size), extra={NPZ_MARKER: json.dumps(what)}) as npz:
            start = 0
            for images in run.shards():
                npz.write(images, [label.class_id for label, _ in jobs[start : start + len(images)]])
                start += len(images)
        written.append(Path(args.output_npz))
    if wants_grid(args):
        canvas = GridCanvas([label.title for label in labels], args.num_per_class, pipe.vqvae.image_size)
        row_of, start = {label: row for row, label in enumerate(labels)}, 0
        for images in run.shards():
            for (label, index), image in zip(jobs[start : start + len(images)], images):
                canvas.paste(row_of[label], index, PIL.Image.fromarray(image))
            start += len(images)
        save_image_atomically(canvas.grid, grid_path(args), f"{args.model} seed={args.seed}")
        written.append(grid_path(args))
        print(grid_path(args))
    run.remove()  # the run is complete: its records and shards are no longer needed
    return written


def main(argv: list[str] | None = None) -> None:
    """``python -m diffusers_var.generate``: the same as ``diffusers-var generate``."""
    from .cli import command_main

    command_main("generate", argv)


if __name__ == "__main__":
    main()
