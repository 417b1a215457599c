"""Measure class-conditional samples of a model trained on the digits: class agreement, copying, and FID.

    diffusers-var generate --model var-digits --num-per-class 36 --seed 0 --output-dir samples/
    python examples/digits/evaluate.py --samples_dir samples/ --data_dir data/digits   # prepare_data.py's folder

Prints a JSON report. Everything is measured against the real digits only, in these spaces:

- grey: RGB → 0.299 R + 0.587 G + 0.114 B (ITU-R 601 luma, as PIL's ``convert("L")``) in [0, 1], resized to
  32×32 (bicubic) if a sample has another size. The real images are grey already, so this is exact for them.
- classifier: ``SVC(C=10, gamma="scale")`` (RBF) on the grey image box-averaged back to 8×8, the digits' own
  grid (64 inputs). Of SVCs, k-NN and MLPs on 8×8 or 32 px inputs none beat it on the held-out split (99.2 % for
  seed 0; the same SVC on 32 px ties), and the coarse grid keeps it blind to pixel noise that is not the digit.
  ``class_agreement`` is the share of samples it reads as the class they were generated for.
- nearest_train_l2: each image's L2 distance to its nearest training image, in 32×32 grey [0, 1] (1024 pixels).
  Real held-out test images show how far new handwriting lies from the training set; samples far closer than
  that (a median near the test images' minimum, or zeros) are copies.
- fid: the Fréchet distance (``diffusers_var.evaluation.frechet_distance``) between Gaussians fitted to the 64
  hidden activations ``tanh(x W₀ + b₀)`` of ``MLPClassifier(hidden_layer_sizes=(64,), activation="tanh",
  alpha=1e-3, max_iter=500, random_state=0)`` trained on the train split, x the 32 px grey image flattened
  (1024 inputs, full resolution so that artefacts count). tanh, not ReLU: no dead units, a full-rank covariance.
  FID(real test, real train) is the floor a perfect model reaches at the test split's size; FID is biased upwards
  at small n, so compare at equal n (36 samples per class match the 360 test images).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
from prepare_data import load_digits_split
from sklearn.calibration import CalibratedClassifierCV
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier
from sklearn.svm import SVC

from diffusers_var.evaluation import fid_from_features

RESOLUTION = 32
LUMA = np.array([0.299, 0.587, 0.114])
SAMPLE_NAME = re.compile(r"^(\d+)_(\d+)\.png$")  # diffusers-var generate --output-dir: <class id>_<index>.png


def to_grey(images) -> np.ndarray:
    """``(N, 32, 32)`` float grey in [0, 1] from images in any of the forms samples come in.

    Accepts uint8 (0..255) or float ([0, 1], ``output_type="np"``) arrays ``(N, H, W, 3)`` or ``(N, H, W)``,
    a torch tensor ``(N, 3, H, W)`` in [0, 1] (``output_type="pt"``), or a list of PIL images.

    Example::

        >>> to_grey(np.zeros((2, 32, 32, 3), np.uint8)).shape
        (2, 32, 32)
    """
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], PIL.Image.Image):
        return np.concatenate([to_grey(np.asarray(image.convert("RGB"))[None]) for image in images])
    if hasattr(images, "detach"):
        images = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    array = np.asarray(images)
    if array.ndim == 4 and array.shape[-1] == 3:
        grey = array.astype(np.float64) @ LUMA
    elif array.ndim == 3:
        grey = array.astype(np.float64)
    else:
        raise ValueError(f"Images must be (N, H, W, 3) or (N, H, W), got shape {array.shape}.")
    if len(grey) == 0:
        raise ValueError("No images to evaluate.")
    if array.dtype == np.uint8:
        grey /= 255.0
    elif grey.min() < -1e-6 or grey.max() > 1 + 1e-6:
        raise ValueError(
            f"Float images must be in [0, 1], got values in [{grey.min():.3g}, {grey.max():.3g}]; "
            "map [-1, 1] images with (x + 1) / 2 or pass uint8."
        )
    if grey.shape[1:] != (RESOLUTION, RESOLUTION):
        size = (RESOLUTION, RESOLUTION)
        resized = [PIL.Image.fromarray(g.astype(np.float32), "F").resize(size, PIL.Image.BICUBIC) for g in grey]
        grey = np.stack([np.asarray(image) for image in resized])
    return np.clip(grey, 0.0, 1.0)


def _box_8x8(grey: np.ndarray) -> np.ndarray:
    step = RESOLUTION // 8
    return grey.reshape(len(grey), 8, step, 8, step).mean(axis=(2, 4)).reshape(len(grey), 64)


class DigitsReference:
    """The real digits (grey, 32 px) and what is fitted on them: the classifier and the FID feature MLP.

    Example::

        >>> reference = DigitsReference.from_data_dir("data/digits")
        >>> reference.test_accuracy
        0.9916666666666667
    """

    def __init__(self, train_images, train_labels, test_images, test_labels):
        self.train_grey, self.test_grey = to_grey(train_images), to_grey(test_images)
        self.train_labels, self.test_labels = np.asarray(train_labels), np.asarray(test_labels)
        self.classifier = SVC(C=10.0, gamma="scale").fit(_box_8x8(self.train_grey), self.train_labels)

    @classmethod
    def from_data_dir(cls, data_dir: str | os.PathLike) -> DigitsReference:
        """From the image folder written by prepare_data.py (the exact pixels the model was trained on)."""
        return cls(*load_imagefolder(data_dir, "train"), *load_imagefolder(data_dir, "test"))

    @classmethod
    def from_sklearn(cls, resolution: int = 32, test_fraction: float = 0.2, seed: int = 0) -> DigitsReference:
        """From ``load_digits_split`` with the same arguments as prepare_data.py, without a folder."""
        return cls(*load_digits_split(resolution, test_fraction, seed))

    def predict(self, images) -> np.ndarray:
        return self.classifier.predict(_box_8x8(to_grey(images)))

    @functools.cached_property
    def probabilistic_classifier(self) -> CalibratedClassifierCV:
        """The same SVC with Platt-scaled class probabilities (sigmoid calibration, 5-fold, deterministic)."""
        svc = SVC(C=10.0, gamma="scale")
        calibrated = CalibratedClassifierCV(svc, method="sigmoid", cv=5, ensemble=False)
        return calibrated.fit(_box_8x8(self.train_grey), self.train_labels)

    def probabilities(self, images) -> np.ndarray:
        """(N, 10) p(class | image) under the probabilistic SVC, columns in class order."""
        return self.probabilistic_classifier.predict_proba(_box_8x8(to_grey(images)))

    @functools.cached_property
    def test_accuracy(self) -> float:
        return float(np.mean(self.predict(self.test_grey) == self.test_labels))

    @functools.cached_property
    def feature_mlp(self) -> MLPClassifier:
        mlp = MLPClassifier(hidden_layer_sizes=(64,), activation="tanh", alpha=1e-3, max_iter=500, random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # on other splits it may stop at max_iter; still fine
            return mlp.fit(self.train_grey.reshape(len(self.train_grey), -1), self.train_labels)

    def features(self, images) -> np.ndarray:
        """The MLP's hidden activations (sklearn has no public call for them, so the first layer is applied here)."""
        grey = to_grey(images)
        return np.tanh(grey.reshape(len(grey), -1) @ self.feature_mlp.coefs_[0] + self.feature_mlp.intercepts_[0])


@functools.lru_cache(maxsize=1)
def default_reference() -> DigitsReference:
    """The reference for prepare_data.py's default split (resolution 32, test fraction 0.2, seed 0)."""
    return DigitsReference.from_sklearn()


def _labels_for(images, requested_labels) -> tuple[np.ndarray, np.ndarray]:
    grey, labels = to_grey(images), np.asarray(requested_labels).reshape(-1)
    if len(labels) != len(grey):
        raise ValueError(f"Got {len(grey)} images but {len(labels)} requested labels; give one label per image.")
    return grey, labels


def class_agreement(images, requested_labels, reference: DigitsReference | None = None) -> float:
    """Share of images the real-digits classifier reads as the class they were generated for.

    Example::

        >>> class_agreement(pipe(class_labels=[3, 7], output_type="np").images, [3, 7])
        1.0
    """
    grey, labels = _labels_for(images, requested_labels)
    return float(np.mean((reference or default_reference()).predict(grey) == labels))


def per_class_agreement(images, requested_labels, reference: DigitsReference | None = None) -> dict[int, float]:
    """``class_agreement`` for each requested class on its own."""
    grey, labels = _labels_for(images, requested_labels)
    agree = (reference or default_reference()).predict(grey) == labels
    return {int(c): float(np.mean(agree[labels == c])) for c in np.unique(labels)}


def nearest_neighbour_distances(images, neighbours) -> np.ndarray:
    """For each image, the L2 distance (32×32 grey in [0, 1]) to its nearest image in ``neighbours``.

    Example::

        >>> nearest_neighbour_distances(train_images[:3], train_images)  # copies are at distance 0
        array([0., 0., 0.])
    """
    a, b = to_grey(images).reshape(-1, RESOLUTION**2), to_grey(neighbours).reshape(-1, RESOLUTION**2)
    squared = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2.0 * a @ b.T
    nearest = np.sqrt(np.clip(squared.min(axis=1), 0.0, None))
    return np.where(nearest < 1e-6, 0.0, nearest)  # the expansion above leaves ~1e-7 for identical images


def distance_stats(distances: np.ndarray) -> dict[str, float]:
    """Median, 5th percentile and minimum of nearest-neighbour distances."""
    distances = np.asarray(distances)
    return {
        "median": float(np.median(distances)),
        "p5": float(np.percentile(distances, 5)),
        "min": float(distances.min()),
    }


def digits_fid(images_a, images_b, reference: DigitsReference | None = None) -> float:
    """FID in the feature MLP's hidden layer (see the module docstring)."""
    reference = reference or default_reference()
    return fid_from_features(reference.features(images_a), reference.features(images_b))


def load_imagefolder(data_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB images and labels of ``<data_dir>/<split>/<class id>/*.png``."""
    folder = Path(data_dir) / split
    classes = sorted(p for p in folder.glob("*") if p.is_dir()) if folder.is_dir() else []
    if not classes or not all(p.name.isdigit() for p in classes):
        raise ValueError(
            f"{folder} is not a split of a digits image folder (class sub-folders 0..9); make one with "
            f"`python examples/digits/prepare_data.py --output_dir {data_dir}`."
        )
    images, labels = [], []
    for class_folder in classes:
        for path in sorted(class_folder.glob("*.png")):
            with PIL.Image.open(path) as image:
                images.append(np.asarray(image.convert("RGB")))
            labels.append(int(class_folder.name))
    return np.stack(images), np.asarray(labels)


def load_samples(samples_dir: str | os.PathLike) -> tuple[list[PIL.Image.Image], np.ndarray, list[str]]:
    """Samples named ``<class id>_<index>.png``: (images, requested labels, names of the other files skipped)."""
    paths = sorted(Path(samples_dir).glob("*")) if Path(samples_dir).is_dir() else []
    matched = [(p, SAMPLE_NAME.match(p.name)) for p in paths]
    samples = sorted((int(m[1]), int(m[2]), p) for p, m in matched if m)
    if not samples:
        raise ValueError(
            f"No <class id>_<index>.png samples in {samples_dir}; write them with "
            "`diffusers-var generate --model MODEL --num-per-class 36 --output-dir DIR`."
        )
    images = []
    for _, _, path in samples:
        with PIL.Image.open(path) as image:
            images.append(image.convert("RGB"))
    skipped = [p.name for p, m in matched if not m and not p.name.startswith(".")]
    return images, np.asarray([label for label, _, _ in samples]), skipped


def evaluate(samples_dir: str | os.PathLike, data_dir: str | os.PathLike) -> dict:
    """The full report for a folder of samples against prepare_data.py's folder (see the module docstring)."""
    reference = DigitsReference.from_data_dir(data_dir)
    images, labels, skipped = load_samples(samples_dir)
    unknown = sorted(set(labels.tolist()) - set(reference.train_labels.tolist()))
    if unknown:
        raise ValueError(f"Samples of classes {unknown} in {samples_dir}, which the digits do not have (0..9).")
    grey = to_grey(images)
    return {
        "n_samples": len(grey),
        "n_train": len(reference.train_grey),
        "n_test": len(reference.test_grey),
        "skipped_files": skipped,
        "classifier": "SVC(C=10, gamma='scale') on 8x8 box-averaged grey, trained on the real train split",
        "classifier_test_accuracy": reference.test_accuracy,
        "class_agreement": class_agreement(grey, labels, reference),
        "per_class_agreement": {str(c): v for c, v in per_class_agreement(grey, labels, reference).items()},
        "nearest_train_l2": {
            "space": "32x32 grey in [0, 1], L2 over 1024 pixels",
            "samples": distance_stats(nearest_neighbour_distances(grey, reference.train_grey)),
            "real_test": distance_stats(nearest_neighbour_distances(reference.test_grey, reference.train_grey)),
        },
        "fid": {
            "features": "tanh hidden layer (64) of MLPClassifier((64,), alpha=1e-3, random_state=0) on 32 px grey",
            "samples_vs_train": digits_fid(grey, reference.train_grey, reference),
            "real_test_vs_train": digits_fid(reference.test_grey, reference.train_grey, reference),
        },
    }


WRITTEN_BY = "diffusers-var examples"  # the mark of the JSON reports these scripts write


def _ours(path: Path) -> bool:
    """Whether an existing output is one of ours: a report with our mark, or an image with our EXIF tag."""
    from diffusers_var.generate import written_by_us

    if path.suffix == ".json":
        try:
            return json.loads(path.read_text(encoding="utf-8")).get("written_by") == WRITTEN_BY
        except (OSError, ValueError, AttributeError):
            return False
    return written_by_us(path)


def refuse_foreign_outputs(paths) -> None:
    """Before any work: an output path that holds a file these scripts did not write is an error, not replaced."""
    for path in map(Path, paths):
        if path.exists() and (path.is_dir() or not _ours(path)):
            raise SystemExit(f"error: {path} exists and was not written by this script; move it or use another folder.")


def _write_json_atomically(report: dict, path: Path) -> None:
    path = Path(path)
    refuse_foreign_outputs([path])
    report.setdefault("written_by", WRITTEN_BY)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples_dir", required=True, help="<class id>_<index>.png files (diffusers-var generate)")
    parser.add_argument("--data_dir", required=True, help="the image folder written by prepare_data.py")
    parser.add_argument("--output_json", default=None, help="also write the report here")
    args = parser.parse_args(argv)
    if args.output_json:
        refuse_foreign_outputs([Path(args.output_json)])  # before the work, not after
    try:
        report = evaluate(args.samples_dir, args.data_dir)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    if args.output_json:
        _write_json_atomically(report, Path(args.output_json))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
