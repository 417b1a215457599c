"""Image models that evaluation and rejection sampling take: features (for FID, KID, precision/recall) and class
log-probabilities (for the Inception Score and for rejecting samples), from a spec a user writes once:

- a transformers image model: a folder, a Hub repo id (from the cache, or downloaded), or a bundled name such as
  ``digits-classifier``. Images go through the folder's own ``AutoImageProcessor`` when it has one, and nothing
  else resizes or rescales them. Features are ``pooler_output`` when the model returns one, else the CLS token
  (``last_hidden_state[:, 0]``); a ``*ForImageClassification`` model also gives log-probabilities.
- ``inception=PATH``: the FID Inception network (torchmetrics / torch-fidelity's ``inception-v3-compat``) with the
  weights file at PATH (``pt_inception-2015-12-05-6726825d.pth``, downloaded once elsewhere; nothing is downloaded
  here): 2048-d pool features and the 1008 logits the Inception Score uses. It needs ``torch-fidelity``.

Every model records what it is (``describe()``): the spec, a SHA-256 of its weights, its input size and how images
were resized, for the metrics JSON.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from ..pretrained import BUNDLED_MODELS, bundled_model_path


def resolve_model_folder(spec: str | os.PathLike, **hub_kwargs) -> Path:
    """A bundled name, a local folder, or a Hub repo id (the HF cache, online or offline) → its local folder."""
    name = os.fspath(spec)
    if name in BUNDLED_MODELS and not os.path.exists(name):
        return bundled_model_path(name)
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ValueError(f"{name!r} is a folder without config.json, not a transformers model.")
        return Path(name)
    if os.path.exists(name):
        raise ValueError(f"{name!r} is a file; give a transformers model folder, a repo id, or inception=PATH.")
    from ..hub import download_snapshot

    try:
        return Path(download_snapshot(name, **hub_kwargs))
    except Exception as error:  # not a repo id, or not available offline
        raise ValueError(
            f"Cannot load the image model {name!r}: it is not a bundled name ({sorted(BUNDLED_MODELS)}), a folder, "
            f"or an available Hub repo ({type(error).__name__}: {error})."
        ) from error


def _weights_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


class ImageModel:
    """A feature network (and maybe classifier) applied to uint8 images (N, H, W, 3)."""

    name: str
    has_logits: bool

    def features(self, images: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def log_probs(self, images: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, images: np.ndarray) -> torch.Tensor:
        return self.log_probs(images)

    def describe(self) -> dict:
        raise NotImplementedError


class TransformersImageModel(ImageModel):
    """A transformers vision model folder; see the module docstring for what it computes."""

    def __init__(self, spec: str, folder: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

        config = AutoConfig.from_pretrained(folder)
        self.has_logits = any(a.endswith("ForImageClassification") for a in config.architectures or [])
        loader = AutoModelForImageClassification if self.has_logits else AutoModel
        self.model = loader.from_pretrained(folder, dtype=dtype).to(device).eval()
        self.backbone = self.model.base_model if self.has_logits else self.model
        self.processor = None
        if (folder / "preprocessor_config.json").is_file():
            from transformers import AutoImageProcessor

            self.processor = AutoImageProcessor.from_pretrained(folder)
        self.name, self.folder, self.device, self.dtype = spec, folder, torch.device(device), dtype

    def _pixel_values(self, images: np.ndarray) -> torch.Tensor:
        if self.processor is not None:
            pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        else:  # no processor: [0, 1] with ImageNet statistics, at the images' own size
            from .features import IMAGENET_MEAN, IMAGENET_STD

            pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
            pixels = (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
                1, 3, 1, 1
            )
        return pixels.to(self.device, self.dtype)

    @torch.no_grad()
    def features(self, images: np.ndarray) -> torch.Tensor:
        out = self.backbone(pixel_values=self._pixel_values(images))
        pooled = getattr(out, "pooler_output", None)
        features = pooled if pooled is not None else out.last_hidden_state[:, 0]
        return features.flatten(1).float().cpu()

    @torch.no_grad()
    def log_probs(self, images: np.ndarray) -> torch.Tensor:
        if not self.has_logits:
            raise ValueError(f"{self.name} has no classification head (it is a {type(self.model).__name__}).")
        return self.model(pixel_values=self._pixel_values(images)).logits.float().log_softmax(-1).cpu()

    def describe(self) -> dict:
        return {
            "extractor": self.name,
            "class": type(self.model).__name__,
            "weights_sha256": _weights_digest(
                list(self.folder.glob("*.safetensors")) or list(self.folder.glob("*.bin"))
            ),
            "resize": _describe_resize(self.processor),
            "dtype": str(self.dtype).replace("torch.", ""),
        }


_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _describe_resize(processor) -> str:
    """What an image processor does to an image's size, in words: ``"ViTImageProcessorPil: bilinear to 32×32"``."""
    if processor is None:
        return "none (images at their own size, ImageNet-normalised)"
    name = type(processor).__name__
    size = getattr(processor, "size", None)
    if not getattr(processor, "do_resize", True) or size is None:
        return f"{name}: no resizing"
    size = {key: value for key, value in dict(vars(size) if hasattr(size, "__dict__") else size).items() if value}
    if "height" in size and "width" in size:
        target = f"{size['height']}×{size['width']}"
    else:
        target = ", ".join(f"{key} {value}" for key, value in size.items())
    resample = getattr(processor, "resample", None)
    resample = _RESAMPLE_NAMES.get(int(resample), str(resample)) if resample is not None else "default filter"
    described = f"{name}: {resample} to {target}"
    crop = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False) and crop is not None:
        crop = {key: value for key, value in dict(vars(crop) if hasattr(crop, "__dict__") else crop).items() if value}
        described += f", centre crop {crop.get('height')}×{crop.get('width')}"
    return described


class InceptionImageModel(ImageModel):
    """The FID Inception network of torch-fidelity, from a weights file on disk (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        path = Path(path)
        if not path.is_file():
            raise ValueError(
                f"inception={path}: no such weights file. Download pt_inception-2015-12-05-6726825d.pth once (the FID "
                "Inception weights torch-fidelity uses) and pass its path."
            )
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as error:
            raise ImportError("--features inception=PATH needs torchmetrics: pip install torchmetrics") from error
        try:
            self.network = NoTrainInceptionV3(
                name="inception-v3-compat", features_list=["2048", "logits_unbiased"],
                feature_extractor_weights_path=str(path),
            )  # fmt: skip
        except ModuleNotFoundError as error:
            raise ImportError(
                "--features inception=PATH needs torch-fidelity (the FID Inception code): pip install torch-fidelity"
            ) from error
        self.network = self.network.to(device).eval()
        self.name, self.path, self.device, self.has_logits = f"inception={path}", path, torch.device(device), True

    @torch.no_grad()
    def _run(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(self.device)
        features, logits = self.network(pixels)  # uint8 in; resized to 299 inside, as TensorFlow's FID code did
        return features.double().cpu(), logits.double().cpu()

    def features(self, images: np.ndarray) -> torch.Tensor:
        return self._run(images)[0]

    def log_probs(self, images: np.ndarray) -> torch.Tensor:
        return self._run(images)[1].log_softmax(-1)

    def describe(self) -> dict:
        return {
            "extractor": "FID Inception (torch-fidelity inception-v3-compat)",
            "class": "NoTrainInceptionV3",
            "weights_sha256": _weights_digest([self.path]),
            "resize": "bilinear to 299×299 inside the network (TensorFlow 1.x compatible)",
            "dtype": "float32",
        }


def load_image_model(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> ImageModel:
    """The :class:`ImageModel` a spec names (see the module docstring)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"An image model spec is a folder, a repo id, a bundled name or inception=PATH, got {spec!r}.")
    if spec.startswith("inception="):
        return InceptionImageModel(spec.split("=", 1)[1], device)
    return TransformersImageModel(spec, resolve_model_folder(spec), device, dtype)
