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
        generators: one ``torch.Generator`` per sample when the call was given one per image (``None`` otherwise):
            they follow the samples through :meth:`select`, so a kept sample goes on drawing from its own.
        forced_token_maps, forced_masks: for editing, per scale (B, pn, pn): tokens that replace the sampled ones
            where the mask is True (zero-shot in-painting keeps the input's tokens there). ``None``: sample all.
        neighbour_token_maps: training-free retrieval: per scale (B, k, pn, pn), the retrieved images' codes, whose
            distribution each scale's draw is mixed with (weights ``retrieval_weights``, one λ per scale, and
            spatial ``retrieval_smoothing``; ``retrieval_sharpness`` lets the neighbours that agree with the tokens so
            far count more). ``None``: no mixing.
        neighbour_codes, neighbour_mask: trained retrieval: the code embeddings (rows of ``model_labels``, k, L,
            Cvae) the transformer encodes at the first scale (then kept in the KV cache, and dropped here), and
            which model rows use them.
        retrieval_guided: the model rows end with a group that has the class but no neighbours, for guidance on
            retrieval (Re-Imagen); the groups are [conditional; null class (if guided); no neighbours].
    """

    class_labels: torch.LongTensor
    model_labels: torch.LongTensor
    kv_cache: VARKVCache | None
    latents: torch.Tensor
    token_maps: list[torch.LongTensor] = field(default_factory=list)
    finite: list[torch.Tensor] = field(default_factory=list)
    generators: list[torch.Generator] | None = None
    forced_token_maps: list[torch.LongTensor] | None = None
    forced_masks: list[torch.BoolTensor] | None = None
    neighbour_token_maps: list[torch.LongTensor] | None = None
    retrieval_weights: list[float] | None = None
    retrieval_smoothing: float = 0.0
    retrieval_sharpness: float = 0.0
    neighbour_codes: torch.Tensor | None = None
    neighbour_mask: torch.BoolTensor | None = None
    retrieval_guided: bool = False

    @property
    def batch_size(self) -> int:
        return self.class_labels.shape[0]

    @property
    def scale_index(self) -> int:
        """The next scale to sample (= the number of finished scales)."""
        return len(self.token_maps)

    @property
    def row_groups(self) -> int:
        """How many transformer rows each sample has: 1; 2 with guidance on the class or on retrieval; 3 with both."""
        return self.model_labels.shape[0] // max(self.batch_size, 1)

    @property
    def guided(self) -> bool:
        """Whether the transformer runs an unconditional row beside each sample (needed for guidance)."""
        return self.row_groups >= 2

    @property
    def class_guided(self) -> bool:
        """Whether there is a null-class row per sample (guidance on the class)."""
        return self.row_groups - int(self.retrieval_guided) >= 2

    def select(self, rows: torch.LongTensor) -> VARSamplingState:
        """A new state holding the samples ``rows`` (indices into the batch), with their unconditional rows, cache,
        latents and generators: e.g. the best of several candidates, to finish only those.

        A row taken twice shares its generator object between the copies (so their draws interleave); give the
        copies generators of their own (``state.generators = [...]``) to branch them independently.
        """
        rows = torch.as_tensor(rows, dtype=torch.long)
        if rows.ndim != 1 or (rows.numel() and not 0 <= int(rows.min()) <= int(rows.max()) < self.batch_size):
            raise ValueError(f"rows must be a 1-D tensor of indices in [0, {self.batch_size}), got {rows.tolist()}.")
        model_rows = torch.cat([rows + group * self.batch_size for group in range(self.row_groups)])
        return VARSamplingState(
            class_labels=self.class_labels[rows.to(self.class_labels.device)],
            model_labels=self.model_labels[model_rows.to(self.model_labels.device)],
            kv_cache=None
            if self.kv_cache is None
            else self.kv_cache.select(model_rows.to(self.kv_cache.keys[0].device)),
            latents=self.latents[rows.to(self.latents.device)],
            token_maps=[t[rows.to(t.device)] for t in self.token_maps],
            finite=list(self.finite),
            generators=None if self.generators is None else [self.generators[r] for r in rows.tolist()],
            forced_token_maps=_rows(self.forced_token_maps, rows),
            forced_masks=_rows(self.forced_masks, rows),
            neighbour_token_maps=_rows(self.neighbour_token_maps, rows),
            retrieval_weights=self.retrieval_weights,
            retrieval_smoothing=self.retrieval_smoothing,
            retrieval_sharpness=self.retrieval_sharpness,
            neighbour_codes=None if self.neighbour_codes is None else self.neighbour_codes[model_rows],
            neighbour_mask=None if self.neighbour_mask is None else self.neighbour_mask[model_rows],
            retrieval_guided=self.retrieval_guided,
        )

    def clone(self) -> VARSamplingState:
        """An independent copy, the KV cache included, to continue one partial sample along several branches. The
        generator objects are shared, not copied: give a branch its own (``state.generators = [...]``)."""
        return VARSamplingState(
            class_labels=self.class_labels.clone(),
            model_labels=self.model_labels.clone(),
            kv_cache=None if self.kv_cache is None else self.kv_cache.clone(),
            latents=self.latents.clone(),
            token_maps=[t.clone() for t in self.token_maps],
            finite=list(self.finite),
            generators=None if self.generators is None else list(self.generators),
            forced_token_maps=_rows(self.forced_token_maps, None),
            forced_masks=_rows(self.forced_masks, None),
            neighbour_token_maps=_rows(self.neighbour_token_maps, None),
            retrieval_weights=self.retrieval_weights,
            retrieval_smoothing=self.retrieval_smoothing,
            retrieval_sharpness=self.retrieval_sharpness,
            neighbour_codes=None if self.neighbour_codes is None else self.neighbour_codes.clone(),
            neighbour_mask=None if self.neighbour_mask is None else self.neighbour_mask.clone(),
            retrieval_guided=self.retrieval_guided,
        )


def _rows(maps: list[torch.Tensor] | None, rows: torch.LongTensor | None) -> list[torch.Tensor] | None:
    """Rows of per-scale maps (a copy of all of them with ``rows=None``)."""
    if maps is None:
        return None
    return [m.clone() if rows is None else m[rows.to(m.device)] for m in maps]
