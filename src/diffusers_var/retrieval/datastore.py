"""A datastore of real images for retrieval conditioning (retrieval-augmented VAR, after Re-Imagen).

``diffusers-var index`` (:func:`build_datastore`) writes a folder ``DIR``::

    DIR/datastore.json                      what it holds: images, labels and counts, the feature model, the embedding
                                            dimension and digest, the cached tokenizers
    DIR/dataset/                            a datasets.Dataset (save_to_disk): image, label (the name), embedding
                                            (float32, L2-normalised), image_hash, source
    DIR/embedding.faiss                     the exact inner-product index (IndexFlatIP) over the embeddings
    DIR/tokens/<fingerprint>.safetensors    one token map per scale, scale_{i}: (N, pn, pn), per tokenizer

:class:`RetrievalDatastore` loads it offline and memory-mapped, finds nearest neighbours (exact), draws examples of
a label, and hands out the cached token pyramids of a tokenizer.

Building embeds the images in chunks written to ``DIR.partial/``: an interrupted build resumes from its last
finished chunk when the same command runs again, and ``DIR`` appears in one rename once everything is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from tqdm.auto import tqdm

from ..evaluation.samples import IMAGE_SUFFIXES
from ..saving import atomic_directory, current_umask, write_text_atomically

try:
    import fcntl
except ImportError:  # Windows: concurrent builds of one output are then not detected
    fcntl = None

FORMAT_VERSION = 1
WRITTEN_BY = "diffusers-var index"
METADATA_FILE = "datastore.json"
DATASET_FOLDER = "dataset"
INDEX_FILE = "embedding.faiss"
TOKENS_FOLDER = "tokens"
BUILD_RECORD = "build.json"
# images embedded between two saves of a build: what an interruption can lose at most
CHUNK_SIZE = 256
_INDEX_NAME = "embedding"


def _faiss():
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "The retrieval datastore needs FAISS: pip install faiss-cpu (or pip install 'diffusers-var[retrieval]')."
        ) from error
    return faiss


def _quote_command(images, features, output, tokenizer="<model>") -> str:
    return f"diffusers-var index --images {images} --features {features} --output {output} --tokenizer {tokenizer}"


# -- identities: of an image, of a tokenizer, of the embeddings ----------------------------------------------------


def image_hash(image: PIL.Image.Image | np.ndarray) -> str:
    """The identity of an image's pixels, independent of its file name and encoding.

    The hex SHA-256 of ``b"<width>x<height>\\n"`` followed by the RGB uint8 pixel bytes (row-major, (H, W, 3)) of
    ``image.convert("RGB")``. A uint8 array (H, W, 3) gives the hash of ``PIL.Image.fromarray(array)``. The training
    script uses it to keep a sample out of its own neighbours.

    Example::

        >>> image_hash(PIL.Image.new("RGB", (2, 1), (255, 0, 0))) == image_hash(np.array([[[255, 0, 0]] * 2], np.uint8))
        True
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(
                f"image_hash takes a PIL image or a uint8 (H, W, 3) array, got {image.dtype} {image.shape}."
            )
        pixels = np.ascontiguousarray(image)
    else:
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    height, width = pixels.shape[:2]
    digest = hashlib.sha256(f"{width}x{height}\n".encode("ascii"))
    digest.update(pixels.tobytes())
    return digest.hexdigest()


# a tokenizer's fingerprint, kept until one of its tensors is replaced or changed in place (torch's version counter)
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(vqvae) -> str:
    """The first 16 hex digits of a SHA-256 over a tokenizer's config and weights: which cached token maps it reads.

    The config enters as sorted JSON without its private keys (``_name_or_path``, ``_diffusers_version``: a
    tokenizer saved and loaded again keeps its fingerprint), then every ``state_dict`` tensor in key order (its name,
    dtype, shape and bytes). Computed once per module until its weights change.

    Example::

        >>> tokenizer_fingerprint(VARPipeline.from_pretrained("var-digits").vqvae)
        '3f2c...'
    """
    state = vqvae.state_dict()
    version = tuple((name, t.data_ptr(), t._version) for name, t in state.items())
    cached = _FINGERPRINTS.get(vqvae)
    if cached is not None and cached[0] == version:
        return cached[1]
    config = {key: value for key, value in dict(vqvae.config).items() if not key.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode("utf-8"))
    for name, tensor in state.items():
        # rounded to bfloat16 whatever the loaded dtype: the same tokenizer loaded in bf16 (generate --dtype bf16)
        # reads the token maps its float32 weights made (an fp16 copy matches too unless double rounding moves a
        # weight; its codes can differ from fp32's in rare near-ties anyway)
        tensor = tensor.detach().cpu()
        tensor = (tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    fingerprint = digest.hexdigest()[:16]
    _FINGERPRINTS[vqvae] = (version, fingerprint)
    return fingerprint


def _embedding_digest(batches: Iterator[np.ndarray]) -> str:
    """SHA-256 of the float32 (N, D) embedding matrix's bytes, row-major, given in row batches."""
    digest = hashlib.sha256()
    for batch in batches:
        digest.update(np.ascontiguousarray(batch, dtype=np.float32).tobytes())
    return digest.hexdigest()


def _normalise(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    # an all-zero feature vector stays zero (it then scores 0 against everything) rather than becoming NaN
    return (features / np.maximum(norms, 1e-12)).astype(np.float32)


def _to_uint8_rgb(image) -> np.ndarray:
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(
            f"Images to embed are PIL images or uint8 (H, W, 3) arrays, got {array.dtype} {array.shape}; convert "
            "[0, 1] floats with (x * 255).round().astype(np.uint8)."
        )
    return array


def _embed_chunk(model, images: list[np.ndarray], batch_size: int) -> np.ndarray:
    """L2-normalised float32 features (n, D) of uint8 images, in batches of one size (images keep their own size,
    as ``diffusers-var evaluate`` feeds them; the model's processor resizes)."""
    by_size: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(image.shape, []).append(i)
    rows, features = [], []
    for indices in by_size.values():
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            features.append(np.asarray(model.features(np.stack([images[i] for i in batch])), dtype=np.float64))
            rows += batch
    out = np.empty((len(images), features[0].shape[1]), dtype=np.float64)
    out[rows] = np.concatenate(features)
    if not np.isfinite(out).all():
        raise ValueError(f"The feature model {model.name} gave non-finite features; check the model and its dtype.")
    return _normalise(out)


# -- what --images names -----------------------------------------------------------------------------------------


@dataclass
class _Images:
    """The images to index: where they come from, and per row its source and label; ``read`` gives the encoded
    bytes of rows [start, stop)."""

    description: str
    sources: list[str]
    labels: list[str]
    read: Callable[[int, int], list[bytes]]
    identity: dict = field(default_factory=dict)

    def inputs_digest(self) -> str:
        digest = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode())
        for source, label in zip(self.sources, self.labels):
            digest.update(f"{source}\t{label}\n".encode())
        return digest.hexdigest()


def _describe_images(images: str | os.PathLike) -> str:
    """--images as recorded: an existing path made absolute, a dataset name as written."""
    return str(Path(images).absolute()) if os.path.exists(images) else os.fspath(images)


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _open_images(images: str | os.PathLike, image_column: str, label_column: str) -> _Images:
    name = os.fspath(images)
    path = Path(name)
    if path.is_dir():
        if _is_saved_dataset(path):
            from datasets import load_from_disk

            return _dataset_images(load_from_disk(str(path)), _describe_images(name), image_column, label_column)
        return _folder_images(path)
    if path.exists():
        raise ValueError(f"--images {name} is a file; give an image folder (one sub-folder per class) or a dataset.")
    if os.path.isabs(name) or name.startswith((".", "~")) or path.suffix.lower() in IMAGE_SUFFIXES:
        raise ValueError(
            f"--images {name} does not exist; give an image folder (one sub-folder per class) or a dataset."
        )
    from datasets import load_dataset

    try:
        dataset = load_dataset(name)
    except Exception as error:  # not a dataset name, or not in the offline cache
        raise ValueError(
            f"--images {name!r} is neither an existing folder nor a dataset that datasets can load "
            f"({type(error).__name__}: {error}). Give an image folder with one sub-folder per class, a save_to_disk "
            "folder, or the name of a dataset in the local cache."
        ) from error
    return _dataset_images(dataset, name, image_column, label_column)


def _folder_images(root: Path) -> _Images:
    """An image folder: one sub-folder per class (its name is the label), images anywhere below it."""
    sources, labels = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            p for p in folder.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )  # fmt: skip
        sources += [p.relative_to(root).as_posix() for p in files]
        labels += [folder.name] * len(files)
    if not sources:
        raise ValueError(
            f"--images {root} holds no images ({', '.join(IMAGE_SUFFIXES)}) in class sub-folders. Put them in one "
            f"sub-folder per class ({root}/<label>/*.png), or give a dataset."
        )

    def read(start: int, stop: int) -> list[bytes]:
        return [(root / source).read_bytes() for source in sources[start:stop]]

    return _Images(str(root.absolute()), sources, labels, read, {"kind": "folder"})


def _dataset_images(dataset, description: str, image_column: str, label_column: str) -> _Images:
    from datasets import ClassLabel, DatasetDict
    from datasets import Image as ImageFeature

    split = "train"
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise ValueError(f"--images {description} has no train split (its splits: {sorted(dataset)}).")
        dataset = dataset["train"]
    else:
        split = str(dataset.split or "train")
    for flag, column in (("--image-column", image_column), ("--label-column", label_column)):
        if column not in dataset.column_names:
            raise ValueError(
                f"--images {description} has no column {column!r} (its columns: {dataset.column_names}); name the "
                f"right one with {flag}."
            )
    if not isinstance(dataset.features[image_column], ImageFeature):
        raise ValueError(
            f"--images {description}: the column {image_column!r} is {dataset.features[image_column]}, not images "
            "(datasets.Image); name the image column with --image-column."
        )
    if len(dataset) == 0:
        raise ValueError(f"--images {description} holds no rows.")
    feature = dataset.features[label_column]
    values = dataset.data.column(label_column).to_pylist()
    labels = [feature.int2str(int(v)) if isinstance(feature, ClassLabel) else str(v) for v in values]
    # the encoded bytes as stored: decoding happens once, here, and the datastore keeps the original encoding
    raw = dataset.select_columns([image_column]).cast_column(image_column, ImageFeature(decode=False))

    def read(start: int, stop: int) -> list[bytes]:
        out = []
        for item in raw[start:stop][image_column]:
            out.append(item["bytes"] if item.get("bytes") is not None else Path(item["path"]).read_bytes())
        return out

    sources = [f"{split}/{row}" for row in range(len(dataset))]
    identity = {"kind": "dataset", "split": split, "fingerprint": dataset._fingerprint}
    return _Images(description, sources, labels, read, identity)


def _decode(data: bytes, source: str) -> PIL.Image.Image:
    try:
        # EXIF orientation applied, as datasets' Image feature decodes it: the hash, the embedding and the cached
        # tokens must all see the pixels that training and sampling see
        image = PIL.ImageOps.exif_transpose(PIL.Image.open(io.BytesIO(data)))
        return image.convert("RGB")
    except (OSError, PIL.UnidentifiedImageError) as error:
        raise ValueError(f"{source}: cannot read this image ({error}); remove or replace it, then rerun.") from error


# -- tokenizers ----------------------------------------------------------------------------------------------------


def load_tokenizer(spec: str | os.PathLike):
    """The MultiScaleVQVAE that ``--tokenizer`` names: a bundled pipeline name (``var-digits``), a VARPipeline
    folder, a MultiScaleVQVAE folder, or a Hub repo id of either."""
    from ..hub import load_vqvae
    from ..pretrained import BUNDLED_MODELS, bundled_model_path

    name = os.fspath(spec)
    if name in BUNDLED_MODELS and not os.path.exists(name):
        return load_vqvae(bundled_model_path(name))
    if not os.path.exists(name) and (os.path.isabs(name) or name.startswith((".", "~"))):
        raise ValueError(f"--tokenizer {name} does not exist; give a VARPipeline or MultiScaleVQVAE folder.")
    try:
        return load_vqvae(name)
    except Exception as error:
        raise ValueError(
            f"--tokenizer {name!r} is not a bundled pipeline ({sorted(BUNDLED_MODELS)}), a VARPipeline or "
            f"MultiScaleVQVAE folder, or an available Hub repo ({type(error).__name__}: {error})."
        ) from error


def _describe_tokenizer(vqvae) -> dict:
    name = vqvae.config.get("_name_or_path")
    return {
        "name": str(name) if name else type(vqvae).__name__,
        "patch_nums": list(vqvae.config.patch_nums),
        "image_size": int(vqvae.image_size),
        "vocab_size": int(vqvae.config.vocab_size),
    }


# -- the datastore -------------------------------------------------------------------------------------------------


def _read_metadata(path: Path) -> dict | None:
    """The datastore.json of ``path`` if this command wrote it, else None."""
    try:
        metadata = json.loads((path / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return metadata if isinstance(metadata, dict) and metadata.get("written_by") == WRITTEN_BY else None


def _index_vectors(index) -> np.ndarray:
    """The (N, D) float32 vectors an IndexFlat holds, as a view of its memory (no copy)."""
    faiss = _faiss()
    if index.ntotal == 0:
        return np.zeros((0, index.d), np.float32)
    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


def _names(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(n) for n in list(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class RetrievalDatastore:
    """A datastore folder written by ``diffusers-var index`` (see the module docstring), loaded.

    Attributes:
        path: the folder. dataset: its ``datasets.Dataset`` (memory-mapped) with the FAISS index attached as
        ``"embedding"``. label_names: the sorted unique label names. labels: each row's label name.
        feature_model: ``describe()`` of the feature model (plus its ``spec``). embedding_dim: D. metadata: the
        whole ``datastore.json``.

    Example::

        >>> store = RetrievalDatastore.load("digits-store")
        >>> rows, scores = store.nearest(store.embed([image]), k=4, exclude_hashes=[{image_hash(image)}])
        >>> maps = store.token_maps(pipe.vqvae, rows[0])   # one (4, pn, pn) LongTensor per scale
    """

    def __init__(self, path: Path, dataset, metadata: dict):
        self.path, self.dataset, self.metadata = path, dataset, metadata
        self.index = dataset.get_index(_INDEX_NAME).faiss_index
        self.feature_model: dict = metadata["feature_model"]
        self.embedding_dim: int = int(metadata["embedding_dim"])
        self.labels: list[str] = dataset.data.column("label").to_pylist()
        names, inverse = np.unique(np.asarray(self.labels, dtype=object).astype(str), return_inverse=True)
        order = np.argsort(inverse, kind="stable").astype(np.int64)
        bounds = np.cumsum(np.bincount(inverse, minlength=len(names)))[:-1]
        self.label_names: list[str] = [str(n) for n in names]
        self._rows_of = dict(zip(self.label_names, np.split(order, bounds)))
        self._hashes: list[str] | None = None
        self._rows_of_hash: dict[str, list[int]] | None = None
        self._model = None
        self._tokens: dict[str, list[torch.Tensor]] = {}

    @classmethod
    def load(cls, path: str | os.PathLike) -> RetrievalDatastore:
        """Load a datastore folder, offline and memory-mapped; refuse an index that does not belong to its dataset.

        Example::

            >>> store = RetrievalDatastore.load("digits-store")
            >>> len(store), store.label_names[:3]
            (1437, ['0', '1', '2'])
        """
        from datasets import load_from_disk

        _faiss()
        path = Path(path)
        metadata = _read_metadata(path)
        if metadata is None:
            what = "does not exist" if not path.exists() else f"has no {METADATA_FILE} written by {WRITTEN_BY}"
            raise ValueError(f"{path} {what}: it is not a retrieval datastore. Build one with diffusers-var index.")
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} is a datastore of format version {metadata.get('format_version')}; this diffusers-var reads "
                f"version {FORMAT_VERSION}. Rebuild it with diffusers-var index."
            )
        rebuild = f"Rebuild it with diffusers-var index --output {path} (into a new folder)."
        try:
            state = json.loads((path / DATASET_FOLDER / "state.json").read_text(encoding="utf-8"))
            dataset = load_from_disk(str(path / DATASET_FOLDER))
        except (OSError, ValueError) as error:
            raise ValueError(f"{path / DATASET_FOLDER}: cannot load the dataset ({error}). {rebuild}") from error
        if state.get("_fingerprint") != metadata["dataset_fingerprint"] or len(dataset) != metadata["num_images"]:
            raise ValueError(
                f"{path / DATASET_FOLDER} is not the dataset {METADATA_FILE} describes ({len(dataset)} rows, "
                f"fingerprint {state.get('_fingerprint')}; expected {metadata['num_images']} rows, fingerprint "
                f"{metadata['dataset_fingerprint']}). {rebuild}"
            )
        if not (path / INDEX_FILE).is_file():
            raise ValueError(f"{path / INDEX_FILE} is missing. {rebuild}")
        try:
            dataset.load_faiss_index(_INDEX_NAME, str(path / INDEX_FILE))
        except (RuntimeError, ValueError) as error:  # datasets refuses another size; faiss an unreadable file
            raise ValueError(f"{path / INDEX_FILE} is not this dataset's index: {error} {rebuild}") from error
        _check_index(dataset.get_index(_INDEX_NAME).faiss_index, metadata, path / INDEX_FILE, rebuild)
        return cls(path, dataset, metadata)

    def __reduce__(self):
        # the FAISS index cannot be pickled: a copy (a DataLoader worker's under spawn) loads the folder again
        return (type(self).load, (self.path,))

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return (
            f"RetrievalDatastore({str(self.path)!r}: {len(self)} images, {len(self.label_names)} labels, "
            f"{self.embedding_dim}-d {self.feature_model.get('spec')})"
        )

    # -- labels --------------------------------------------------------------------------------------------------

    def rows_of_label(self, name: str) -> np.ndarray:
        """The rows (int64, ascending) whose label is ``name``.

        Example::

            >>> store.rows_of_label("3")[:4]
            array([ 3, 13, 23, 33])
        """
        rows = self._rows_of.get(str(name)) if isinstance(name, (str, int, np.integer)) else None
        if rows is None:
            raise ValueError(
                f"Unknown label {name!r}: this datastore's labels are {_names(self.label_names)}. Labels are the "
                "names the datastore was built with (class sub-folder names, or ClassLabel names)."
            )
        return rows

    def count(self, name: str) -> int:
        """How many images have label ``name``."""
        return len(self.rows_of_label(name))

    # -- embedding -----------------------------------------------------------------------------------------------

    def _feature_model(self):
        if self._model is None:
            from ..evaluation.image_models import load_image_model

            model = load_image_model(self.feature_model["spec"])
            found, recorded = model.describe()["weights_sha256"], self.feature_model["weights_sha256"]
            if found != recorded:
                raise ValueError(
                    f"The feature model {self.feature_model['spec']!r} now has weights {found[:12]}…, but {self.path} "
                    f"was built with weights {recorded[:12]}…: its embeddings are not comparable. Restore that model, "
                    "or rebuild the datastore with diffusers-var index."
                )
            self._model = model
        return self._model

    def embed(self, images) -> np.ndarray:
        """L2-normalised float32 embeddings (N, D) of PIL images or uint8 (H, W, 3) arrays (or one uint8
        (N, H, W, 3) array), with the feature model the datastore was built with (loaded on first use).

        Example::

            >>> store.embed([PIL.Image.open("a.png"), PIL.Image.open("b.png")]).shape
            (2, 64)
        """
        if isinstance(images, PIL.Image.Image) or (isinstance(images, np.ndarray) and images.ndim == 3):
            images = [images]
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        if isinstance(images, np.ndarray) or not len(images):
            raise ValueError("embed takes images: PIL images or uint8 (H, W, 3) arrays, or a (N, H, W, 3) array.")
        return _embed_chunk(self._feature_model(), [_to_uint8_rgb(image) for image in images], 64)

    def _queries(self, query) -> np.ndarray:
        """(Q, D) float32 query embeddings from embeddings (np, torch) or images."""
        if isinstance(query, PIL.Image.Image):
            query = [query]
        elif isinstance(query, np.ndarray) and query.dtype == np.uint8 and query.ndim in (3, 4):
            query = list(query) if query.ndim == 4 else [query]
        if isinstance(query, (list, tuple)) and query and isinstance(query[0], (PIL.Image.Image, np.ndarray)):
            if not isinstance(query[0], np.ndarray) or query[0].ndim == 3:
                return self.embed(query)
        if isinstance(query, torch.Tensor):
            query = query.detach().float().cpu().numpy()
        query = np.asarray(query, dtype=np.float32)
        if query.ndim == 1:
            query = query[None]
        if query.ndim != 2 or query.shape[1] != self.embedding_dim:
            raise ValueError(
                f"Query embeddings of shape {tuple(query.shape)} do not fit this datastore's {self.embedding_dim}-d "
                f"embeddings ({self.feature_model.get('spec')}): pass (Q, {self.embedding_dim}) embeddings from "
                "store.embed(images) (the same feature model), or the images themselves."
            )
        if not np.isfinite(query).all():
            raise ValueError("Query embeddings hold NaN or inf values.")
        return np.ascontiguousarray(query)

    # -- search --------------------------------------------------------------------------------------------------

    def _hash_rows(self) -> dict[str, list[int]]:
        if self._rows_of_hash is None:
            self._hashes = self.dataset.data.column("image_hash").to_pylist()
            self._rows_of_hash = {}
            for row, value in enumerate(self._hashes):
                self._rows_of_hash.setdefault(value, []).append(row)
        return self._rows_of_hash

    def _excluded_rows(self, hashes) -> set[int]:
        if not hashes:
            return set()
        if isinstance(hashes, str):
            raise ValueError("Excluded hashes are a set of image_hash strings, not one string; wrap it: {h}.")
        rows_of_hash = self._hash_rows()
        return {row for value in hashes for row in rows_of_hash.get(value, ())}

    def _check_k(self, k, available: int, what: str) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an integer ≥ 1, got {k!r}.")
        if k > available:
            raise ValueError(f"k={k} is more than the {available} images {what}; ask for at most {available}.")

    def nearest(self, query, k: int, exclude_hashes: list[set[str]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest rows to each query by inner product of the normalised embeddings (exact), best first.

        Args:
            query: (Q, D) embeddings (numpy or torch; one D vector is Q = 1), or a list of images (embedded with
                :meth:`embed`).
            k: neighbours per query.
            exclude_hashes: per query, image hashes (:func:`image_hash`) that may not be among its neighbours:
                the query image itself when it is in the datastore.

        Returns:
            (rows (Q, k) int64, scores (Q, k) float32).

        Example::

            >>> rows, scores = store.nearest([image], k=4, exclude_hashes=[{image_hash(image)}])
        """
        queries = self._queries(query)
        if exclude_hashes is not None and len(exclude_hashes) != len(queries):
            raise ValueError(
                f"exclude_hashes has {len(exclude_hashes)} sets for {len(queries)} queries; give one each."
            )
        excluded = [self._excluded_rows(h) for h in exclude_hashes] if exclude_hashes else [set()] * len(queries)
        self._check_k(k, len(self) - max(len(e) for e in excluded), "left to search in this datastore")
        # exact search over enough candidates that k survive the exclusions
        scores, rows = self.index.search(queries, min(len(self), k + max(len(e) for e in excluded)))
        out_rows, out_scores = np.empty((len(queries), k), np.int64), np.empty((len(queries), k), np.float32)
        for q, leave_out in enumerate(excluded):
            keep = np.array([row >= 0 and int(row) not in leave_out for row in rows[q]], dtype=bool)
            out_rows[q], out_scores[q] = rows[q][keep][:k], scores[q][keep][:k]
        return out_rows, out_scores

    def examples_of(
        self,
        name: str,
        k: int,
        generator: torch.Generator | None = None,
        query=None,
        exclude_hashes: set[str] | None = None,
    ) -> np.ndarray:
        """``k`` distinct rows (int64) of label ``name``: the nearest to ``query`` (one embedding or image), best
        first, or without a query drawn uniformly without replacement (``torch.randperm`` with ``generator``, so
        one seed gives the same rows).

        Example::

            >>> store.examples_of("3", k=4, generator=torch.Generator().manual_seed(0))
            array([233,  43, 613, 103])
        """
        rows = self.rows_of_label(name)
        leave_out = self._excluded_rows(exclude_hashes)
        if leave_out:
            rows = rows[~np.isin(rows, np.fromiter(leave_out, np.int64, len(leave_out)))]
        excluded = f" ({self.count(name) - len(rows)} excluded)" if leave_out else ""
        self._check_k(k, len(rows), f"of label {name!r}{excluded}")
        if query is None:
            device = generator.device if generator is not None else "cpu"
            return rows[torch.randperm(len(rows), generator=generator, device=device)[:k].cpu().numpy()]
        queries = self._queries(query)
        if len(queries) != 1:
            raise ValueError(f"examples_of takes one query (an embedding or an image), got {len(queries)}.")
        scores = _index_vectors(self.index)[rows] @ queries[0]
        return rows[np.argsort(-scores, kind="stable")[:k]]

    def rows_of_hash(self, value: str) -> list[int]:
        """The rows holding the image of hash ``value`` (:func:`image_hash`; several for duplicates, none if absent)."""
        return list(self._hash_rows().get(value, ()))

    def neighbourhood(
        self, name: str, k: int, row: int | None = None, generator: torch.Generator | None = None
    ) -> np.ndarray:
        """The ``k`` rows of label ``name`` nearest to the image at ``row`` (that image and its copies excluded),
        best first: what a retrieval model trains with for the sample at ``row``. Without ``row``, an anchor
        image of the label is drawn with ``generator`` and plays the sample's part: sampling then sees neighbours
        as they were in training (mutually similar real images), and never the anchor itself.

        Example::

            >>> store.neighbourhood("3", k=4, generator=torch.Generator().manual_seed(0))
            array([613,  43, 903, 233])
        """
        if row is None:
            rows = self.rows_of_label(name)
            device = generator.device if generator is not None else "cpu"
            row = int(rows[int(torch.randint(len(rows), (1,), generator=generator, device=device))])
        if not 0 <= int(row) < len(self):
            raise ValueError(f"row must be in [0, {len(self)}), got {row}.")
        query = _index_vectors(self.index)[int(row)]
        return self.examples_of(name, k, query=query, exclude_hashes={self._hash_rows_list()[int(row)]})

    def _hash_rows_list(self) -> list[str]:
        self._hash_rows()
        return self._hashes

    # -- token maps ----------------------------------------------------------------------------------------------

    @property
    def tokenizers(self) -> dict[str, dict]:
        """The cached tokenizers: fingerprint → what they are (name, patch_nums, file)."""
        return self.metadata.get("tokenizers", {})

    def check_tokenizer(self, vqvae) -> None:
        """Raise a ValueError unless this datastore caches the token maps of ``vqvae`` (by its fingerprint)."""
        fingerprint = tokenizer_fingerprint(vqvae)
        entry = self.tokenizers.get(fingerprint)
        if entry is not None and (self.path / entry["file"]).is_file():
            return
        have = (
            "; ".join(f"{fp} ({e['name']}, patch_nums {e['patch_nums']})" for fp, e in self.tokenizers.items())
            or "none"
        )
        command = _quote_command(self.metadata["images"], self.feature_model["spec"], self.path)
        raise ValueError(
            f"{self.path} has no cached token maps for this tokenizer (fingerprint {fingerprint}, patch_nums "
            f"{list(vqvae.config.patch_nums)}); it has: {have}. Add them (the embeddings are kept) with: {command}"
        )

    def token_maps(self, vqvae, rows=None) -> list[torch.LongTensor]:
        """The cached token maps of ``vqvae``: one (len(rows), pn, pn) LongTensor per scale (all rows by default).
        The cache file is read once and kept in memory.

        Example::

            >>> maps = store.token_maps(pipe.vqvae, rows=[3, 17])
            >>> [tuple(m.shape) for m in maps][:2]
            [(2, 1, 1), (2, 2, 2)]
        """
        self.check_tokenizer(vqvae)
        fingerprint = tokenizer_fingerprint(vqvae)
        if fingerprint not in self._tokens:
            from safetensors.torch import load_file

            tensors = load_file(self.path / self.tokenizers[fingerprint]["file"])
            self._tokens[fingerprint] = [tensors[f"scale_{i}"] for i in range(len(tensors))]
        maps = self._tokens[fingerprint]
        if rows is None:
            return [m.long() for m in maps]
        rows = rows.cpu() if isinstance(rows, torch.Tensor) else rows
        index = torch.as_tensor(np.asarray(rows, dtype=np.int64).reshape(-1))
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise ValueError(f"rows must be in [0, {len(self)}), got {index.min().item()}..{index.max().item()}.")
        return [m[index].long() for m in maps]

    @torch.no_grad()
    def add_tokenizer(self, vqvae, batch_size: int = 64, progress: bool = True) -> None:
        """Tokenize every image (resized and centre-cropped to ``vqvae.image_size``) and cache the token maps in
        ``tokens/<fingerprint>.safetensors``; ``datastore.json`` then lists it. Nothing happens if it is cached.

        Example::

            >>> store.add_tokenizer(VARPipeline.from_pretrained("var-digits").vqvae)
        """
        from safetensors.torch import save_file

        from ..training.data import preprocess_image

        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}.")
        fingerprint = tokenizer_fingerprint(vqvae)
        if fingerprint in self.tokenizers and (self.path / self.tokenizers[fingerprint]["file"]).is_file():
            return
        device = next(vqvae.parameters()).device
        dtype = next(vqvae.parameters()).dtype
        size = vqvae.image_size
        # int16 holds any codebook up to 32767 entries at half the memory of int32
        storage = torch.int16 if vqvae.config.vocab_size <= torch.iinfo(torch.int16).max else torch.int32
        per_scale: list[list[torch.Tensor]] = [[] for _ in vqvae.config.patch_nums]
        images_only = self.dataset.select_columns(["image"])
        was_training = vqvae.training
        vqvae.eval()  # the cache must hold what inference tokenizes; the caller's mode is restored after
        try:
            with tqdm(total=len(self), desc="Tokenizing", unit="img", disable=not progress) as bar:
                for start in range(0, len(self), batch_size):
                    images = images_only[start : start + batch_size]["image"]
                    pixels = torch.stack([preprocess_image(image, size, center_crop=True) for image in images])
                    for scale, tokens in enumerate(vqvae.tokenize(pixels.to(device, dtype))):
                        per_scale[scale].append(tokens.to("cpu", storage))
                    bar.update(len(images))
        finally:
            vqvae.train(was_training)
        tensors = {f"scale_{i}": torch.cat(maps).contiguous() for i, maps in enumerate(per_scale)}
        folder = self.path / TOKENS_FOLDER
        folder.mkdir(exist_ok=True)
        file = folder / f"{fingerprint}.safetensors"
        tmp = folder / f".{file.name}.tmp-{os.getpid()}"
        try:
            save_file(tensors, tmp, metadata={"fingerprint": fingerprint, "written_by": WRITTEN_BY})
            os.chmod(tmp, 0o666 & ~current_umask())  # readable like any new file, not private as a temporary one
            os.replace(tmp, file)
        finally:
            tmp.unlink(missing_ok=True)
        entry = {"file": f"{TOKENS_FOLDER}/{file.name}", **_describe_tokenizer(vqvae)}
        metadata = _read_metadata(self.path) or self.metadata  # another run may have added a tokenizer meanwhile
        metadata.setdefault("tokenizers", {})[fingerprint] = entry
        write_text_atomically(self.path / METADATA_FILE, json.dumps(metadata, indent=2) + "\n")
        self.metadata = metadata
        self._tokens[fingerprint] = list(tensors.values())


def _check_index(index, metadata: dict, file: Path, rebuild: str) -> None:
    """Refuse an index that is not the one built with this dataset (e.g. another datastore's copied in)."""
    faiss = _faiss()
    if not isinstance(index, faiss.IndexFlat) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError(f"{file} is a {type(index).__name__}, not the exact inner-product IndexFlatIP. {rebuild}")
    if index.ntotal != metadata["num_images"] or index.d != metadata["embedding_dim"]:
        raise ValueError(
            f"{file} holds {index.ntotal} vectors of dimension {index.d}, but the dataset has "
            f"{metadata['num_images']} embeddings of dimension {metadata['embedding_dim']}. {rebuild}"
        )
    if _embedding_digest(iter([_index_vectors(index)])) != metadata["embeddings_sha256"]:
        raise ValueError(f"{file} does not hold this dataset's embeddings (their digest differs). {rebuild}")


# -- building ------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock file for the build: a second build of the same output is refused, not interleaved."""
    with open(folder / ".lock", "a") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                raise ValueError(
                    f"{folder} is being written by another diffusers-var index run; let it finish."
                ) from error
        yield


def _partial_folder(output: Path, spec: dict) -> tuple[Path, dict]:
    """``<output>.partial``: created with the build's spec, or an earlier build's with the same spec (resumed)."""
    partial = output.with_name(output.name + ".partial")
    if not partial.exists():
        partial.mkdir(parents=True)
        write_text_atomically(partial / BUILD_RECORD, json.dumps({"written_by": WRITTEN_BY, "spec": spec}, indent=2))
        return partial, spec
    try:
        record = json.loads((partial / BUILD_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or record.get("written_by") != WRITTEN_BY:
        raise ValueError(f"{partial} exists and was not made by {WRITTEN_BY}; move it away or choose another --output.")
    recorded = record["spec"]
    differ = sorted(
        key for key in set(spec) | set(recorded) if key != "chunk_size" and spec.get(key) != recorded.get(key)
    )
    if differ:
        raise ValueError(
            f"{partial} holds an interrupted build with other arguments (they differ in: {', '.join(differ)}; it was "
            f"--images {recorded.get('images')} --features {recorded.get('feature_model', {}).get('spec')}). Rerun "
            f"with those arguments to resume it, or remove {partial} to start over."
        )
    return partial, recorded


def _chunk_path(partial: Path, index: int) -> Path:
    return partial / f"chunk-{index:05d}"


def _finished_chunk(path: Path, sources: list[str]) -> bool:
    """Whether ``path`` is a complete chunk of exactly these sources (a chunk appears by rename when complete)."""
    if not (path / "state.json").is_file():
        return False
    from datasets import load_from_disk

    try:
        return load_from_disk(str(path)).data.column("source").to_pylist() == sources
    except (OSError, ValueError):
        return False


def _dataset_features(dim: int):
    from datasets import Features, List, Value
    from datasets import Image as ImageFeature

    return Features({
        "image": ImageFeature(), "label": Value("string"), "embedding": List(Value("float32"), length=dim),
        "image_hash": Value("string"), "source": Value("string"),
    })  # fmt: skip


def _write_chunk(path: Path, images: _Images, start: int, stop: int, model, batch_size: int) -> None:
    from datasets import Dataset

    encoded = images.read(start, stop)
    decoded = [_decode(data, source) for data, source in zip(encoded, images.sources[start:stop])]
    pixels = [np.asarray(image, dtype=np.uint8) for image in decoded]
    embeddings = _embed_chunk(model, pixels, batch_size)
    chunk = Dataset.from_dict(
        {
            "image": [{"bytes": data, "path": None} for data in encoded],
            "label": images.labels[start:stop],
            "embedding": embeddings,
            "image_hash": [image_hash(array) for array in pixels],
            "source": images.sources[start:stop],
        },
        features=_dataset_features(embeddings.shape[1]),
    )
    staging = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)  # a chunk killed while being written (ours: inside the locked folder)
    with _datasets_progress(False):  # a bar per chunk would break the embedding bar
        chunk.save_to_disk(str(staging))
    os.rename(staging, path)


@contextlib.contextmanager
def _datasets_progress(enabled: bool) -> Iterator[None]:
    from datasets.utils import logging as datasets_logging

    was_enabled = datasets_logging.is_progress_bar_enabled()
    if was_enabled and not enabled:
        datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            datasets_logging.enable_progress_bar()


def _finalise(output: Path, spec: dict, chunks: list[Path], progress: bool) -> None:
    """The chunks → dataset, index and datastore.json in a staging folder, renamed to ``output`` in one step."""
    from datasets import concatenate_datasets, load_from_disk

    faiss = _faiss()
    dataset = concatenate_datasets([load_from_disk(str(chunk)) for chunk in chunks])
    dim = len(dataset[0]["embedding"])
    vectors = dataset.with_format("numpy", columns=["embedding"])
    batches = (vectors[start : start + 65536]["embedding"] for start in range(0, len(dataset), 65536))
    digest = _embedding_digest(batches)
    labels, counts = np.unique(np.asarray(dataset.data.column("label").to_pylist(), dtype=str), return_counts=True)
    # an existing output is only ever an empty folder here (checked before): replacing it loses nothing
    with _datasets_progress(progress), atomic_directory(output, replace_existing=output.is_dir()) as staging:
        staging = Path(staging)
        dataset.save_to_disk(str(staging / DATASET_FOLDER))
        dataset.add_faiss_index(column="embedding", index_name=_INDEX_NAME, custom_index=faiss.IndexFlatIP(dim))
        dataset.save_faiss_index(_INDEX_NAME, str(staging / INDEX_FILE))
        state = json.loads((staging / DATASET_FOLDER / "state.json").read_text(encoding="utf-8"))
        metadata = {
            "format_version": FORMAT_VERSION,
            "written_by": WRITTEN_BY,
            "images": spec["images"],
            "image_column": spec["image_column"],
            "label_column": spec["label_column"],
            "num_images": len(dataset),
            "labels": {str(name): int(count) for name, count in zip(labels, counts)},
            "feature_model": spec["feature_model"],
            "embedding_dim": dim,
            "embeddings_sha256": digest,
            "dataset_fingerprint": state["_fingerprint"],
            "index": {"file": INDEX_FILE, "type": "IndexFlatIP", "metric": "inner product"},
            "tokenizers": {},
        }
        _check_index(dataset.get_index(_INDEX_NAME).faiss_index, metadata, staging / INDEX_FILE, "(a bug)")
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")


def _check_output(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file; give a folder for the datastore.")
    if output.is_dir() and any(output.iterdir()):
        raise ValueError(
            f"--output {output} already holds files that are not a datastore of {WRITTEN_BY} (no {METADATA_FILE} of "
            "ours); nothing there is replaced. Choose a new or empty folder."
        )


def _check_same_build(store: RetrievalDatastore, images: str, features: str, image_column: str, label_column: str):
    recorded = store.metadata
    ours = (recorded["images"], recorded["feature_model"]["spec"], recorded["image_column"], recorded["label_column"])
    if ours != (images, features, image_column, label_column):
        raise ValueError(
            f"--output {store.path} already holds a datastore of --images {recorded['images']} --features "
            f"{recorded['feature_model']['spec']} (--image-column {recorded['image_column']}, --label-column "
            f"{recorded['label_column']}); rerun with those to add a --tokenizer, or choose a new --output to build "
            "another."
        )


def _feature_spec(features: str | os.PathLike) -> str:
    """--features as recorded: a local folder or file made absolute (embed() reloads it from anywhere)."""
    from ..pretrained import BUNDLED_MODELS

    spec = os.fspath(features)
    if spec.startswith("inception="):
        return "inception=" + str(Path(spec.split("=", 1)[1]).absolute())
    if spec not in BUNDLED_MODELS and os.path.exists(spec):
        return str(Path(spec).absolute())
    return spec


def build_datastore(
    images: str,
    features: str,
    output: str | os.PathLike,
    tokenizer=None,
    batch_size: int = 64,
    image_column: str = "image",
    label_column: str = "label",
    progress: bool = True,
) -> RetrievalDatastore:
    """Build (or resume building, or add a tokenizer's token maps to) the datastore folder ``output``.

    Args:
        images: an image folder with one sub-folder per class (the label is its name), a ``save_to_disk`` folder of
            a datasets dataset (its train split), or a dataset name ``load_dataset`` finds.
        features: the feature model, any spec of ``diffusers_var.evaluation.image_models.load_image_model``.
        output: the datastore folder. A new or empty one is built; an interrupted build of the same arguments in
            ``<output>.partial`` resumes; a finished datastore of the same arguments only gets ``tokenizer``'s
            token maps (if not cached yet). Anything else is refused.
        tokenizer: a MultiScaleVQVAE, or a spec for one (bundled pipeline name, pipeline or vqvae folder, repo id):
            its token maps of every image are cached.
        batch_size: images per forward pass. image_column, label_column: the columns of a dataset.
        progress: show progress bars.

    Example::

        >>> store = build_datastore("digits/train", "digits-classifier", "digits-store", tokenizer="var-digits")
        >>> len(store), store.embedding_dim
        (1437, 64)
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be an integer ≥ 1, got {batch_size!r}.")
    _faiss()  # now, not after embedding every image
    output = Path(output).absolute()
    description, feature_spec = _describe_images(images), _feature_spec(features)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer).to(device)  # before the long part: a wrong name fails now

    if _read_metadata(output) is not None:
        store = RetrievalDatastore.load(output)
        _check_same_build(store, description, feature_spec, image_column, label_column)
        _remove_finished_partial(output)
        if tokenizer is not None:
            store.add_tokenizer(tokenizer, batch_size, progress)
        return store

    _check_output(output)
    source = _open_images(images, image_column, label_column)
    from ..evaluation.image_models import load_image_model

    model = load_image_model(feature_spec, device)
    spec = {
        "format_version": FORMAT_VERSION, "images": description, "image_column": image_column,
        "label_column": label_column, "feature_model": {"spec": feature_spec, **model.describe()},
        "num_images": len(source.sources), "inputs_sha256": source.inputs_digest(), "chunk_size": CHUNK_SIZE,
    }  # fmt: skip
    partial, spec = _partial_folder(output, spec)
    with _locked(partial):
        size = spec["chunk_size"]  # the interrupted build's chunking, so its finished chunks line up
        bounds = [(start, min(start + size, len(source.sources))) for start in range(0, len(source.sources), size)]
        chunks = [_chunk_path(partial, i) for i in range(len(bounds))]
        todo = [i for i, (a, b) in enumerate(bounds) if not _finished_chunk(chunks[i], source.sources[a:b])]
        done = len(source.sources) - sum(bounds[i][1] - bounds[i][0] for i in todo)
        desc = "Embedding (resumed)" if done else "Embedding"
        with tqdm(total=len(source.sources), initial=done, desc=desc, unit="img", disable=not progress) as bar:
            for i in todo:
                shutil.rmtree(chunks[i], ignore_errors=True)  # an unfinished or stale chunk of ours
                _write_chunk(chunks[i], source, *bounds[i], model, batch_size)
                bar.update(bounds[i][1] - bounds[i][0])
        _finalise(output, spec, chunks, progress)
    shutil.rmtree(partial)
    store = RetrievalDatastore.load(output)
    if tokenizer is not None:
        store.add_tokenizer(tokenizer, batch_size, progress)
    return store


def _remove_finished_partial(output: Path) -> None:
    """A build killed between its final rename and removing ``<output>.partial`` leaves it; it is ours, and done."""
    partial = output.with_name(output.name + ".partial")
    try:
        record = json.loads((partial / BUILD_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(record, dict) and record.get("written_by") == WRITTEN_BY:
        with contextlib.suppress(ValueError), _locked(partial):
            shutil.rmtree(partial)
