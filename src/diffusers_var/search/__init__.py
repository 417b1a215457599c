"""Spending more compute at sampling time for better samples: verifiers that score images, search algorithms
under a budget (random, zero-order, paths over scales), and rejection sampling (best of M candidates, chosen at the
end or at an early scale)."""

from .algorithms import ALGORITHMS, SearchOutput, SearchSampler
from .rejection import RejectionOutput, RejectionSampler, default_rejection_scale
from .verifiers import (
    ClassifierVerifier,
    CLIPVerifier,
    LinearHeadVerifier,
    SelfConsistencyVerifier,
    Verifier,
    WeightedVerifier,
)

__all__ = [
    "ALGORITHMS",
    "CLIPVerifier",
    "ClassifierVerifier",
    "LinearHeadVerifier",
    "RejectionOutput",
    "RejectionSampler",
    "SearchOutput",
    "SearchSampler",
    "SelfConsistencyVerifier",
    "Verifier",
    "WeightedVerifier",
    "default_rejection_scale",
]
