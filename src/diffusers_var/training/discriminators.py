"""Adversarial losses for tokenizer training: a patch discriminator, and a DINO-feature discriminator as in the
VAR tokenizer recipe, with the hinge loss.

Both use batch-independent normalisation (GroupNorm, spectral norm), so a batch split over processes gives the same
result as one process with the whole batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from ..evaluation.features import backbone_pixel_values, load_vision_backbone


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


class PatchDiscriminator(nn.Module):
    """A PatchGAN (pix2pix) discriminator: one real/fake logit per overlapping patch, trained from scratch.

    Args:
        in_channels: image channels.
        channels: width of the first layer; it doubles per layer up to 8×.
        num_layers: strided layers; more layers see larger patches.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, num_layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < num_layers else 1
            groups = min(32, out // 4)
            layers += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.GroupNorm(groups, out), nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.layers = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


class _FeatureHead(nn.Module):
    """Per-token logits from one backbone layer: a 1×1 projection, a residual 9-tap mixing over tokens, a logit."""

    def __init__(self, width: int, hidden: int = 128):
        super().__init__()
        self.project = spectral_norm(nn.Conv1d(width, hidden, 1))
        self.mix = spectral_norm(nn.Conv1d(hidden, hidden, 9, padding=4, padding_mode="circular"))
        self.logit = spectral_norm(nn.Conv1d(hidden, 1, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, N, D) → (B, N)
        hidden = F.leaky_relu(self.project(tokens.transpose(1, 2)), 0.2)
        hidden = hidden + F.leaky_relu(self.mix(hidden), 0.2)
        return self.logit(hidden).squeeze(1)


class DinoDiscriminator(nn.Module):
    """A frozen self-supervised ViT (DINO / DINOv2, a transformers folder on disk) with trainable heads on several
    of its layers; gradients flow through the frozen backbone to the images.

    Example:
        ```py
        >>> disc = DinoDiscriminator.from_pretrained("path/to/dinov2-small")
        >>> logits = disc(images)  # images in [-1, 1]
        ```
    """

    def __init__(self, backbone: nn.Module, layers: tuple[int, ...] | None = None, hidden: int = 128):
        super().__init__()
        config = backbone.config
        depth = config.num_hidden_layers
        self.layers = (
            tuple(layers) if layers else tuple(sorted({max(1, round(depth * f)) for f in (0.25, 0.5, 0.75, 1.0)}))
        )
        if any(not 1 <= layer <= depth for layer in self.layers):
            raise ValueError(f"Discriminator layers {self.layers} must lie in [1, {depth}] for this backbone.")
        self.image_size = int(config.image_size if isinstance(config.image_size, int) else config.image_size[0])
        self.backbone = backbone.requires_grad_(False).eval()
        self.heads = nn.ModuleList(_FeatureHead(config.hidden_size, hidden) for _ in self.layers)

    @classmethod
    def from_pretrained(cls, path: str | Path, layers: tuple[int, ...] | None = None) -> DinoDiscriminator:
        return cls(load_vision_backbone(path), layers)

    def train(self, mode: bool = True) -> DinoDiscriminator:
        super().train(mode)
        self.backbone.eval()  # frozen: its dropout and norms stay in inference mode
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixel_values = backbone_pixel_values(images, self.image_size)
        hidden_states = self.backbone(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        return torch.cat([head(hidden_states[layer]) for layer, head in zip(self.layers, self.heads)], dim=1)
