"""VARKVCache: the keys and values of every finished scale, kept while a batch is sampled one scale at a time."""

from __future__ import annotations

from collections.abc import Callable
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


class VARLayerCache:
    """One block's part of a :class:`VARKVCache`: its preallocated key and value buffers (B, H, L, d) and its AdaLN
    projection of the class (``modulation``, ``None`` until the first scale computes it).

    A block reads only this object, never its own layer number: with the cache handed over per layer, every block
    runs the same code on the same shapes, so ``torch.compile`` builds one graph per scale that all blocks share
    (looking a buffer up by layer number made dynamo specialise each block: depth × scales graphs). It keeps its own
    copy of the filled ``length`` rather than a link to the whole cache, so that dropping a cache frees its buffers
    at once (a reference cycle would keep them until Python's next full garbage collection).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int = 0):
        self.keys = keys
        self.values = values
        self.length = length
        self.modulation: torch.Tensor | None = None

    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a scale's (B, H, l, d) keys and values after the filled prefix; return the prefix including them."""
        begin = self.length
        end = begin + key.shape[2]
        self.keys[:, :, begin:end] = key
        self.values[:, :, begin:end] = value
        return self.keys[:, :, :end], self.values[:, :, :end]


class VARKVCache:
    """Keys and values of every block, preallocated for all L positions of a sample.

    Each scale writes its pn² new keys and values in place; attention then reads the filled prefix. Nothing is
    concatenated or reallocated while sampling. ``layers[i]`` is block i's part (:class:`VARLayerCache`); ``keys``
    and ``values`` list the layers' buffers (read-only: the buffers themselves are written in place).

    A retrieval model (``num_neighbours > 0``) also keeps the keys and values of the retrieved neighbours
    (``neighbours``, read by every block): computed once at the first scale, read by every later one.

    The AdaLN projections of the class condition (each layer's ``modulation``, and in ``modulations`` the shared
    one and the head's) depend on the class labels alone, so they are computed at the first scale and reused: the
    official sampler recomputes them at every scale, reading each block's 6·C × C projection ten times for nothing
    (d16 at batch 1 on two CPU cores: about 0.4 s of a 10 s call). They stay valid while the transformer is called
    with the same ``class_labels`` tensor, unchanged (:meth:`modulations_for`).
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
        buffers = [
            (torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
            for _ in range(config.depth)
        ]
        self._set_buffers(buffers, length=0, neighbours=None)

    def _set_buffers(
        self, buffers: list[tuple[torch.Tensor, torch.Tensor]], length: int, neighbours: VARNeighbours | None
    ) -> None:
        self.layers = [VARLayerCache(keys, values, length) for keys, values in buffers]
        self.neighbours = neighbours  # None: no retrieval
        self.modulations: dict[str, torch.Tensor] = {}  # the shared AdaLN projection and the head's
        self._modulation_labels: torch.Tensor | None = None
        self._modulation_labels_version = -1

    @property
    def length(self) -> int:
        """The number of filled positions (every finished scale's tokens)."""
        return self.layers[0].length

    @property
    def keys(self) -> list[torch.Tensor]:
        """Every block's key buffer (B, H, L, d); the first ``length`` positions are filled."""
        return [layer.keys for layer in self.layers]

    @property
    def values(self) -> list[torch.Tensor]:
        """Every block's value buffer (B, H, L, d); the first ``length`` positions are filled."""
        return [layer.values for layer in self.layers]

    def modulations_for(self, class_labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The cached AdaLN projections for ``class_labels``: emptied (with every layer's) unless these labels are
        the very tensor they were computed for, unchanged since. Identity and the tensor's version counter decide
        without reading its values (no device synchronisation); the cache holds a reference, so the identity
        cannot be recycled."""
        if class_labels is not self._modulation_labels or class_labels._version != self._modulation_labels_version:
            self.modulations = {}
            for layer in self.layers:
                layer.modulation = None
            self._modulation_labels, self._modulation_labels_version = class_labels, class_labels._version
        return self.modulations

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``layer_idx``'s :meth:`VARLayerCache.update`."""
        return self.layers[layer_idx].update(key, value)

    def advance(self, num_tokens: int) -> None:
        """Mark a scale's tokens as filled once every block has written them."""
        for layer in self.layers:
            layer.length += num_tokens

    def _copy(self, function: Callable[[torch.Tensor], torch.Tensor]) -> VARKVCache:
        """A new cache of ``function`` applied to every buffer (and the neighbours); projections are recomputed."""
        copy = object.__new__(VARKVCache)
        buffers = [(function(layer.keys), function(layer.values)) for layer in self.layers]
        neighbours = None if self.neighbours is None else self.neighbours.map(function)
        copy._set_buffers(buffers, self.length, neighbours)  # the AdaLN projections are recomputed
        return copy

    def clone(self) -> VARKVCache:
        """An independent copy (the whole preallocated buffers), e.g. to branch one partial sample into several."""
        return self._copy(torch.clone)

    def select(self, index: torch.LongTensor) -> VARKVCache:
        """A new cache holding only the rows ``index`` (of the batch dimension), e.g. to keep the best branches."""
        return self._copy(lambda t: t.index_select(0, index))
