"""frechet_distance: zero for identical Gaussians, the analytic 1-D and diagonal cases, scipy's sqrtm, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

from diffusers_var.evaluation import fid_from_features, frechet_distance, gaussian_statistics


def random_covariance(rng: np.random.Generator, dim: int, rank: int | None = None) -> np.ndarray:
    factor = rng.normal(size=(dim, rank or dim))
    return factor @ factor.T / dim


def test_identical_gaussians_are_at_distance_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=16), random_covariance(rng, 16)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("m1, s1, m2, s2", [(0.0, 1.0, 3.0, 2.0), (-1.5, 0.3, 2.0, 0.3), (4.0, 2.5, 4.0, 0.0)])
def test_one_dimensional_case_is_analytic(m1, s1, m2, s2):
    # for 1-D Gaussians the distance is (m1 - m2)² + (s1 - s2)², s being standard deviations
    expected = (m1 - m2) ** 2 + (s1 - s2) ** 2
    assert frechet_distance([m1], [[s1**2]], [m2], [[s2**2]]) == pytest.approx(expected, abs=1e-12)


def test_diagonal_covariances_add_up_per_dimension():
    rng = np.random.default_rng(1)
    m1, m2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 2, size=5), rng.uniform(0.1, 2, size=5)
    expected = ((m1 - m2) ** 2 + (s1 - s2) ** 2).sum()
    assert frechet_distance(m1, np.diag(s1**2), m2, np.diag(s2**2)) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("rank", [None, 3])
def test_matches_the_scipy_sqrtm_formula_and_is_symmetric(rank):
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    sigma1, sigma2 = random_covariance(rng, 8, rank), random_covariance(rng, 8, rank)
    root = linalg.sqrtm(sigma1 @ sigma2)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * root.real)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(frechet_distance(mu1, sigma1, mu2, sigma2))


def test_from_features_uses_mean_and_covariance():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(4000, 3)), rng.normal(2.0, size=(4000, 3))
    assert fid_from_features(a, b) == pytest.approx(3 * 2.0**2, rel=0.05)
    mu, sigma = gaussian_statistics(a)
    assert mu.shape == (3,) and sigma.shape == (3, 3)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-9)


def test_bad_inputs_are_refused_with_the_reason():
    eye = np.eye(3)
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(np.zeros(3), eye, np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match=r"\(d, d\)"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), eye)
    with pytest.raises(ValueError, match="not symmetric"):
        frechet_distance(np.zeros(3), np.triu(np.ones((3, 3))), np.zeros(3), eye)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full(3, np.nan), eye, np.zeros(3), eye)
    with pytest.raises(ValueError, match="n ≥ 2"):
        gaussian_statistics(np.zeros((1, 3)))
