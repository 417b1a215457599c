"""Evaluation helpers: the Fréchet distance (FID's statistic) for features from any network."""

from .fid import fid_from_features, frechet_distance, gaussian_statistics

__all__ = ["fid_from_features", "frechet_distance", "gaussian_statistics"]
