"""Training data: imagefolder loading, checks before step one, reproducible preprocessing."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_var.training.data import (
    ImageClassDataset,
    check_dataset,
    dataset_class_names,
    id2label_for_data,
    load_image_dataset,
    preprocess_image,
    sample_generator,
)


def make_imagefolder(root, classes=("cat", "dog"), per_class=3, size=(20, 12)):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            PIL.Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_imagefolder_loads_with_sorted_folder_labels(tmp_path):
    dataset = load_image_dataset(train_data_dir=str(make_imagefolder(tmp_path / "data")))
    assert len(dataset) == 6 and sorted(set(dataset["label"])) == [0, 1]
    assert dataset.features["label"].names == ["cat", "dog"]
    check_dataset(dataset, "image", "label", num_classes=2)
    with pytest.raises(ValueError, match="exactly one of"):
        load_image_dataset()


def test_checks_name_the_problem(tmp_path):
    root = make_imagefolder(tmp_path / "data")
    dataset = load_image_dataset(train_data_dir=str(root))
    with pytest.raises(ValueError, match=r"--image_column 'img' is not a column.*\['image', 'label'\]"):
        check_dataset(dataset, "img", "label", 2)
    with pytest.raises(ValueError, match=r"--label_column 'class'"):
        check_dataset(dataset, "image", "class", 2)
    with pytest.raises(ValueError, match=r"3 label\(s\) outside \[0, 1\).*--num_classes 2"):
        check_dataset(dataset, "image", "label", 1)
    (root / "dog" / "1.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=r"Unreadable image .*1.png"):
        check_dataset(load_image_dataset(train_data_dir=str(root)), "image", "label", 2)


def test_preprocess_shapes_range_and_reproducibility():
    image = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (12, 20, 3), dtype=np.uint8))
    centre = preprocess_image(image, 8)
    assert centre.shape == (3, 8, 8) and centre.min() >= -1 and centre.max() <= 1
    a = preprocess_image(image, 8, center_crop=False, random_flip=True, generator=sample_generator(0, 1, 5))
    b = preprocess_image(image, 8, center_crop=False, random_flip=True, generator=sample_generator(0, 1, 5))
    assert torch.equal(a, b)
    draws = {preprocess_image(image, 8, False, True, sample_generator(0, e, 5)).sum().item() for e in range(8)}
    assert len(draws) > 1  # crops and flips change with the epoch
    gray = PIL.Image.fromarray(np.zeros((8, 8), dtype=np.uint8))
    assert preprocess_image(gray, 8).shape == (3, 8, 8)


def test_torch_dataset_items(tmp_path):
    dataset = load_image_dataset(train_data_dir=str(make_imagefolder(tmp_path / "data")))
    items = ImageClassDataset(dataset, "image", "label", resolution=8, center_crop=False, random_flip=True, seed=3)
    first = items[4]
    assert first["pixel_values"].shape == (3, 8, 8) and first["class_labels"].item() == 1
    assert torch.equal(items[4]["pixel_values"], first["pixel_values"])


def test_class_names_come_from_the_data(tmp_path):
    dataset = load_image_dataset(train_data_dir=str(make_imagefolder(tmp_path / "data")))
    names = dataset_class_names(dataset, "label")
    assert names == ["cat", "dog"] and dataset_class_names(dataset, None) is None
    assert id2label_for_data({0: "zero", 1: "one", 2: "two"}, names) == {0: "cat", 1: "dog", 2: "two"}
    assert id2label_for_data(None, names) == {0: "cat", 1: "dog"}
    assert id2label_for_data({0: "zero"}, None) == {0: "zero"}  # integer labels without names: nothing to learn
    # an old synonym the data now uses goes from the old class, so a name never points at two classes
    old = {0: "tench, Tinca tinca", 1: "goldfish, Carassius auratus", 2: "shark"}
    assert id2label_for_data(old, ["goldfish"]) == {0: "goldfish", 1: " Carassius auratus", 2: "shark"}
