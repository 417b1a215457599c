"""Rejection sampling: sample M candidates per image and keep the one a verifier scores best (VAR-d30-re keeps the
one an ImageNet classifier finds most likely to be its class).

Two modes, both running VARPipeline's own sampling loop:

- ``"final"``: M full samples per image, the best kept: random search with a classifier verifier. With
  ``accept_threshold``, a class's candidates are drawn round by round, only as many as it still needs, until each
  class of the call has as many accepted images (p(y|x) ≥ threshold) as were asked for, or M per image were tried;
  the accepted ones are kept in the order they were drawn, and a class that falls short is completed with its best
  rejected candidates.
- ``"early"``: the M candidates are sampled only up to ``rejection_scale``; the partial latents f̂ are decoded to a
  coarse preview, the verifier scores the previews, and only the best candidate of each image is finished (a
  ``state_callback`` of the pipeline's loop). The coarse scales are cheap and already decide the class, so this
  costs little more than one sample.

Each candidate has its own generator, so its tokens are the ones its generator gives alone (pixels can differ in
the last bit: they depend on the batch they are decoded in). The cost is counted in transformer token positions
against plain sampling of the same images, and in previews decoded.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..evaluation.samples import to_uint8
from ..pipelines.state import VARSamplingState
from .verifiers import Verifier

MODES = ("final", "early")
SAMPLING_ARGUMENTS = ("guidance_scale", "top_k", "top_p", "temperature", "more_smooth")


def sampling_arguments(pipe, kwargs: dict, who: str) -> dict:
    """The pipeline's sampling arguments from ``kwargs``, its own defaults where not given; anything else is an
    error naming ``who`` takes what."""
    from ..pipelines.var import VARPipeline

    signature = inspect.signature(VARPipeline.__call__).parameters  # the loop's defaults, whatever pipeline calls it
    unknown = set(kwargs) - set(SAMPLING_ARGUMENTS)
    if unknown:
        raise ValueError(f"{who} takes the sampling arguments {SAMPLING_ARGUMENTS}, not {sorted(unknown)}.")
    sampling = {name: kwargs.get(name, signature[name].default) for name in SAMPLING_ARGUMENTS}
    pipe.scheduler.check_sampling_args(**sampling)
    return sampling


def default_rejection_scale(patch_nums) -> int:
    """The first scale whose side is at least half the last one (5×5 of VAR's 16×16 at 256 px is too coarse to tell
    most classes apart; 8×8 is not): index 6 for (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 3 for (1, 2, 3, 4, 6, 8)."""
    return next(si for si, side in enumerate(patch_nums) if 2 * side >= patch_nums[-1])


@dataclass
class RejectionOutput:
    """What :class:`RejectionSampler` returns.

    Attributes:
        images: the kept images, uint8 (B, H, W, 3).
        class_labels: (B,).
        scores: the verifier's score of each kept image (on the final image, in both modes).
        candidates: candidates sampled (to the end in final mode, to the rejection scale in early mode).
        accepted: images whose kept candidate reached ``accept_threshold`` (all B without a threshold).
        transformer_tokens, plain_tokens: token positions the transformer computed, and what plain sampling of the
            same images computes; ``relative_compute`` is their ratio.
        previews_decoded: partial latents decoded for the verifier (early mode).
    """

    images: np.ndarray
    class_labels: torch.LongTensor
    scores: torch.Tensor
    candidates: int
    accepted: int
    transformer_tokens: int
    plain_tokens: int
    previews_decoded: int = 0

    @property
    def relative_compute(self) -> float:
        return self.transformer_tokens / self.plain_tokens

    @property
    def acceptance_rate(self) -> float:
        """Accepted images per candidate sampled: 1/M for best of M (every kept image counts as accepted)."""
        return self.accepted / self.candidates


class RejectionSampler:
    """Best-of-M sampling with a verifier, on a :class:`~diffusers_var.VARPipeline`.

    Args:
        pipe: the pipeline to sample with.
        verifier: scores (uint8 images, class ids) → (N,) log p(y|x), higher is better; e.g. a
            :class:`~diffusers_var.search.ClassifierVerifier`.
        oversample: M, the candidates per image.
        mode: ``"final"`` or ``"early"`` (see the module's documentation).
        rejection_scale: early mode's scale, an index into ``patch_nums`` (default: :func:`default_rejection_scale`).
        accept_threshold: final mode: the p(y|x) a candidate needs to be accepted (default: none, best of M).

    Example:
        ```py
        >>> from diffusers_var import VARPipeline
        >>> from diffusers_var.search import ClassifierVerifier, RejectionSampler
        >>> pipe = VARPipeline.from_pretrained("var-digits")
        >>> sampler = RejectionSampler(pipe, ClassifierVerifier("digits-classifier"), oversample=4, mode="early")
        >>> generators = [[torch.Generator().manual_seed(4 * i + m) for m in range(4)] for i in range(2)]
        >>> out = sampler([3, 7], generators, guidance_scale=1.0, top_k=0, top_p=1.0)
        >>> out.images.shape, round(out.relative_compute, 2)
        ((2, 32, 32, 3), 1.69)
        ```
    """

    def __init__(
        self,
        pipe,
        verifier: Verifier,
        oversample: int = 4,
        mode: str = "final",
        rejection_scale: int | None = None,
        accept_threshold: float | None = None,
    ):
        patch_nums = tuple(pipe.scheduler.config.patch_nums)
        if mode not in MODES:
            raise ValueError(f"The rejection mode must be one of {MODES}, got {mode!r}.")
        if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 1:
            raise ValueError(f"oversample (M candidates per image) must be an integer ≥ 1, got {oversample!r}.")
        if rejection_scale is not None and mode != "early":
            raise ValueError("rejection_scale chooses the scale of early rejection; it needs mode='early'.")
        if accept_threshold is not None and mode != "final":
            raise ValueError("accept_threshold applies to final images; it needs mode='final'.")
        if accept_threshold is not None and not (
            isinstance(accept_threshold, (int, float)) and 0 < accept_threshold <= 1
        ):
            raise ValueError(f"accept_threshold is a probability p(y|x) in (0, 1], got {accept_threshold!r}.")
        scale = default_rejection_scale(patch_nums) if rejection_scale is None else rejection_scale
        if isinstance(scale, bool) or not isinstance(scale, int) or not 0 <= scale < len(patch_nums) - 1:
            raise ValueError(
                f"rejection_scale must be an index into patch_nums={patch_nums} before the last, in [0, "
                f"{len(patch_nums) - 2}], got {rejection_scale!r}."
            )
        self.pipe, self.verifier, self.oversample, self.mode = pipe, verifier, oversample, mode
        self.rejection_scale = scale if mode == "early" else None
        self.accept_threshold = accept_threshold
        self.sizes = [side * side for side in patch_nums]

    def _sampling(self, kwargs: dict) -> dict:
        return sampling_arguments(self.pipe, kwargs, "Rejection sampling")

    @torch.no_grad()
    def __call__(
        self, class_labels: list[int], candidate_generators: list[list[torch.Generator]], **sampling
    ) -> RejectionOutput:
        """Keep the best of ``oversample`` candidates for each of ``class_labels`` (class ids).

        ``candidate_generators`` holds one list of ``oversample`` generators per image: candidate m of image i
        draws from ``candidate_generators[i][m]``. ``sampling``: the pipeline's ``guidance_scale``, ``top_k``,
        ``top_p``, ``temperature``, ``more_smooth`` (its defaults where not given).
        """
        labels = [int(c) for c in class_labels]
        if not labels:
            raise ValueError("class_labels is empty: give the class id of each image to sample.")
        if len(candidate_generators) != len(labels) or any(
            len(per_image) != self.oversample for per_image in candidate_generators
        ):
            raise ValueError(
                f"Give one list of {self.oversample} generators (one per candidate) for each of the {len(labels)} "
                "images."
            )
        sampling = self._sampling(sampling)
        if self.mode == "early":
            return self._early(labels, candidate_generators, sampling)
        if self.accept_threshold is None:
            return self._best_of(labels, candidate_generators, sampling)
        return self._until_accepted(labels, candidate_generators, sampling)

    def _sample(self, labels: list[int], generators: list[torch.Generator], sampling: dict, **options):
        out = self.pipe(class_labels=labels, generator=generators, output_type="np", **sampling, **options)
        return to_uint8(out.images), out.class_labels.cpu()

    def _best_of(self, labels: list[int], generators, sampling: dict) -> RejectionOutput:
        """Final mode: random search with the verifier (one implementation: :class:`SearchSampler`'s), candidate m
        of every image in one call of the pipeline, M calls; the best kept."""
        from .algorithms import SearchSampler

        search = SearchSampler(self.pipe, self.verifier, "random", budget=self.oversample)
        found = search.random_search(labels, generators, sampling)
        count, total = len(labels), sum(self.sizes)
        return RejectionOutput(
            images=found.images,
            class_labels=torch.tensor(labels),
            scores=found.scores,
            candidates=found.candidates,
            accepted=count,
            transformer_tokens=found.candidates * total,
            plain_tokens=count * total,
        )

    def _until_accepted(self, labels: list[int], generators, sampling: dict) -> RejectionOutput:
        """Final mode with a threshold: each class draws, round by round, as many candidates as it still needs from
        its pool (candidate m of each of its images, m-major), until it has an accepted image per request or its
        pool is spent; a class that falls short takes its best rejected candidates."""
        count, total, threshold = len(labels), sum(self.sizes), math.log(self.accept_threshold)
        slots = {c: [i for i in range(count) if labels[i] == c] for c in dict.fromkeys(labels)}
        pools = {c: [generators[i][m] for m in range(self.oversample) for i in slots[c]] for c in slots}
        drawn = dict.fromkeys(slots, 0)
        accepted = {c: [] for c in slots}  # (image, score), in the order drawn
        rejected = {c: [] for c in slots}
        while True:
            batch = []  # (class, generator) for this round
            for c in slots:
                need = min(len(slots[c]) - len(accepted[c]), len(pools[c]) - drawn[c])
                batch += [(c, pools[c][drawn[c] + k]) for k in range(max(need, 0))]
                drawn[c] += max(need, 0)
            if not batch:
                break
            images, _ = self._sample([c for c, _ in batch], [g for _, g in batch], sampling)
            scores = self.verifier(images, torch.tensor([c for c, _ in batch]))
            for (c, _), image, score in zip(batch, images, scores.tolist()):
                (accepted if score >= threshold else rejected)[c].append((image, score))
        kept_images = [None] * count
        kept_scores = torch.empty(count)
        for c, indices in slots.items():
            fill = sorted(rejected[c], key=lambda pair: -pair[1])  # the best rejected, where a class fell short
            for i, (image, score) in zip(indices, accepted[c][: len(indices)] + fill):
                kept_images[i], kept_scores[i] = image, score
        candidates = sum(drawn.values())
        return RejectionOutput(
            images=np.stack(kept_images),
            class_labels=torch.tensor(labels),
            scores=kept_scores,
            candidates=candidates,
            accepted=sum(min(len(accepted[c]), len(slots[c])) for c in slots),
            transformer_tokens=candidates * total,
            plain_tokens=count * total,
        )

    def _early(self, labels: list[int], generators, sampling: dict) -> RejectionOutput:
        """Early mode: M candidates per image in one call of the pipeline, whose ``state_callback`` keeps the best
        preview of each image at the rejection scale."""
        count, m, scale = len(labels), self.oversample, self.rejection_scale
        repeated = [label for label in labels for _ in range(m)]

        def keep_best_previews(pipe, scale_index: int, state: VARSamplingState) -> VARSamplingState | None:
            if scale_index != scale:
                return None
            scores = []
            for start in range(0, state.batch_size, count):  # previews decoded a batch of images at a time
                previews = to_uint8(pipe.decode_latents(state.latents[start : start + count], "np"))
                scores.append(self.verifier(previews, state.class_labels[start : start + count].cpu()))
            best = torch.cat(scores).view(count, m).argmax(dim=1)
            return state.select(torch.arange(count) * m + best)

        flat_generators = [g for per_image in generators for g in per_image]
        images, kept_labels = self._sample(repeated, flat_generators, sampling, state_callback=keep_best_previews)
        early = sum(self.sizes[: scale + 1])
        return RejectionOutput(
            images=images,
            class_labels=kept_labels,
            scores=self.verifier(images, kept_labels),
            candidates=count * m,
            accepted=count,
            transformer_tokens=count * m * early + count * (sum(self.sizes) - early),
            plain_tokens=count * sum(self.sizes),
            previews_decoded=count * m,
        )
