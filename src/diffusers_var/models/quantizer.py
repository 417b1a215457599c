"""The multi-scale residual quantizer of VAR's tokenizer.

Shapes: B batch, C = ``z_channels`` (Cvae), h = w = ``patch_nums[-1]`` (the latent grid), S scales, V codes.
A feature map f (B, C, h, w) is explained coarse to fine: at scale ``si`` the residual is area-pooled to
(pn, pn), snapped to its nearest codes, and the codes' embeddings are brought back to (h, w) by bicubic upsampling
and a φ convolution before they are added to f̂ and taken from the residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def phi_index_per_scale(num_scales: int, num_phis: int) -> list[int]:
    """Which φ convolution serves each scale.

    Scale ``si`` sits at ``si / (S - 1)`` on [0, 1] and takes the φ whose tick is nearest. The arithmetic is kept in
    float64 and in this exact order because exact ties (e.g. K=4, S=3) are settled by rounding, and tokens depend on
    it.
    """
    k = num_phis
    if k == 4:
        ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k)
    else:
        ticks = np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
    denominator = max(num_scales - 1, 1)
    return [int(np.argmin(np.abs(ticks - si / denominator))) for si in range(num_scales)]


class ScaleResidualConv(nn.Module):
    """φ(h) = (1 - r)·h + r·conv3×3(h): a learned refinement of each upsampled token map."""

    def __init__(self, channels: int, ratio: float):
        super().__init__()
        self.ratio = abs(ratio)
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden * (1 - self.ratio) + self.conv(hidden) * self.ratio


@dataclass
class QuantizerOutput:
    """Training-time output of :class:`MultiScaleResidualQuantizer`.

    Attributes:
        quantized: f̂ with a straight-through gradient to the encoder, (B, C, h, w).
        loss: the VQ loss, mean over scales of β·‖sg(f̂) − f‖² + ‖f̂ − sg(f)‖².
        codebook_usage: fraction of the codebook hit in this batch, per scale, (S,).
        token_maps: the chosen codes, one (B, pn, pn) map per scale.
    """

    quantized: torch.Tensor
    loss: torch.Tensor
    codebook_usage: torch.Tensor
    token_maps: list[torch.LongTensor]


class MultiScaleResidualQuantizer(nn.Module):
    """Residual vector quantisation over a pyramid of scales, with φ convolutions.

    Args:
        vocab_size: number of codes V.
        z_channels: code dimension C (Cvae).
        patch_nums: side of each scale's token map, coarse to fine; the last one is the latent grid.
        beta: weight of the commitment term of the VQ loss.
        use_znorm: pick codes by cosine similarity instead of Euclidean distance.
        quant_resi: φ's residual ratio r; |r| ≤ 1e-6 means no φ.
        share_quant_resi: 0 for one φ per scale, 1 for one shared φ, K > 1 for K partially shared φ.
        default_qresi_counts: with ``share_quant_resi=0``, how many φ to make (0 means one per scale).
    """

    def __init__(
        self,
        vocab_size: int,
        z_channels: int,
        patch_nums: tuple[int, ...],
        beta: float = 0.25,
        use_znorm: bool = False,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        default_qresi_counts: int = 0,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.z_channels = z_channels
        self.patch_nums = tuple(int(p) for p in patch_nums)
        self.beta = beta
        self.use_znorm = use_znorm
        self.embedding = nn.Embedding(vocab_size, z_channels)

        if share_quant_resi == 0:
            num_phis = default_qresi_counts or len(self.patch_nums)
        elif share_quant_resi == 1:
            num_phis = 1
        else:
            num_phis = share_quant_resi
        self.phis = nn.ModuleList(
            ScaleResidualConv(z_channels, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()
            for _ in range(num_phis)
        )
        self.phi_index = phi_index_per_scale(len(self.patch_nums), num_phis)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    # -- single steps of the pyramid -----------------------------------------------------------------------------

    def codebook(self, device: torch.device) -> torch.Tensor:
        """All V code vectors (V, C), read through the embedding's call, where offload and casting hooks place the
        weight (reading ``embedding.weight`` directly would find it on the meta device under sequential offload)."""
        return self.embedding(torch.arange(self.vocab_size, device=device))

    def nearest_codes(self, z: torch.Tensor) -> torch.LongTensor:
        """Index of the nearest code for each row of z (N, C)."""
        codebook = self.codebook(z.device).detach()
        if self.use_znorm:
            return torch.argmax(F.normalize(z, dim=-1) @ F.normalize(codebook, dim=-1).T, dim=1)
        squared = z.square().sum(dim=1, keepdim=True) + codebook.square().sum(dim=1)
        return torch.argmin(torch.addmm(squared, z, codebook.T, alpha=-2), dim=1)

    def embed(self, token_map: torch.LongTensor) -> torch.Tensor:
        """Codes (B, pn, pn) → embeddings (B, C, pn, pn)."""
        return self.embedding(token_map).permute(0, 3, 1, 2)

    def embed_soft(self, weights: torch.Tensor, side: int) -> torch.Tensor:
        """A convex mix of codes, weights (B, pn², V) → (B, C, pn, pn); used by Gumbel smoothing."""
        mixed = weights @ self.codebook(weights.device).unsqueeze(0)
        return mixed.transpose(1, 2).reshape(weights.shape[0], self.z_channels, side, side)

    def scale_contribution(self, embedded: torch.Tensor, scale_index: int) -> torch.Tensor:
        """What scale ``scale_index`` adds to f̂: φ(bicubic-up(h)); the last scale is already full size."""
        side = self.patch_nums[-1]
        if scale_index != self.num_scales - 1:
            embedded = F.interpolate(embedded, size=(side, side), mode="bicubic")
        return self.phis[self.phi_index[scale_index]](embedded)

    def downsample(self, features: torch.Tensor, scale_index: int) -> torch.Tensor:
        """Area-pool a full-size map to scale ``scale_index`` (also for non-integer ratios such as 5 → 3)."""
        side = self.patch_nums[scale_index]
        return F.interpolate(features, size=(side, side), mode="area")

    # -- whole pyramids --------------------------------------------------------------------------------------------

    def _quantize_scale(self, residual: torch.Tensor, scale_index: int) -> torch.LongTensor:
        batch, channels = residual.shape[:2]
        side = self.patch_nums[scale_index]
        if scale_index != self.num_scales - 1:
            residual = self.downsample(residual, scale_index)
        codes = self.nearest_codes(residual.permute(0, 2, 3, 1).reshape(-1, channels))
        return codes.view(batch, side, side)

    @torch.no_grad()
    def quantize(self, features: torch.Tensor) -> tuple[list[torch.LongTensor], list[torch.Tensor]]:
        """Features (B, C, h, w) → (token maps per scale, cumulative f̂ after each scale)."""
        residual = features.detach().clone()
        f_hat = torch.zeros_like(residual)
        token_maps, f_hats = [], []
        for si in range(self.num_scales):
            token_map = self._quantize_scale(residual, si)
            contribution = self.scale_contribution(self.embed(token_map), si)
            f_hat.add_(contribution)
            residual.sub_(contribution)
            token_maps.append(token_map)
            f_hats.append(f_hat.clone())
        return token_maps, f_hats

    def token_maps_to_fhat(self, token_maps: list[torch.LongTensor]) -> torch.Tensor:
        """Sum every scale's contribution: the f̂ that the decoder turns into an image."""
        f_hat = None
        for si, token_map in enumerate(token_maps):
            contribution = self.scale_contribution(self.embed(token_map), si)
            f_hat = contribution if f_hat is None else f_hat + contribution
        return f_hat

    def next_scale_inputs(self, token_maps: list[torch.LongTensor]) -> torch.Tensor:
        """Teacher-forcing input (B, L − first_l, C): f̂ after scale si, area-pooled to scale si + 1."""
        f_hat = None
        inputs = []
        for si in range(self.num_scales - 1):
            contribution = self.scale_contribution(self.embed(token_maps[si]), si)
            f_hat = contribution if f_hat is None else f_hat + contribution
            inputs.append(self.downsample(f_hat, si + 1).flatten(2).transpose(1, 2))
        return torch.cat(inputs, dim=1)

    def forward(self, features: torch.Tensor) -> QuantizerOutput:
        """Training pass: quantise, build the VQ loss, and pass gradients straight through to the encoder."""
        features = features.float()
        target = features.detach()
        residual = target.clone()
        f_hat = torch.zeros_like(target)
        loss = features.new_zeros(())
        token_maps, usage = [], []
        for si in range(self.num_scales):
            token_map = self._quantize_scale(residual, si)
            contribution = self.scale_contribution(self.embed(token_map), si)
            f_hat = f_hat + contribution
            residual = residual - contribution.detach()
            # commitment pulls the encoder to f̂; the codebook term pulls codes and φ to the encoder's output
            loss = loss + self.beta * F.mse_loss(f_hat.detach(), features) + F.mse_loss(f_hat, target)
            token_maps.append(token_map)
            usage.append(torch.bincount(token_map.flatten(), minlength=self.vocab_size).gt(0).float().mean())
        quantized = (f_hat.detach() - target) + features
        return QuantizerOutput(quantized, loss / self.num_scales, torch.stack(usage), token_maps)
