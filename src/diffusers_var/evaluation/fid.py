"""The Fréchet distance between two Gaussians, the statistic behind FID, for features from any network.

``d² = |μ₁ − μ₂|² + tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½)``

``tr (Σ₁ Σ₂)^½`` is computed as ``Σᵢ √λᵢ`` over the eigenvalues of the symmetric matrix ``Σ₁^½ Σ₂ Σ₁^½``: it is
similar to ``Σ₁ Σ₂``, so it has the same eigenvalues, and being symmetric positive semi-definite, ``numpy.linalg.
eigh`` gives them real. That avoids ``scipy.linalg.sqrtm`` of the non-symmetric product, whose round-off shows up
as small imaginary parts and, for the singular covariances of few samples, as failures to converge. Round-off can
still leave eigenvalues slightly below zero; they are set to zero, and so is a slightly negative total.
"""

from __future__ import annotations

import numpy as np


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def _check_gaussian(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(
            f"{name}: the mean must be a vector (d,) and the covariance (d, d), got {mu.shape} and {sigma.shape}."
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: the mean or covariance holds NaN or inf; check the features it came from.")
    scale = max(np.abs(sigma).max(), 1e-12)
    if np.abs(sigma - sigma.T).max() > 1e-6 * scale:
        raise ValueError(f"{name}: the covariance is not symmetric; pass np.cov(features, rowvar=False).")
    return mu, (sigma + sigma.T) / 2


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2); FID on features.

    Example::

        >>> frechet_distance([0.0], [[1.0]], [3.0], [[4.0]])  # 1-D: (m1 - m2)² + (s1 - s2)² = 9 + 1
        10.0
    """
    mu1, sigma1 = _check_gaussian(mu1, sigma1, "first Gaussian")
    mu2, sigma2 = _check_gaussian(mu2, sigma2, "second Gaussian")
    if mu1.shape != mu2.shape:
        raise ValueError(f"The Gaussians have different dimensions, {mu1.size} and {mu2.size}; use the same features.")
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return float(max(distance, 0.0))


def gaussian_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, samples in rows) of a ``(n, d)`` feature array.

    Example::

        >>> mu, sigma = gaussian_statistics(np.random.default_rng(0).normal(size=(100, 4)))
        >>> mu.shape, sigma.shape
        ((4,), (4, 4))
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"Features must be (n, d) with n ≥ 2 samples, got shape {features.shape}.")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def fid_from_features(features1, features2) -> float:
    """Fréchet distance between the Gaussians fitted to two ``(n, d)`` feature arrays.

    The estimate is biased upwards by a term that shrinks with n: compare values computed from equal sample sizes.

    Example::

        >>> rng = np.random.default_rng(0)
        >>> fid_from_features(rng.normal(size=(500, 2)), rng.normal(3.0, size=(500, 2)))  # about 2 · 3² = 18
    """
    return frechet_distance(*gaussian_statistics(features1), *gaussian_statistics(features2))
