"""Spending more compute at sampling time for better samples: verifiers that score images, and rejection sampling
(best of M candidates, chosen at the end or at an early scale)."""

from .rejection import RejectionOutput, RejectionSampler, default_rejection_scale
from .verifiers import ClassifierVerifier, Verifier

__all__ = ["ClassifierVerifier", "RejectionOutput", "RejectionSampler", "Verifier", "default_rejection_scale"]
