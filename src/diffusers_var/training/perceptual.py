"""LPIPS (Zhang et al. 2018), the perceptual loss of VQGAN-style tokenizers, loaded from weights on disk.

The file is a state dict in the layout of the ``lpips`` package's ``LPIPS(net="vgg")`` (VGG-16 features as
``net.slice1.0.weight`` …, the learned linear heads as ``lin0.model.1.weight`` …), saved with ``torch.save`` or as
safetensors. Nothing is downloaded: without the file the loss cannot be built.

    >>> import lpips, torch  # on a machine with the weights
    >>> torch.save(lpips.LPIPS(net="vgg").state_dict(), "lpips_vgg.pth")
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

# VGG-16 "features": (index in torchvision's Sequential, output channels) of each conv, grouped by LPIPS slice.
# Slices end at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3.
_SLICES = (
    ((0, 64), (2, 64)),
    ((5, 128), (7, 128)),
    ((10, 256), (12, 256), (14, 256)),
    ((17, 512), (19, 512), (21, 512)),
    ((24, 512), (26, 512), (28, 512)),
)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file (read with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Weights file {str(path)!r} does not exist.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated or foreign files raise many types
        raise ValueError(f"Cannot read weights from {str(path)!r}: {error}") from error


class LPIPS(nn.Module):
    """Learned perceptual distance between images in [-1, 1]; returns one value per image, (B,).

    Example:
        ```py
        >>> loss_fn = LPIPS.from_file("lpips_vgg.pth").eval()
        >>> distance = loss_fn(reconstruction, images).mean()
        ```
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        slices, in_channels, index = [], 3, 0
        for group in _SLICES:
            layers = OrderedDict()
            if index:  # every slice after the first starts with the pooling that ended the previous block
                layers[str(index)] = nn.MaxPool2d(2, 2)
            for conv_index, out_channels in group:
                layers[str(conv_index)] = nn.Conv2d(in_channels, out_channels, 3, padding=1)
                layers[str(conv_index + 1)] = nn.ReLU(inplace=False)
                in_channels, index = out_channels, conv_index + 2
            slices.append(nn.Sequential(layers))
        self.net = nn.ModuleDict({f"slice{i + 1}": s for i, s in enumerate(slices)})
        self.lins = nn.ModuleList(
            nn.Sequential(OrderedDict(model=nn.Sequential(nn.Dropout(), nn.Conv2d(group[-1][1], 1, 1, bias=False))))
            for group in _SLICES
        )
        self.requires_grad_(False)

    @classmethod
    def from_file(cls, path: str | Path) -> LPIPS:
        """Build from an ``lpips``-layout state dict; names any missing or unexpected keys."""
        state = load_state_dict_file(path)
        state = {k: v for k, v in state.items() if not k.startswith("scaling_layer.")}  # constants, defined here
        state = {(f"lins.{k[3]}.{k[5:]}" if k.startswith("lin") else k): v for k, v in state.items()}
        model = cls()
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{str(path)!r} is not an LPIPS-VGG state dict (lpips package layout): missing {missing[:4]}, "
                f"unexpected {unexpected[:4]}."
            )
        return model

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x, y = (images - self.shift) / self.scale, (targets - self.shift) / self.scale
        distance = images.new_zeros(images.shape[0])
        for block, lin in zip(self.net.values(), self.lins):
            x, y = block(x), block(y)
            # unit-normalise each position's channel vector, as LPIPS does, before the learned weighting
            nx = x / (x.square().sum(1, keepdim=True).sqrt() + 1e-10)
            ny = y / (y.square().sum(1, keepdim=True).sqrt() + 1e-10)
            distance = distance + lin((nx - ny).square()).mean(dim=(1, 2, 3))
        return distance
