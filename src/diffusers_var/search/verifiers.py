"""Verifiers: how good is an image of class y? The score rejection sampling (and search) maximises.

A verifier takes uint8 images (N, H, W, 3) and their class ids (N,) and returns (N,) scores, higher is better.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch


class Verifier(Protocol):
    def __call__(self, images: np.ndarray, class_labels: torch.LongTensor) -> torch.Tensor: ...


class ClassifierVerifier:
    """log p(y | x) under an image classifier: a transformers ``AutoModelForImageClassification`` (a folder, a repo
    id, or a bundled name such as ``digits-classifier``), or a callable that maps uint8 images (N, H, W, 3) to
    per-class log-probabilities (N, C). Its class ids must be the generator's (ImageNet classifiers are, in order).

    Example:
        ```py
        >>> verifier = ClassifierVerifier("digits-classifier")
        >>> scores = verifier(images_uint8, torch.tensor([3, 7]))   # log p(3 | image 0), log p(7 | image 1)
        ```
    """

    def __init__(self, classifier: str | Callable[[np.ndarray], torch.Tensor], device: str | torch.device = "cpu"):
        if isinstance(classifier, str):
            from ..evaluation.image_models import load_image_model

            model = load_image_model(classifier, device)
            if not model.has_logits:
                raise ValueError(
                    f"{classifier} is not an image classifier (no *ForImageClassification head): rejection needs "
                    "class probabilities."
                )
            self.name, self._log_probs = classifier, model.log_probs
            config = getattr(getattr(model, "model", None), "config", None)
            self.num_classes = getattr(config, "num_labels", None)
            self.description = model.describe()
        elif callable(classifier):
            self.name, self._log_probs = getattr(classifier, "__name__", type(classifier).__name__), classifier
            self.num_classes, self.description = None, {"extractor": self.name}
        else:
            raise ValueError(
                f"The rejection classifier must be a model spec or a callable, got {type(classifier).__name__}."
            )

    def check_classes(self, num_classes: int) -> None:
        """Refuse, before sampling, a classifier of fewer classes than the generator's (when its head says so)."""
        if self.num_classes is not None and self.num_classes < num_classes:
            raise ValueError(
                f"The classifier {self.name} knows {self.num_classes} classes but the generator has {num_classes}: "
                "rejection needs a classifier of the generator's classes, in the same order."
            )

    def log_probs(self, images: np.ndarray) -> torch.Tensor:
        log_probs = torch.as_tensor(self._log_probs(images)).float().cpu()
        if log_probs.ndim != 2 or log_probs.shape[0] != len(images):
            raise ValueError(f"The classifier {self.name} returned {tuple(log_probs.shape)}, not (N, classes).")
        return log_probs

    def __call__(self, images: np.ndarray, class_labels: torch.LongTensor) -> torch.Tensor:
        log_probs = self.log_probs(images)
        labels = torch.as_tensor(class_labels).long().cpu()
        if int(labels.max()) >= log_probs.shape[1]:
            raise ValueError(
                f"The classifier {self.name} knows {log_probs.shape[1]} classes, but class {int(labels.max())} was "
                "asked for: it must be a classifier of the generator's classes."
            )
        return log_probs.gather(1, labels[:, None])[:, 0]
