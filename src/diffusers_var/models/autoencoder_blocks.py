"""Convolutional encoder and decoder of VAR's tokenizer (the VQGAN f16 design).

Both are a stack of resolution levels with ``num_res_blocks`` residual blocks each, self-attention after every block
of the lowest-resolution level and in the middle, and GroupNorm + SiLU throughout. Images are (B, 3, H, W); latents
are (B, z_channels, H / 2^(levels − 1), W / 2^(levels − 1)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float, num_groups: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place SiLU and residual add: at 256 px each activation is hundreds of MB per batch. Both are safe for
        # autograd (GroupNorm and conv backward need their inputs, not their outputs).
        hidden = self.conv1(F.silu(self.norm1(x), inplace=True))
        hidden = self.conv2(self.dropout(F.silu(self.norm2(hidden), inplace=True)))
        return hidden.add_(self.conv_shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H·W positions of a feature map, with a residual connection."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.norm = _group_norm(channels, num_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(batch, 3, channels, height * width)
        query, key, value = qkv.transpose(-1, -2).unsqueeze(2).unbind(1)  # each (B, 1, HW, C)
        attended = F.scaled_dot_product_attention(query, key, value)
        attended = attended.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(attended)


class Downsample(nn.Module):
    """Stride-2 conv after padding one pixel on the right and bottom only (an asymmetric 'same')."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, dropout: float, num_groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, dropout, num_groups) for _ in range(2)])
        self.attention = AttentionBlock(channels, num_groups) if attention else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attention(self.resnets[0](x)))


class ResolutionLevel(nn.Module):
    """``num_blocks`` residual blocks (each followed by attention when asked), then an optional resampler."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        dropout: float,
        num_groups: int,
        attention: bool,
        resample: nn.Module | None,
    ):
        super().__init__()
        channels = [in_channels] + [out_channels] * num_blocks
        self.resnets = nn.ModuleList(
            ResnetBlock(channels[i], channels[i + 1], dropout, num_groups) for i in range(num_blocks)
        )
        self.attentions = nn.ModuleList(
            AttentionBlock(out_channels, num_groups) for _ in range(num_blocks if attention else 0)
        )
        self.resample = resample

    def layers(self) -> list[nn.Module]:
        """The modules in the order they run. Callers loop over these rather than calling the level, so that no
        frame keeps the level's input alive while it runs (one full-resolution activation at 256 px)."""
        order = []
        for i, resnet in enumerate(self.resnets):
            order += [resnet, self.attentions[i]] if self.attentions else [resnet]
        return order + ([self.resample] if self.resample is not None else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers():
            x = layer(x)
        return x


def _layer_runner(module: nn.Module):
    """``layer(x)``, or under activation checkpointing (training only) the same call recomputed in backward."""
    if getattr(module, "gradient_checkpointing", False) and torch.is_grad_enabled():
        return module._gradient_checkpointing_func
    return lambda layer, hidden: layer(hidden)


class Encoder(nn.Module):
    def __init__(
        self,
        in_channels: int,
        z_channels: int,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        dropout: float,
        norm_num_groups: int,
        mid_attention: bool,
        lowest_level_attention: bool,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)
        levels = []
        block_in = ch
        for level, mult in enumerate(ch_mult):
            lowest = level == len(ch_mult) - 1
            block_out = ch * mult
            levels.append(
                ResolutionLevel(
                    block_in,
                    block_out,
                    num_res_blocks,
                    dropout,
                    norm_num_groups,
                    attention=lowest and lowest_level_attention,
                    resample=None if lowest else Downsample(block_out),
                )
            )
            block_in = block_out
        self.down_blocks = nn.ModuleList(levels)
        self.mid_block = MidBlock(block_in, dropout, norm_num_groups, mid_attention)
        self.norm_out = _group_norm(block_in, norm_num_groups)
        self.conv_out = nn.Conv2d(block_in, z_channels, kernel_size=3, padding=1)
        self.gradient_checkpointing = False  # set by ModelMixin.enable_gradient_checkpointing

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        run = _layer_runner(self)
        hidden = self.conv_in(images)
        for level in self.down_blocks:
            for layer in level.layers():
                hidden = run(layer, hidden)
        hidden = run(self.mid_block, hidden)
        return self.conv_out(F.silu(self.norm_out(hidden), inplace=True))


class Decoder(nn.Module):
    """Mirror of :class:`Encoder`. ``up_blocks`` are stored in the order they run: lowest resolution first."""

    def __init__(
        self,
        out_channels: int,
        z_channels: int,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        dropout: float,
        norm_num_groups: int,
        mid_attention: bool,
        lowest_level_attention: bool,
    ):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, padding=1)
        self.mid_block = MidBlock(block_in, dropout, norm_num_groups, mid_attention)
        levels = []
        for level in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[level]
            levels.append(
                ResolutionLevel(
                    block_in,
                    block_out,
                    num_res_blocks + 1,
                    dropout,
                    norm_num_groups,
                    attention=level == len(ch_mult) - 1 and lowest_level_attention,
                    resample=Upsample(block_out) if level != 0 else None,
                )
            )
            block_in = block_out
        self.up_blocks = nn.ModuleList(levels)
        self.norm_out = _group_norm(block_in, norm_num_groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, padding=1)
        self.gradient_checkpointing = False  # set by ModelMixin.enable_gradient_checkpointing

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        # Channels-last activations: oneDNN's convolutions run about a quarter faster on them on CPU (tensor cores
        # prefer them on GPU). Only the decoder: its output is an image within 2e-5 of NCHW; the encoder's output
        # picks codes, where a last-bit difference could flip a tie.
        latents = latents.contiguous(memory_format=torch.channels_last)
        run = _layer_runner(self)
        hidden = run(self.mid_block, self.conv_in(latents))
        for level in self.up_blocks:
            for layer in level.layers():
                hidden = run(layer, hidden)
        return self.conv_out(F.silu(self.norm_out(hidden), inplace=True)).contiguous()
