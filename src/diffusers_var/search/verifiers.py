"""Verifiers: how good is an image of class y? The score rejection sampling and search maximise.

A verifier takes uint8 images (N, H, W, 3) and their class ids (N,) and returns (N,) scores, higher is better. A
verifier that also needs each image's coarse preview (the self-supervised one) says at which scale, in
``preview_scale``, and takes the previews as ``previews=``; the search algorithms supply them.

- :class:`ClassifierVerifier`: log p(y | x) under any image classifier (or a callable).
- :class:`CLIPVerifier`: CLIP zero-shot, "a photo of a <class name>", names from the pipeline's ``id2label``.
- :class:`LinearHeadVerifier`: a linear head (a small safetensors file) on a backbone's pooled features (DINOv2).
- :class:`SelfConsistencyVerifier`: how much the final image agrees with its own early preview.
- :class:`WeightedVerifier`: a weighted sum of verifiers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch


class Verifier(Protocol):
    def __call__(self, images: np.ndarray, class_labels: torch.LongTensor) -> torch.Tensor: ...


def preview_scale_of(verifier) -> int | None:
    """The scale whose previews a verifier needs (``None``: it scores images alone)."""
    return getattr(verifier, "preview_scale", None)


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


def _log_softmax_at(logits: torch.Tensor, class_labels, name: str) -> torch.Tensor:
    labels = torch.as_tensor(class_labels).long().cpu()
    logits = logits.float().cpu()
    if int(labels.max()) >= logits.shape[1]:
        raise ValueError(f"{name} scores {logits.shape[1]} classes, but class {int(labels.max())} was asked for.")
    return logits.log_softmax(-1).gather(1, labels[:, None])[:, 0]


class CLIPVerifier:
    """CLIP zero-shot: log p(y | x) over the prompts ``template.format(name)`` of every class (transformers
    ``CLIPModel`` and its processor, from a folder, repo id or bundled name).

    ``class_names``: one name per class id, e.g. from ``pipe.config.id2label`` (the first of its comma-separated
    synonyms is used); a model without class names cannot be scored by CLIP.

    Example:
        ```py
        >>> verifier = CLIPVerifier("openai/clip-vit-base-patch32", pipe.config.id2label)
        ```
    """

    def __init__(
        self,
        model: str,
        class_names: dict | list[str] | None,
        template: str = "a photo of a {}",
        device: str | torch.device = "cpu",
    ):
        from transformers import AutoProcessor, CLIPModel

        from ..evaluation.image_models import resolve_model_folder

        if not class_names:
            raise ValueError(
                "CLIPVerifier needs a name for every class (the pipeline's id2label), and this model has none: use "
                "a classifier verifier instead, or give class_names."
            )
        if isinstance(class_names, dict):
            ids = sorted(int(k) for k in class_names)
            if ids != list(range(len(ids))):
                raise ValueError(f"class_names must name the classes 0 to N-1 without gaps, got ids {ids[:10]}…")
            class_names = [class_names.get(i, class_names.get(str(i))) for i in ids]
        if "{}" not in template:
            raise ValueError(f"template must contain {{}} for the class name, got {template!r}.")
        folder = resolve_model_folder(model)
        self.model = CLIPModel.from_pretrained(folder).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(folder)
        self.device, self.name = torch.device(device), f"CLIP zero-shot ({model})"
        self.prompts = [template.format(str(name).split(",")[0].strip()) for name in class_names]
        self.num_classes = len(self.prompts)
        self.description = {"extractor": self.name, "template": template}
        with torch.no_grad():
            text = self.processor(text=self.prompts, return_tensors="pt", padding=True).to(self.device)
            features = self.model.get_text_features(**text)
            features = getattr(features, "pooler_output", features)  # transformers 5 may return an output object
            self.text_features = torch.nn.functional.normalize(features.float(), dim=-1)

    def check_classes(self, num_classes: int) -> None:
        if self.num_classes < num_classes:
            raise ValueError(f"{self.name} has names for {self.num_classes} classes; the generator has {num_classes}.")

    @torch.no_grad()
    def __call__(self, images: np.ndarray, class_labels: torch.LongTensor) -> torch.Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        features = self.model.get_image_features(pixel_values=pixels)
        features = torch.nn.functional.normalize(getattr(features, "pooler_output", features).float(), dim=-1)
        logits = self.model.logit_scale.exp().float() * features @ self.text_features.T
        return _log_softmax_at(logits, class_labels, self.name)


class LinearHeadVerifier:
    """log p(y | x) from a linear head on a backbone's pooled features (e.g. DINOv2): the backbone is any feature
    spec of :func:`~diffusers_var.evaluation.image_models.load_image_model`, the head a safetensors file with
    ``weight`` (classes, features) and ``bias`` (classes,) that the user trained (e.g. a logistic regression)."""

    def __init__(self, backbone: str, head: str, device: str | torch.device = "cpu"):
        from pathlib import Path

        from safetensors.torch import load_file

        from ..evaluation.image_models import load_image_model

        path = Path(head)
        if not path.is_file():
            raise ValueError(f"The linear head {path} does not exist: give a safetensors file with weight and bias.")
        tensors = load_file(path)
        if set(tensors) != {"weight", "bias"} or tensors["weight"].ndim != 2 or tensors["bias"].ndim != 1:
            raise ValueError(
                f"{path} must hold exactly weight (classes, features) and bias (classes,), got "
                f"{ {k: tuple(v.shape) for k, v in tensors.items()} }."
            )
        self.weight, self.bias = tensors["weight"].float(), tensors["bias"].float()
        if self.bias.shape[0] != self.weight.shape[0]:
            raise ValueError(f"{path}: weight has {self.weight.shape[0]} classes but bias {self.bias.shape[0]}.")
        self.backbone = load_image_model(backbone, device)
        self.num_classes, self.name = self.weight.shape[0], f"linear head {path.name} on {backbone}"
        self.description = {"extractor": self.name, **self.backbone.describe()}

    def check_classes(self, num_classes: int) -> None:
        if self.num_classes < num_classes:
            raise ValueError(f"{self.name} scores {self.num_classes} classes; the generator has {num_classes}.")

    def __call__(self, images: np.ndarray, class_labels: torch.LongTensor) -> torch.Tensor:
        features = self.backbone.features(images).float()
        if features.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"{self.name}: the head takes {self.weight.shape[1]} features, the backbone gives {features.shape[1]}."
            )
        return _log_softmax_at(features @ self.weight.T + self.bias, class_labels, self.name)


class SelfConsistencyVerifier:
    """Self-supervised: the cosine similarity between a backbone's features (or logits) of the final image and of
    its own preview at ``preview_scale`` (the image decoded from f̂ after that scale). No labels are used: an image
    that stays what its coarse scales announced scores high.

    Deterministic: the same images and previews give the same scores.
    """

    def __init__(self, backbone: str, preview_scale: int, use_logits: bool = False, device="cpu"):
        from ..evaluation.image_models import load_image_model

        if isinstance(preview_scale, bool) or not isinstance(preview_scale, int) or preview_scale < 0:
            raise ValueError(f"preview_scale must be a scale index ≥ 0, got {preview_scale!r}.")
        self.backbone = load_image_model(backbone, device)
        if use_logits and not self.backbone.has_logits:
            raise ValueError(f"{backbone} has no classification head; use_logits needs one.")
        self.preview_scale, self.use_logits = preview_scale, use_logits
        self.name = f"self-consistency at scale {preview_scale} ({backbone})"
        self.description = {"extractor": self.name, **self.backbone.describe()}

    def _embed(self, images: np.ndarray) -> torch.Tensor:
        return (self.backbone.logits(images) if self.use_logits else self.backbone.features(images)).float()

    def __call__(self, images: np.ndarray, class_labels: torch.LongTensor, previews: np.ndarray | None = None):
        if previews is None or len(previews) != len(images):
            raise ValueError(f"{self.name} scores an image against its preview: pass previews=, one per image.")
        return torch.nn.functional.cosine_similarity(self._embed(images), self._embed(previews), dim=-1)


class WeightedVerifier:
    """Σ weight · verifier(images, labels): e.g. a classifier plus a little self-consistency."""

    def __init__(self, verifiers: list[tuple[Verifier, float]]):
        if not verifiers:
            raise ValueError("WeightedVerifier needs at least one (verifier, weight) pair.")
        for verifier, weight in verifiers:
            if not callable(verifier) or not isinstance(weight, (int, float)) or not np.isfinite(weight):
                raise ValueError(f"Each entry is a (verifier, finite weight) pair, got ({verifier!r}, {weight!r}).")
        scales = {preview_scale_of(v) for v, _ in verifiers} - {None}
        if len(scales) > 1:
            raise ValueError(f"The verifiers need previews at different scales {sorted(scales)}; use one scale.")
        self.verifiers, self.preview_scale = verifiers, next(iter(scales), None)
        self.name = " + ".join(f"{w:g}·{getattr(v, 'name', type(v).__name__)}" for v, w in verifiers)
        self.description = {"extractor": self.name}

    def check_classes(self, num_classes: int) -> None:
        for verifier, _ in self.verifiers:
            if hasattr(verifier, "check_classes"):
                verifier.check_classes(num_classes)

    def __call__(self, images: np.ndarray, class_labels: torch.LongTensor, previews: np.ndarray | None = None):
        total = torch.zeros(len(images))
        for verifier, weight in self.verifiers:
            kwargs = {"previews": previews} if preview_scale_of(verifier) is not None else {}
            total += weight * torch.as_tensor(verifier(images, class_labels, **kwargs)).float().cpu()
        return total
