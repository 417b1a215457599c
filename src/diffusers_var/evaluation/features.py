"""Image features from a pretrained vision backbone on disk, for Fréchet distances and feature discriminators.

FD-DINOv2 (Stein et al., 2023) is the Fréchet distance in DINOv2's CLS-token space; it ranks generators closer to
human judgement than Inception FID. Any transformers vision model folder works; the report should name it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_vision_backbone(path: str | Path) -> nn.Module:
    """A transformers vision model (ViT, DINO, DINOv2, …) from a local folder, or a clear error."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{str(path)!r} is not a transformers model folder (no config.json). Save one with "
            "`AutoModel.from_pretrained('facebook/dinov2-small').save_pretrained(path)` on a machine with Hub access."
        )
    from transformers import AutoModel

    return AutoModel.from_pretrained(path).eval()


def backbone_pixel_values(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Images in [-1, 1] → the ``pixel_values`` an ImageNet-normalised backbone takes, resized to its input size."""
    pixels = F.interpolate((images.float() + 1) / 2, size=image_size, mode="bicubic", align_corners=False)
    mean, std = pixels.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1), pixels.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels.clamp(0, 1) - mean) / std


class BackboneFeatures(nn.Module):
    """CLS-token features (B, D) of images in [-1, 1], resized to the backbone's input size.

    Example:
        ```py
        >>> features = BackboneFeatures.from_pretrained("path/to/dinov2-small")
        >>> real = features(images)  # (B, 384) for DINOv2-S
        ```
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        size = backbone.config.image_size
        self.image_size = int(size if isinstance(size, int) else size[0])
        self.backbone = backbone.requires_grad_(False).eval()

    @classmethod
    def from_pretrained(cls, path: str | Path) -> BackboneFeatures:
        return cls(load_vision_backbone(path))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(pixel_values=backbone_pixel_values(images, self.image_size)).last_hidden_state
        return hidden[:, 0]
