"""Sets of images to evaluate: a folder of image files, or an ``.npz`` in the ADM evaluator's layout (``arr_0``:
uint8 (N, H, W, 3), ``arr_1``: int64 labels), read in batches so that 50,000 images never sit in memory at once.

Writing uses the same layout, streamed: :class:`NpzWriter` appends batches to ``arr_0`` inside the zip and writes
the labels at the end.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL.Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
SAMPLE_NAME = re.compile(r"^(\d+)_(\d+)\.[A-Za-z]+$")  # diffusers-var generate --output-dir: <class id>_<index>.png


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] float images → uint8, rounded as diffusers' ``numpy_to_pil`` does (so PNG, npz and grid agree)."""
    return (images * 255).round().astype(np.uint8)


def _npy_header(handle) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(handle)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(handle)
    if fortran:
        raise ValueError("Fortran-ordered arrays are not supported; save the array C-ordered (np.savez does).")
    return shape, dtype


class ImageSet:
    """N RGB images of one size, from a folder (flat, or an image folder of class sub-folders) or an ``.npz``;
    iterate with :meth:`batches`.

    Attributes:
        path: where they come from. num_images, image_size: N and (H, W).
        labels: int64 (N,) class ids, or None (from ``arr_1``, or from ``<class>_<index>.png`` names).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            self._init_folder()
        elif self.path.suffix == ".npz" and self.path.is_file():
            self._init_npz()
        else:
            raise ValueError(f"{self.path} is neither a folder of images nor an .npz file (arr_0: uint8 N×H×W×3).")

    def _init_folder(self) -> None:
        def images_in(folder: Path) -> list[Path]:
            return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())

        files, self.labels = images_in(self.path), None
        classes = sorted(p for p in self.path.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not files and classes:  # an image folder: one sub-folder per class, sorted names are the class ids
            per_class = [images_in(folder) for folder in classes]
            files = [f for group in per_class for f in group]
            self.labels = np.array([i for i, group in enumerate(per_class) for _ in group], dtype=np.int64)
        if not files:
            raise ValueError(
                f"{self.path} holds no images ({', '.join(IMAGE_SUFFIXES)}), neither directly nor in class sub-folders."
            )
        named = [SAMPLE_NAME.match(p.name) for p in files]
        if self.labels is None and all(named):  # generate's layout: order by (class, index), as the .npz one does
            order = sorted(range(len(files)), key=lambda i: (int(named[i][1]), int(named[i][2])))
            files = [files[i] for i in order]
            self.labels = np.array([int(SAMPLE_NAME.match(p.name)[1]) for p in files], dtype=np.int64)
        sizes = {}
        for path in files:
            with PIL.Image.open(path) as image:
                sizes.setdefault(image.size, path)
        if len(sizes) > 1:
            (size_a, file_a), (size_b, file_b) = list(sizes.items())[:2]
            raise ValueError(
                f"{self.path} mixes image sizes: {file_a.name} is {size_a[0]}×{size_a[1]} but {file_b.name} is "
                f"{size_b[0]}×{size_b[1]}. Evaluate sets of one size (resize them yourself, knowingly)."
            )
        width, height = next(iter(sizes))
        self._files, self.num_images, self.image_size = files, len(files), (height, width)

    def _init_npz(self) -> None:
        with zipfile.ZipFile(self.path) as archive:
            names = set(archive.namelist())
            if "arr_0.npy" not in names:
                raise ValueError(
                    f"{self.path} has no arr_0 (its arrays: {sorted(n[:-4] for n in names)}); the ADM layout is arr_0 "
                    "= uint8 images (N, H, W, 3), arr_1 = labels. For statistics only (mu, sigma), pass it as "
                    "--reference."
                )
            with archive.open("arr_0.npy") as handle:
                shape, dtype = _npy_header(handle)
            if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
                raise ValueError(
                    f"{self.path}: arr_0 must be uint8 (N, H, W, 3) images, got {dtype} {shape}. Convert with "
                    "np.clip(images * 255, 0, 255).round().astype(np.uint8) from [0, 1] floats."
                )
            self.labels = None
            if "arr_1.npy" in names:
                with archive.open("arr_1.npy") as handle:
                    self.labels = np.lib.format.read_array(handle).astype(np.int64)
        if shape[0] == 0:
            raise ValueError(f"{self.path}: arr_0 holds no images.")
        self.num_images, self.image_size = shape[0], (shape[1], shape[2])

    def __len__(self) -> int:
        return self.num_images

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 (b, H, W, 3) arrays, in order."""
        if hasattr(self, "_files"):
            for start in range(0, self.num_images, batch_size):
                chunk = self._files[start : start + batch_size]
                yield np.stack([np.asarray(PIL.Image.open(p).convert("RGB")) for p in chunk])
            return
        height, width = self.image_size
        per_image = height * width * 3
        with zipfile.ZipFile(self.path) as archive, archive.open("arr_0.npy") as handle:
            _npy_header(handle)
            for start in range(0, self.num_images, batch_size):
                count = min(batch_size, self.num_images - start)
                data = handle.read(count * per_image)
                yield np.frombuffer(data, dtype=np.uint8).reshape(count, height, width, 3)


class NpzWriter:
    """Write an ``.npz`` in the ADM layout batch by batch: ``arr_0`` uint8 (N, H, W, 3), then ``arr_1`` labels.

    The file is written under a temporary name and renamed when closed, so a reader never sees half of one.

    Example:
        ```py
        >>> with NpzWriter("samples.npz", num_images=500, image_size=(32, 32)) as npz:
        ...     npz.write(batch_uint8, batch_labels)
        ```
    """

    def __init__(
        self, path: str | os.PathLike, num_images: int, image_size: tuple[int, int], extra: dict | None = None
    ):
        from ..saving import current_umask

        self.path, self.num_images, self.image_size = Path(path), num_images, image_size
        self.extra = extra or {}  # more arrays (name → array or str), after arr_0 and arr_1
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._umask = current_umask()
        self._archive = zipfile.ZipFile(self._tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._images = self._archive.open(self._member("arr_0.npy"), "w", force_zip64=True)
        header = {"descr": "|u1", "fortran_order": False, "shape": (num_images, *image_size, 3)}
        np.lib.format.write_array_header_2_0(self._images, header)
        self._labels, self._written = [], 0

    @staticmethod
    def _member(name: str) -> zipfile.ZipInfo:
        """A member with a fixed time stamp: the same images give the same bytes, whenever they are written."""
        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        return info

    def write(self, images: np.ndarray, labels) -> None:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.shape[1:] != (*self.image_size, 3):
            raise ValueError(f"Images of shape {images.shape[1:]} in an npz of {(*self.image_size, 3)}.")
        self._images.write(images.tobytes())
        self._labels.extend(int(x) for x in labels)
        self._written += len(images)

    def close(self) -> None:
        self._images.close()
        if self._written != self.num_images:
            self._archive.close()
            self._tmp.unlink(missing_ok=True)
            raise ValueError(f"{self._written} images were written to {self.path}, {self.num_images} announced.")
        with self._archive.open(self._member("arr_1.npy"), "w") as handle:
            np.lib.format.write_array(handle, np.asarray(self._labels, dtype=np.int64))
        for name, value in self.extra.items():
            with self._archive.open(self._member(f"{name}.npy"), "w") as handle:
                np.lib.format.write_array(handle, np.asarray(value))
        self._archive.close()
        os.chmod(self._tmp, 0o666 & ~self._umask)
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._images.close()
        self._archive.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.abort() if exc_type is not None else self.close()
