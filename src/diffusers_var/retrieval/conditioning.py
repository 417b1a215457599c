"""RetrievalConditioning: the retrieved neighbours of one sampling call, and how the loop uses them.

Two modes, both options of :class:`~diffusers_var.VARPipeline`'s one sampling loop:

- ``"trained"``: a transformer built with ``num_neighbours > 0`` attends, in every block, to the neighbours' token
  pyramids (their code embeddings at every scale). Guidance may contrast rows with and without neighbours
  (``guidance_scale`` here, Re-Imagen's guidance on retrieval) as well as the class.
- ``"training_free"``: any VAR model; each scale's draw comes from ``(1 − λ)·p_model + λ·p_retrieved``
  (:mod:`diffusers_var.retrieval.mixing`).
- ``"combined"``: both, for a model with retrieval attention: ``p_model`` is the attending model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validation import check_real
from .mixing import retrieval_weights

RETRIEVAL_MODES = ("trained", "training_free", "combined")


@dataclass
class RetrievalConditioning:
    """What a sampling call retrieved for each of its B samples, and how to use it.

    Attributes:
        neighbour_token_maps: one (B, k, pn, pn) map per scale: the codes of each sample's k neighbours.
        mode: ``"trained"``, ``"training_free"`` or ``"combined"`` (see the module docstring).
        weights: training-free: λ at every scale (:func:`~diffusers_var.retrieval.mixing.retrieval_weights`).
        smoothing: training-free: weight of the 8 adjacent positions in ``p_retrieved``.
        sharpness: training-free: how strongly the neighbours that agree with the sample's tokens so far lead the
            next scale (:func:`~diffusers_var.retrieval.mixing.neighbour_agreement_weights`; 0: all alike).
        guidance_scale: trained: guidance on retrieval (1.0 = none); rows without neighbours are added for it.

    Example:
        ```py
        >>> maps = [torch.zeros(2, 3, p, p, dtype=torch.long) for p in pipe.vqvae.config.patch_nums]
        >>> retrieval = RetrievalConditioning(maps, "training_free", weights=[0.5] * len(maps))
        ```
    """

    neighbour_token_maps: list[torch.LongTensor]
    mode: str = "training_free"
    weights: list[float] | None = None
    smoothing: float = 0.0
    guidance_scale: float = 1.0
    sharpness: float = 0.0

    @property
    def attends(self) -> bool:
        """Whether the transformer attends to the neighbours (``"trained"``, ``"combined"``)."""
        return self.mode in ("trained", "combined")

    @property
    def mixes(self) -> bool:
        """Whether each scale's draw is mixed with the neighbours' codes (``"training_free"``, ``"combined"``)."""
        return self.mode in ("training_free", "combined")

    @property
    def num_neighbours(self) -> int:
        return self.neighbour_token_maps[0].shape[1]

    def check(self, pipe, batch_size: int) -> None:
        """Raise a ValueError naming what does not fit ``pipe``'s models and a batch of ``batch_size`` samples."""
        if self.mode not in RETRIEVAL_MODES:
            raise ValueError(f"retrieval_mode must be one of {RETRIEVAL_MODES}, got {self.mode!r}.")
        patch_nums = tuple(pipe.vqvae.config.patch_nums)
        maps = self.neighbour_token_maps
        if not isinstance(maps, (list, tuple)) or len(maps) != len(patch_nums):
            raise ValueError(f"neighbour_token_maps must be one map per scale of patch_nums={patch_nums}.")
        k = maps[0].shape[1] if maps[0].ndim == 4 else 0
        expected = [(batch_size, k, p, p) for p in patch_nums]
        if k < 1 or [tuple(m.shape) for m in maps] != expected:
            raise ValueError(
                f"neighbour_token_maps must have shapes {expected} (B, k ≥ 1 neighbours, pn, pn), got "
                f"{[tuple(m.shape) for m in maps]}."
            )
        pipe.vqvae.check_token_maps([m.flatten(0, 1) for m in maps])
        check_real("retrieval_guidance_scale", self.guidance_scale, minimum=0, hint=" 1.0 means no guidance.")
        if self.attends and not pipe.transformer.has_retrieval:
            raise ValueError(
                f"retrieval_mode={self.mode!r} needs a transformer trained with retrieval (config.num_neighbours > 0); "
                "this one has none. Use retrieval_mode='training_free', or train one with train_var.py "
                "--retrieval_datastore DIR --num_neighbours k."
            )
        if not self.attends and self.guidance_scale != 1.0:
            raise ValueError(
                f"retrieval_guidance_scale={self.guidance_scale} needs retrieval_mode='trained' or 'combined' (rows "
                "without neighbours to contrast with); training-free retrieval has retrieval_weight instead."
            )
        if self.mixes:
            self.weights = retrieval_weights(self.weights if self.weights is not None else 0.0, len(patch_nums))
            check_real("retrieval_smoothing", self.smoothing, minimum=0, hint=" 0 counts the same position only.")
            check_real("retrieval_sharpness", self.sharpness, minimum=0, hint=" 0 weighs all neighbours alike.")

    def apply(self, pipe, state, guided: bool) -> None:
        """Put the neighbours into a fresh sampling state (see :meth:`VARPipeline.prepare_sampling_state`)."""
        self.check(pipe, state.batch_size)
        device = state.latents.device
        maps = [m.to(device, torch.long) for m in self.neighbour_token_maps]
        if self.mixes:
            state.neighbour_token_maps, state.retrieval_weights = maps, list(self.weights)
            state.retrieval_smoothing = float(self.smoothing)
            state.retrieval_sharpness = float(self.sharpness)
        if not self.attends:
            return
        codes = pipe.vqvae.code_embeddings(maps).to(pipe.transformer.dtype)  # (B, k, L, Cvae)
        batch = state.batch_size
        state.retrieval_guided = self.guidance_scale != 1.0
        with_neighbours = [True] + ([True] if guided else []) + ([False] if state.retrieval_guided else [])
        state.neighbour_codes = torch.cat([codes] * len(with_neighbours))
        state.neighbour_mask = torch.cat(
            [torch.full((batch,), flag, dtype=torch.bool, device=device) for flag in with_neighbours]
        )
