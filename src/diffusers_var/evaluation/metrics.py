"""Sample-quality metrics on features: FID, Inception Score and KID through torchmetrics (on features computed
once, with :mod:`~diffusers_var.evaluation.image_models`), and precision/recall (Kynkäänniemi et al., 2019), which
torchmetrics lacks, as a tested closed form.

A reference can be features or only their Gaussian statistics (``mu``, ``sigma``, as the ADM reference batch ships
them): FID needs no more; KID and precision/recall need the features.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class FeatureStatistics:
    """The Gaussian FID fits to ``count`` feature vectors: mean ``mu`` (d,) and covariance ``sigma`` (d, d)."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    @classmethod
    def of(cls, features: torch.Tensor | np.ndarray) -> FeatureStatistics:
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"Statistics need at least 2 feature vectors (n, d), got shape {features.shape}.")
        if len(features) <= features.shape[1]:
            warnings.warn(
                f"{len(features)} samples for {features.shape[1]}-dimensional features: the covariance is singular "
                "and the Fréchet distance unreliable (biased, and far from its value at a large n). Use more samples "
                "or a feature network with fewer dimensions.",
                UserWarning,
                stacklevel=2,
            )
        return cls(features.mean(axis=0), np.cov(features, rowvar=False), len(features))


class _Precomputed(nn.Module):
    """torchmetrics' metrics run a feature network on what they are given; ours already ran: pass features on."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _require_torchmetrics():
    try:
        import torchmetrics  # noqa: F401
    except ImportError as error:
        raise ImportError("Sample metrics need torchmetrics: pip install torchmetrics") from error


def frechet_inception_distance(reference: FeatureStatistics, samples: FeatureStatistics) -> float:
    """FID between two Gaussians, computed by torchmetrics' ``FrechetInceptionDistance`` from their statistics."""
    _require_torchmetrics()
    from torchmetrics.image.fid import FrechetInceptionDistance

    if reference.mu.shape != samples.mu.shape:
        raise ValueError(
            f"The reference has {reference.mu.shape[0]}-dimensional features and the samples "
            f"{samples.mu.shape[0]}: they come from different feature networks."
        )
    metric = FrechetInceptionDistance(feature=_Precomputed(samples.mu.shape[0]))
    # the metric keeps sums; set them so that its mean and (unbiased) covariance are exactly these statistics
    for prefix, stats in (("real", reference), ("fake", samples)):
        mu = torch.from_numpy(np.asarray(stats.mu, dtype=np.float64))
        sigma = torch.from_numpy(np.asarray(stats.sigma, dtype=np.float64))
        count = max(int(stats.count), 2)
        setattr(metric, f"{prefix}_features_sum", mu * count)
        setattr(metric, f"{prefix}_features_cov_sum", sigma * (count - 1) + count * torch.outer(mu, mu))
        setattr(metric, f"{prefix}_features_num_samples", torch.tensor(count))
    metric.orig_dtype = torch.float64
    with warnings.catch_warnings():  # the states were set above, not by `update`: torchmetrics cannot know that
        warnings.filterwarnings("ignore", message=r".*called before the ``update`` method", category=UserWarning)
        return float(metric.compute())


def inception_score(log_probs: torch.Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of exp(E KL(p(y|x) ‖ p(y))) over ``splits`` random splits (torchmetrics' ``InceptionScore``)."""
    _require_torchmetrics()
    from torchmetrics.image.inception import InceptionScore

    metric = InceptionScore(feature=_Precomputed(log_probs.shape[1]), splits=splits)
    metric.update(log_probs.double())
    with torch.random.fork_rng():  # its splits are a random permutation: seeded, and the caller's RNG untouched
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def kernel_inception_distance(
    reference: torch.Tensor, samples: torch.Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """(mean, std) of the unbiased polynomial-kernel MMD² over random subsets (torchmetrics'
    ``KernelInceptionDistance``); ``subset_size`` shrinks to the smaller set if needed."""
    _require_torchmetrics()
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(reference), len(samples))
    metric = KernelInceptionDistance(feature=_Precomputed(samples.shape[1]), subsets=subsets, subset_size=size)
    metric.update(reference.double(), real=True)
    metric.update(samples.double(), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def _kth_neighbour_radii(features: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Each point's distance to its k-th nearest other point of the same set."""
    radii = []
    for start in range(0, len(features), chunk):
        distances = torch.cdist(features[start : start + chunk], features)
        radii.append(distances.kthvalue(k + 1, dim=1).values)  # the 1st is the point itself, at 0
    return torch.cat(radii)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    """Share of ``points`` inside at least one ball (centre, radius)."""
    inside = []
    for start in range(0, len(points), chunk):
        distances = torch.cdist(points[start : start + chunk], centres)
        inside.append((distances <= radii[None, :]).any(dim=1))
    return torch.cat(inside).float().mean().item()


def precision_recall(
    reference: torch.Tensor, samples: torch.Tensor, k: int = 3, chunk: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019): each set's manifold is the union of balls reaching
    every point's k-th nearest neighbour; precision is the share of samples inside the reference manifold, recall the
    share of reference points inside the samples' manifold."""
    if min(len(reference), len(samples)) <= k:
        raise ValueError(f"Precision/recall with k={k} needs more than {k} points in each set.")
    reference, samples = reference.double(), samples.double()
    reference_radii = _kth_neighbour_radii(reference, k, chunk)
    sample_radii = _kth_neighbour_radii(samples, k, chunk)
    precision = _coverage(samples, reference, reference_radii, chunk)
    recall = _coverage(reference, samples, sample_radii, chunk)
    return precision, recall
