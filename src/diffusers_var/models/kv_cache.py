"""VARKVCache: the keys and values of every finished scale, kept while a batch is sampled one scale at a time."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .transformer_config import VARConfig


@dataclass
class VARNeighbours:
    """A retrieval model's encoded neighbours: per scale, keys and values (B, H, k·pn², d) that the positions of that
    scale attend to, and the (B,) rows that use them (the others get nothing from them)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    row_mask: torch.BoolTensor

    def map(self, function) -> VARNeighbours:
        """The same neighbours with ``function`` applied to every tensor (copy, row selection)."""
        return VARNeighbours(
            [function(t) for t in self.keys], [function(t) for t in self.values], function(self.row_mask)
        )


class VARKVCache:
    """Keys and values of every block, preallocated for all L positions of a sample.

    Each scale writes its pn² new keys and values in place; attention then reads the filled prefix. Nothing is
    concatenated or reallocated while sampling.

    A retrieval model (``num_neighbours > 0``) also keeps the keys and values of the retrieved neighbours
    (``neighbours``, read by every block): computed once at the first scale, read by every later one.

    The AdaLN projections of the class condition (``modulations``: one entry per block, the shared one and the
    head's) depend on the class labels alone, so they are computed at the first scale and reused: the official
    sampler recomputes them at every scale, reading each block's 6·C × C projection ten times for nothing (d16 at
    batch 1 on two CPU cores: about 0.4 s of a 10 s call). They stay valid while the transformer is called with the
    same ``class_labels`` tensor, unchanged (:meth:`modulations_for`).
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
        self.neighbours: VARNeighbours | None = None  # None: no retrieval
        self.modulations: dict = {}
        self._modulation_labels: torch.Tensor | None = None
        self._modulation_labels_version = -1

    def modulations_for(self, class_labels: torch.Tensor) -> dict:
        """The cached AdaLN projections for ``class_labels``: emptied unless these labels are the very tensor they
        were computed for, unchanged since. Identity and the tensor's version counter decide without reading its
        values (no device synchronisation); the cache holds a reference, so the identity cannot be recycled."""
        if class_labels is not self._modulation_labels or class_labels._version != self._modulation_labels_version:
            self.modulations = {}
            self._modulation_labels, self._modulation_labels_version = class_labels, class_labels._version
        return self.modulations

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
        copy.neighbours = None if self.neighbours is None else self.neighbours.map(torch.clone)
        copy.modulations, copy._modulation_labels, copy._modulation_labels_version = {}, None, -1  # recomputed
        return copy

    def select(self, index: torch.LongTensor) -> VARKVCache:
        """A new cache holding only the rows ``index`` (of the batch dimension), e.g. to keep the best branches."""
        copy = object.__new__(VARKVCache)
        copy.keys = [k.index_select(0, index) for k in self.keys]
        copy.values = [v.index_select(0, index) for v in self.values]
        copy.length = self.length
        copy.neighbours = None if self.neighbours is None else self.neighbours.map(lambda t: t.index_select(0, index))
        copy.modulations, copy._modulation_labels, copy._modulation_labels_version = {}, None, -1  # recomputed
        return copy
