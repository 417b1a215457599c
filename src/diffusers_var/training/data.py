"""Training data through 🤗 datasets: loading, checks that run before step one, and reproducible transforms.

Random crops and flips are drawn from a generator seeded by (seed, epoch, sample index), so a sample's
augmentation does not depend on the number of processes, the data-loader workers, or where a run resumed.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch


def load_image_dataset(
    train_data_dir: str | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
    cache_dir: str | None = None,
):
    """``load_dataset("imagefolder", data_dir=...)`` or a Hub/local dataset by name; returns one split."""
    from datasets import load_dataset

    if (train_data_dir is None) == (dataset_name is None):
        raise ValueError("Give exactly one of --train_data_dir (an image folder) or --dataset_name.")
    if train_data_dir is not None:
        dataset = load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir)
    else:
        dataset = load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
    if split not in dataset:
        raise ValueError(f"The dataset has no split {split!r}; it has {sorted(dataset)}.")
    return dataset[split]


def check_dataset(dataset, image_column: str, label_column: str | None, num_classes: int | None) -> None:
    """Stop before training on data that would fail later: missing columns, labels ≥ num_classes, bad images."""
    columns = dataset.column_names
    for role, column in (("--image_column", image_column), ("--label_column", label_column)):
        if column is not None and column not in columns:
            raise ValueError(f"{role} {column!r} is not a column of the dataset; its columns are {columns}.")
    if len(dataset) == 0:
        raise ValueError("The dataset is empty.")
    if label_column is not None and num_classes is not None:
        labels = np.asarray(dataset[label_column])
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if bad.size:
            raise ValueError(
                f"{bad.size} label(s) outside [0, {num_classes}), e.g. {labels[bad[0]]} at row {bad[0]}. "
                f"Pass --num_classes {int(labels.max()) + 1} to fine-tune with a resized class embedding."
            )
    from datasets import Image

    raw = dataset.cast_column(image_column, Image(decode=False))
    for row, item in enumerate(raw[image_column]):
        source = item.get("path") or f"row {row}"
        try:
            if item.get("bytes") is not None:
                import io

                PIL.Image.open(io.BytesIO(item["bytes"])).verify()
            else:
                with PIL.Image.open(item["path"]) as image:
                    image.verify()
        except Exception as error:  # PIL raises many types for damaged files
            raise ValueError(f"Unreadable image {source} (row {row}): {error}. Remove or replace it.") from error


def dataset_class_names(dataset, label_column: str | None) -> list[str] | None:
    """The class names of a labelled dataset (an image folder's sub-folders, a ``ClassLabel`` column), else None."""
    feature = dataset.features.get(label_column) if label_column is not None else None
    names = getattr(feature, "names", None)
    return list(names) if names else None


def id2label_for_data(id2label: dict[int, str] | None, class_names: list[str] | None) -> dict[int, str] | None:
    """The labels of a model trained on data with ``class_names``: the data names ids 0 … n − 1, and ids the data
    does not cover keep the names they had (a fine-tuned model still draws them as before).

    Example::

        >>> id2label_for_data({0: "zero", 1: "one", 2: "two"}, ["cat", "dog"])
        {0: 'cat', 1: 'dog', 2: 'two'}
    """
    if class_names is None:
        return id2label
    taken = {n.strip() for names in class_names for n in names.split(",")}
    merged = {}
    for class_id, names in (id2label or {}).items():  # an old synonym the data now uses must not name two classes
        kept = [n for n in names.split(",") if n.strip() not in taken]
        if kept and int(class_id) >= len(class_names):
            merged[int(class_id)] = ",".join(kept)
    merged.update(enumerate(class_names))
    return dict(sorted(merged.items()))


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 10_000_019 + index)


def preprocess_image(
    image: PIL.Image.Image,
    resolution: int,
    center_crop: bool = True,
    random_flip: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """RGB, shorter side resized to ``resolution`` (bicubic), crop to a square, optional flip; (3, R, R) in [-1, 1]."""
    image = image.convert("RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, PIL.Image.Resampling.BICUBIC)
    if center_crop:
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    else:
        left = int(torch.randint(size[0] - resolution + 1, (1,), generator=generator))
        top = int(torch.randint(size[1] - resolution + 1, (1,), generator=generator))
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1
    if random_flip and torch.rand((), generator=generator) < 0.5:
        pixels = pixels.flip(-1)
    return pixels


class ImageClassDataset(torch.utils.data.Dataset):
    """(pixels, label) pairs from a datasets split, augmented reproducibly per (seed, epoch, index)."""

    def __init__(
        self,
        dataset,
        image_column: str,
        label_column: str | None,
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        seed: int = 0,
    ):
        self.dataset, self.image_column, self.label_column = dataset, image_column, label_column
        self.resolution, self.center_crop, self.random_flip, self.seed = resolution, center_crop, random_flip, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.dataset[int(index)]
        generator = sample_generator(self.seed, self.epoch, int(index))
        pixels = preprocess_image(
            row[self.image_column], self.resolution, self.center_crop, self.random_flip, generator
        )
        label = int(row[self.label_column]) if self.label_column is not None else 0
        return {"pixel_values": pixels, "class_labels": torch.tensor(label)}
