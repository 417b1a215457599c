"""VARKVCache: the keys and values of every finished scale, kept while a batch is sampled one scale at a time."""

from __future__ import annotations

import torch

from .transformer_config import VARConfig


class VARKVCache:
    """Keys and values of every block, preallocated for all L positions of a sample.

    Each scale writes its pn² new keys and values in place; attention then reads the filled prefix. Nothing is
    concatenated or reallocated while sampling.

    A retrieval model (``num_neighbours > 0``) also keeps the keys and values of the retrieved neighbours
    (``neighbours``, read by every block): computed once at the first scale, read by every later one.
    """

    def __init__(
        self,
        config: VARConfig,
        batch_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        head_dim = config.embed_dim // config.num_heads
        num_tokens = sum(p * p for p in config.patch_nums)
        shape = (batch_size, config.num_heads, num_tokens, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.depth)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.depth)]
        self.length = 0
        # (keys, values) of the neighbours, and the (B,) rows that use them; None: no retrieval
        self.neighbours: list[torch.Tensor] | None = None
        self.neighbour_mask: torch.Tensor | None = None

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a scale's (B, H, l, d) keys and values after the filled prefix; return the prefix including them."""
        end = self.length + key.shape[2]
        self.keys[layer_idx][:, :, self.length : end] = key
        self.values[layer_idx][:, :, self.length : end] = value
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        """Mark a scale's tokens as filled once every block has written them."""
        self.length += num_tokens

    def clone(self) -> VARKVCache:
        """An independent copy (the whole preallocated buffers), e.g. to branch one partial sample into several."""
        copy = object.__new__(VARKVCache)
        copy.keys = [k.clone() for k in self.keys]
        copy.values = [v.clone() for v in self.values]
        copy.length = self.length
        copy.neighbours = None if self.neighbours is None else [t.clone() for t in self.neighbours]
        copy.neighbour_mask = None if self.neighbour_mask is None else self.neighbour_mask.clone()
        return copy

    def select(self, index: torch.LongTensor) -> VARKVCache:
        """A new cache holding only the rows ``index`` (of the batch dimension), e.g. to keep the best branches."""
        copy = object.__new__(VARKVCache)
        copy.keys = [k.index_select(0, index) for k in self.keys]
        copy.values = [v.index_select(0, index) for v in self.values]
        copy.length = self.length
        copy.neighbours = None if self.neighbours is None else [t.index_select(0, index) for t in self.neighbours]
        copy.neighbour_mask = None if self.neighbour_mask is None else self.neighbour_mask.index_select(0, index)
        return copy
