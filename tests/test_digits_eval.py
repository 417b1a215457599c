"""examples/digits: the prepared image folder, and the evaluation's classifier, nearest neighbours, FID and CLI."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"
sys.path.insert(0, str(DIGITS))  # evaluate.py imports its sibling prepare_data.py, as when run as a script

import prepare_data  # noqa: E402

_spec = importlib.util.spec_from_file_location("digits_evaluate", DIGITS / "evaluate.py")
evaluate = importlib.util.module_from_spec(_spec)  # a unique name: "evaluate" is also a PyPI package
_spec.loader.exec_module(evaluate)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prepared") / "digits"
    prepare_data.write_digits_imagefolder(folder)
    return folder


@pytest.fixture(scope="module")
def reference(data_dir):
    return evaluate.DigitsReference.from_data_dir(data_dir)


# -- prepare_data -----------------------------------------------------------------------------------------------------


def test_prepared_folder_holds_the_recorded_split_with_the_exact_pixels(data_dir):
    assert sorted(p.name for p in data_dir.parent.iterdir()) == ["digits"]  # no temporary folder left beside it
    info = json.loads((data_dir / prepare_data.INFO_FILE).read_text())
    assert (info["num_train"], info["num_test"], info["seed"], info["test_fraction"]) == (1437, 360, 0, 0.2)
    assert sorted(info["train_indices"] + info["test_indices"]) == list(range(1797))
    train_x, train_y, test_x, test_y = prepare_data.load_digits_split()
    arrays = {"train": (train_x, train_y), "test": (test_x, test_y)}
    for split, (images, labels) in arrays.items():
        classes = sorted(p.name for p in (data_dir / split).iterdir())
        assert classes == [str(c) for c in range(10)]
        counts = {c: len(list((data_dir / split / c).glob("*.png"))) for c in classes}
        assert counts == info[f"{split}_counts"] == {str(c): int((labels == c).sum()) for c in range(10)}
        for position in (0, len(labels) // 2, len(labels) - 1):  # file <index>.png holds the array's pixels
            index = info[f"{split}_indices"][position]
            with PIL.Image.open(data_dir / split / str(labels[position]) / f"{index}.png") as image:
                assert image.mode == "RGB" and image.size == (32, 32)
                assert np.array_equal(np.asarray(image), images[position])
    assert train_x.dtype == np.uint8 and train_x.shape == (1437, 32, 32, 3)
    assert test_x.max() == 255 and test_x[:, :, 0].max() <= 10 and test_x.mean() < 100  # white digit on black


def test_split_is_seeded_and_stratified():
    _, train_y, _, test_y = prepare_data.load_digits_split()
    _, again_y, _, _ = prepare_data.load_digits_split()
    _, other_y, _, _ = prepare_data.load_digits_split(seed=1)
    assert np.array_equal(train_y, again_y) and not np.array_equal(train_y, other_y)
    share = np.bincount(test_y) / (np.bincount(test_y) + np.bincount(train_y))
    assert np.all(np.abs(share - 0.2) < 0.01)


def test_interrupted_or_refused_writes_leave_nothing(tmp_path, monkeypatch, data_dir):
    saved = []

    def failing_save(pixels, path):
        if len(saved) == 50:
            raise OSError("disk full")
        saved.append(path)
        PIL.Image.fromarray(pixels).save(path)

    monkeypatch.setattr(prepare_data, "_save_png", failing_save)
    with pytest.raises(OSError, match="disk full"):
        prepare_data.write_digits_imagefolder(tmp_path / "digits")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="already exists; pass overwrite=True"):
        prepare_data.write_digits_imagefolder(data_dir)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="not a digits folder written by this script"):
        prepare_data.write_digits_imagefolder(mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "precious"
    (mine / "notes.txt").unlink()
    mine.rmdir()
    with pytest.raises(ValueError, match="resolution must be an integer ≥ 8.*got 4"):
        prepare_data.write_digits_imagefolder(tmp_path / "small", resolution=4)
    with pytest.raises(ValueError, match="test_fraction .* got 1.0"):
        prepare_data.write_digits_imagefolder(tmp_path / "all", test_fraction=1.0)
    assert list(tmp_path.iterdir()) == []


# -- evaluate ---------------------------------------------------------------------------------------------------------


def test_classifier_reads_the_held_out_real_digits(reference):
    assert reference.test_accuracy >= 0.95


def test_class_agreement_follows_the_labels(reference):
    test_x, test_y = reference.test_grey, reference.test_labels
    assert evaluate.class_agreement(test_x, test_y, reference) >= 0.95
    shuffled = np.random.default_rng(0).permutation(test_y)
    assert evaluate.class_agreement(test_x, shuffled, reference) < 0.3
    per_class = evaluate.per_class_agreement(test_x, test_y, reference)
    assert sorted(per_class) == list(range(10)) and min(per_class.values()) >= 0.9
    # the default reference (prepare_data's default split) is the same data
    assert evaluate.class_agreement(test_x[:40], test_y[:40]) >= 0.95
    with pytest.raises(ValueError, match="360 images but 3 requested labels"):
        evaluate.class_agreement(test_x, [1, 2, 3], reference)


def test_nearest_neighbours_separate_new_images_from_copies(reference):
    test_distances = evaluate.nearest_neighbour_distances(reference.test_grey, reference.train_grey)
    assert test_distances.shape == (360,) and np.all(test_distances > 0)
    copies = evaluate.nearest_neighbour_distances(reference.train_grey[:20], reference.train_grey)
    assert np.all(copies == 0)
    stats = evaluate.distance_stats(test_distances)
    assert 0 < stats["min"] <= stats["p5"] <= stats["median"]


def test_digits_fid_is_small_for_real_digits_and_large_for_one_class(reference):
    floor = evaluate.digits_fid(reference.test_grey, reference.train_grey, reference)
    one_class = evaluate.digits_fid(reference.test_grey[reference.test_labels == 0], reference.train_grey, reference)
    assert 0 < floor < one_class / 10
    assert evaluate.digits_fid(reference.train_grey, reference.train_grey, reference) == pytest.approx(0, abs=1e-6)


def test_to_grey_reads_every_output_type():
    rgb = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    grey = evaluate.to_grey(rgb)
    assert grey.shape == (2, 32, 32) and 0 <= grey.min() and grey.max() <= 1
    as_float = rgb.astype(np.float32) / 255
    assert np.allclose(evaluate.to_grey(as_float), grey, atol=1e-6)  # output_type="np"
    assert np.allclose(evaluate.to_grey(torch.from_numpy(as_float).permute(0, 3, 1, 2)), grey, atol=1e-6)  # "pt"
    assert np.allclose(evaluate.to_grey([PIL.Image.fromarray(x) for x in rgb]), grey)  # "pil"
    assert evaluate.to_grey(np.zeros((1, 64, 64, 3), np.uint8)).shape == (1, 32, 32)
    with pytest.raises(ValueError, match=r"in \[0, 1\].*\(x \+ 1\) / 2"):
        evaluate.to_grey(as_float * 2 - 1)


def test_command_line_prints_the_report(data_dir, reference, tmp_path, capsys):
    samples = tmp_path / "samples"
    samples.mkdir()
    for c in range(10):  # real test digits stand in for generated samples
        for i, pixels in enumerate(np.flatnonzero(reference.test_labels == c)[:3]):
            PIL.Image.fromarray((reference.test_grey[pixels] * 255).round().astype(np.uint8)).save(
                samples / f"{c}_{i}.png"
            )
    PIL.Image.new("RGB", (8, 8)).save(samples / "grid.png")
    report = evaluate.main(
        ["--samples_dir", str(samples), "--data_dir", str(data_dir), "--output_json", str(tmp_path / "r.json")]
    )
    assert json.loads(capsys.readouterr().out) == report == json.loads((tmp_path / "r.json").read_text())
    assert report["n_samples"] == 30 and report["skipped_files"] == ["grid.png"]
    assert report["classifier_test_accuracy"] == reference.test_accuracy
    assert report["class_agreement"] >= 0.9 and sorted(report["per_class_agreement"]) == [str(c) for c in range(10)]
    assert report["nearest_train_l2"]["samples"]["min"] > 0
    assert report["fid"]["real_test_vs_train"] > 0 and report["fid"]["samples_vs_train"] > 0
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--samples_dir", str(tmp_path / "nothing"), "--data_dir", str(data_dir)])
    assert exit_info.value.code == 2 and "No <class id>_<index>.png samples" in capsys.readouterr().err


def test_overwrite_replaces_an_earlier_digits_folder(tmp_path):
    first = prepare_data.write_digits_imagefolder(tmp_path / "digits", resolution=8, seed=0)
    second = prepare_data.write_digits_imagefolder(tmp_path / "digits", resolution=8, seed=1, overwrite=True)
    assert first["train_indices"] != second["train_indices"]
    assert json.loads((tmp_path / "digits" / "digits_info.json").read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]
