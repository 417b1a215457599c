"""Evaluation: the metrics on constructed cases, the sample sets and npz layout, the bundled digits classifier, and
`diffusers-var evaluate` end to end with its errors."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_var.cli import main as cli_main
from diffusers_var.evaluation import frechet_distance
from diffusers_var.evaluation.image_models import load_image_model
from diffusers_var.evaluation.metrics import (
    FeatureStatistics,
    frechet_inception_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from diffusers_var.evaluation.samples import ImageSet, NpzWriter

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"
sys.path.insert(0, str(DIGITS))


# -- metrics on constructed cases -------------------------------------------------------------------------------------


def test_fid_of_a_set_against_itself_is_zero_and_gaussians_follow_the_closed_form():
    features = torch.randn(500, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    stats = FeatureStatistics.of(features)
    assert abs(frechet_inception_distance(stats, stats)) < 1e-8
    d, shift, scale = 8, np.full(8, 0.5), 2.0  # N(0, I) vs N(m, s² I): |m|² + d (1 + s² − 2 s)
    a = FeatureStatistics(np.zeros(d), np.eye(d), 10_000)
    b = FeatureStatistics(shift, scale**2 * np.eye(d), 10_000)
    expected = float(shift @ shift + d * (1 + scale**2 - 2 * scale))
    assert frechet_inception_distance(a, b) == pytest.approx(expected, rel=1e-9)
    rotation = np.linalg.qr(np.random.default_rng(0).normal(size=(d, d)))[0]  # a full covariance
    c = FeatureStatistics(shift, rotation @ np.diag(np.arange(1.0, d + 1)) @ rotation.T, 10_000)
    assert frechet_inception_distance(b, c) == pytest.approx(frechet_distance(b.mu, b.sigma, c.mu, c.sigma), rel=1e-6)


def test_inception_score_is_one_for_uniform_and_the_class_count_for_confident_balanced_predictions():
    uniform = torch.full((100, 10), -np.log(10.0), dtype=torch.float64)
    assert inception_score(uniform, splits=2)[0] == pytest.approx(1.0, abs=1e-9)
    confident = torch.full((100, 10), -1e4, dtype=torch.float64)
    confident[torch.arange(100), torch.arange(100) % 10] = 0.0
    assert inception_score(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-6)


def test_kid_is_the_unbiased_polynomial_mmd():
    def mmd(x, y):  # (x·y / d + 1)³ kernel, diagonal left out within each set
        kernel = lambda a, b: (a @ b.T / x.shape[1] + 1) ** 3  # noqa: E731
        kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
        m, n = len(x), len(y)
        return (
            (kxx.sum() - kxx.trace()) / (m * (m - 1)) + (kyy.sum() - kyy.trace()) / (n * (n - 1)) - 2 * kxy.mean()
        ).item()

    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(200, 6, generator=g, dtype=torch.float64) + shift for shift in (0.0, 0.4))
    mean, std = kernel_inception_distance(x, y, subsets=1, subset_size=200)
    assert mean == pytest.approx(mmd(x, y), rel=1e-9) and std == 0.0
    assert kernel_inception_distance(x, x + 0.0, subsets=3, subset_size=100)[0] < 0.05 * mean


def test_precision_and_recall_on_constructed_sets():
    g = torch.Generator().manual_seed(0)
    cluster_a = torch.randn(100, 2, generator=g) * 0.1
    cluster_b = torch.randn(100, 2, generator=g) * 0.1 + 10.0
    reference = torch.cat((cluster_a, cluster_b))
    assert precision_recall(reference, reference.clone()) == (1.0, 1.0)
    precision, recall = precision_recall(reference, cluster_a.clone())  # the samples cover half the reference
    assert precision == 1.0 and recall == pytest.approx(0.5, abs=0.02)
    assert precision_recall(cluster_a, cluster_b) == (0.0, 0.0)  # disjoint
    with pytest.raises(ValueError, match="needs more than 3 points"):
        precision_recall(reference[:3], reference)


def test_too_few_samples_for_the_dimension_is_a_warning_not_an_error():
    with pytest.warns(UserWarning, match="covariance is singular and the Fréchet distance unreliable"):
        FeatureStatistics.of(torch.randn(10, 64))


# -- sample sets and the npz layout ------------------------------------------------------------------------------------


def write_pngs(folder: Path, images: np.ndarray, labels) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    counters = {}
    for image, label in zip(images, labels):
        index = counters.setdefault(int(label), 0)
        counters[int(label)] += 1
        PIL.Image.fromarray(image).save(folder / f"{int(label)}_{index}.png")
    return folder


def test_npz_round_trip_in_the_adm_layout(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    with NpzWriter(tmp_path / "s.npz", num_images=7, image_size=(5, 4)) as npz:
        npz.write(images[:4], labels[:4])
        npz.write(images[4:], labels[4:])
    with np.load(tmp_path / "s.npz") as data:
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (7, 5, 4, 3)
        assert np.array_equal(data["arr_0"], images) and data["arr_1"].dtype == np.int64
        assert np.array_equal(data["arr_1"], labels)
    loaded = ImageSet(tmp_path / "s.npz")
    assert len(loaded) == 7 and loaded.image_size == (5, 4) and np.array_equal(loaded.labels, labels)
    assert np.array_equal(np.concatenate(list(loaded.batches(3))), images)
    folder = ImageSet(write_pngs(tmp_path / "pngs", images, labels))  # <class>_<index>.png: the same order
    assert np.array_equal(folder.labels, labels)
    assert np.array_equal(np.concatenate(list(folder.batches(4))), images)
    with (
        pytest.raises(ValueError, match="8 images were written .* 7 announced"),
        NpzWriter(tmp_path / "x.npz", 7, (5, 4)) as npz,
    ):
        npz.write(np.concatenate((images, images[:1])), np.zeros(8))
    assert not list(tmp_path.glob(".x.npz*")) and not (tmp_path / "x.npz").exists()


# -- the bundled digits classifier -------------------------------------------------------------------------------------


def test_digits_classifier_is_small_and_reads_the_held_out_digits():
    from prepare_data import load_digits_split

    from diffusers_var import bundled_model_path

    folder = bundled_model_path("digits-classifier")
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 1_000_000
    model = load_image_model("digits-classifier")
    _, _, test_x, test_y = load_digits_split()
    predictions = torch.cat([model.log_probs(test_x[i : i + 128]).argmax(-1) for i in range(0, len(test_x), 128)])
    accuracy = (predictions.numpy() == test_y).mean()
    assert accuracy >= 0.97, accuracy
    assert f"{accuracy:.2%}" in (folder / "README.md").read_text()
    assert model.features(test_x[:4]).shape == (4, 64)


def test_the_classifier_recipe_runs_in_smoke_form():
    import train_classifier

    model, processor, held_out, train_accuracy = train_classifier.train(epochs=1)
    assert 0.1 < held_out <= 1.0 and sum(p.numel() for p in model.parameters()) < 250_000
    assert processor.size == {"height": 32, "width": 32}


# -- diffusers-var evaluate ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digit_sets(tmp_path_factory):
    from prepare_data import load_digits_split

    root = tmp_path_factory.mktemp("eval")
    train_x, train_y, test_x, test_y = load_digits_split()
    return write_pngs(root / "a", train_x[:120], train_y[:120]), write_pngs(root / "b", test_x[:100], test_y[:100])


def test_evaluate_agrees_with_an_independent_computation_and_its_statistics(digit_sets, tmp_path, capsys):
    a, b = digit_sets
    args = ["evaluate", "--samples", str(a), "--reference", str(b), "--features", "digits-classifier"]
    cli_main([*args, "--output", str(tmp_path / "m.json"), "--save-stats", str(tmp_path / "ref.npz")])
    report = json.loads((tmp_path / "m.json").read_text())
    for key in ("fid", "inception_score", "inception_score_std", "kid_mean", "kid_std", "precision", "recall"):
        assert isinstance(report[key], float), key
    assert report["num_samples"] == 120 and report["num_reference"] == 100 and report["image_size"] == [32, 32]
    assert report["extractor"] == "digits-classifier" and len(report["weights_sha256"]) == 64
    assert (
        re.fullmatch(r"ViTImageProcessor(Pil)?: bilinear to 32×32", report["resize"]) and report["dtype"] == "float32"
    )

    model = load_image_model("digits-classifier")
    features = [torch.cat([model.features(x) for x in ImageSet(s).batches(64)]).numpy() for s in (a, b)]
    mu_a, mu_b = features[0].mean(0), features[1].mean(0)
    expected = frechet_distance(mu_b, np.cov(features[1], rowvar=False), mu_a, np.cov(features[0], rowvar=False))
    assert report["fid"] == pytest.approx(expected, rel=1e-3)

    cli_main([*args[:4], str(tmp_path / "ref.npz"), *args[5:], "--output", str(tmp_path / "m2.json")])
    from_stats = json.loads((tmp_path / "m2.json").read_text())
    assert from_stats["fid"] == pytest.approx(report["fid"], rel=1e-9) and from_stats["kid_mean"] is None
    assert from_stats["reference_statistics"] == "stored in the reference file"

    # lower precision is an explicit choice, and recorded: bf16 features move FID a little, not by an order
    cli_main([*args, "--dtype", "bf16", "--output", str(tmp_path / "m3.json")])
    bf16 = json.loads((tmp_path / "m3.json").read_text())
    assert bf16["dtype"] == "bfloat16" and bf16["sample_dtype"] == "uint8" and bf16["statistics_dtype"] == "float64"
    assert bf16["fid"] != report["fid"] and bf16["fid"] == pytest.approx(report["fid"], rel=0.5)


def test_evaluate_errors_are_one_line_and_name_the_file(digit_sets, tmp_path, capsys):
    a, b = digit_sets
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    PIL.Image.new("RGB", (32, 32)).save(mixed / "0_0.png")
    PIL.Image.new("RGB", (16, 16)).save(mixed / "0_1.png")
    small = write_pngs(tmp_path / "small", np.zeros((4, 16, 16, 3), np.uint8), [0, 1, 2, 3])
    (tmp_path / "empty").mkdir()
    np.savez(tmp_path / "no_arr0.npz", images=np.zeros((2, 32, 32, 3), np.uint8))
    np.savez(tmp_path / "no_stats.npz", mean=np.zeros(3))
    cases = [
        (["--samples", str(mixed)], "mixes image sizes: 0_0.png is 32×32 but 0_1.png is 16×16"),
        (["--samples", str(tmp_path / "empty")], "holds no images"),
        (["--samples", str(small)], "The samples are 16×16 px but the reference"),
        (["--samples", str(tmp_path / "no_arr0.npz")], "has no arr_0 (its arrays: ['images'])"),
        (["--reference", str(tmp_path / "no_stats.npz")], "holds neither statistics (mu, sigma) nor images (arr_0)"),
        (["--features", str(tmp_path / "nothing-here")], "Cannot load the image model"),
        (["--features", f"inception={tmp_path / 'missing.pth'}"], "no such weights file"),
        (["--features", "inception=x.pth", "--dtype", "bf16"], "the FID Inception network runs in fp32"),
        (["--device", "foo"], "--device 'foo' is not a device name"),
    ]
    for change, message in cases:
        args = {"--samples": str(a), "--reference": str(b), "--features": "digits-classifier"}
        args.update(dict(zip(change[::2], change[1::2])))
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["evaluate", *[x for item in args.items() for x in item], "--output", str(tmp_path / "o.json")])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert exit_info.value.code != 0 and len(errors) == 1 and message in errors[0], (message, err)
    assert not (tmp_path / "o.json").exists()
