"""Evaluation of generated images (what ``diffusers-var evaluate`` runs, usable on its own).

- :mod:`.metrics`: FID, Inception Score and KID (torchmetrics, on features extracted once) and k-NN
  precision/recall; :class:`FeatureStatistics` is the Gaussian FID fits (``mu``, ``sigma``, ``count``).
- :mod:`.image_models`: feature networks and classifiers by spec: a transformers image model folder, repo id or
  bundled name (``digits-classifier``), or ``inception=PATH`` (the FID Inception network from a local file).
- :mod:`.samples`: sample sets from image folders or ADM-layout npz files (:class:`ImageSet`), and
  :class:`NpzWriter`, which streams that layout to disk.
- :mod:`.fid`: the Fréchet distance in closed form, for features from any network.

Example::

    >>> from diffusers_var.evaluation import FeatureStatistics, ImageSet, frechet_inception_distance, load_image_model
    >>> model = load_image_model("digits-classifier")
    >>> features = [torch.cat([model.features(b) for b in ImageSet(p).batches(256)]) for p in ("a.npz", "b.npz")]
    >>> fid = frechet_inception_distance(*(FeatureStatistics.of(f) for f in features))
"""

from .fid import fid_from_features, frechet_distance, gaussian_statistics
from .image_models import ImageModel, load_image_model
from .metrics import (
    FeatureStatistics,
    frechet_inception_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from .samples import ImageSet, NpzWriter

__all__ = [
    "FeatureStatistics",
    "ImageModel",
    "ImageSet",
    "NpzWriter",
    "fid_from_features",
    "frechet_distance",
    "frechet_inception_distance",
    "gaussian_statistics",
    "inception_score",
    "kernel_inception_distance",
    "load_image_model",
    "precision_recall",
]
