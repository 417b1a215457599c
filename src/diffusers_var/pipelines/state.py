"""The state of a batch of samples between two scales: what VARPipeline's loop steps, and what rejection, search and
editing branch, inspect or rewrite."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..models.kv_cache import VARKVCache


@dataclass
class VARSamplingState:
    """Where a batch of B samples stands after ``scale_index`` scales.

    Attributes:
        class_labels: (B,) the class of each sample (``num_classes``, the null class, for an unconditional one).
        model_labels: the transformer's rows: ``class_labels``, or ``[class_labels; null]`` (2B) with guidance.
        kv_cache: keys and values of every finished scale, for all rows of ``model_labels`` (``None`` once the
            loop is done and the cache freed).
        latents: f̂ so far, (B, Cvae, h, w): the sum of every finished scale's contribution, what the decoder turns
            into an image (a coarse one before the last scale).
        token_maps: the sampled codes, one (B, pn, pn) map per finished scale.
        finite: per finished scale, a 0-D bool tensor on the device, False if its logits held NaN or inf.
    """

    class_labels: torch.LongTensor
    model_labels: torch.LongTensor
    kv_cache: VARKVCache | None
    latents: torch.Tensor
    token_maps: list[torch.LongTensor] = field(default_factory=list)
    finite: list[torch.Tensor] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return self.class_labels.shape[0]

    @property
    def scale_index(self) -> int:
        """The next scale to sample (= the number of finished scales)."""
        return len(self.token_maps)

    @property
    def guided(self) -> bool:
        """Whether the transformer runs an unconditional row beside each sample (needed for guidance)."""
        return self.model_labels.shape[0] == 2 * self.batch_size

    def clone(self) -> VARSamplingState:
        """An independent copy, the KV cache included, to continue one partial sample along several branches."""
        return VARSamplingState(
            class_labels=self.class_labels.clone(),
            model_labels=self.model_labels.clone(),
            kv_cache=None if self.kv_cache is None else self.kv_cache.clone(),
            latents=self.latents.clone(),
            token_maps=[t.clone() for t in self.token_maps],
            finite=list(self.finite),
        )
