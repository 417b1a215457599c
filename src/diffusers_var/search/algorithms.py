"""Search over VAR's sampling randomness with a verifier, under a compute budget (after Ma et al. 2025,
"Inference-Time Scaling for Diffusion Models beyond Scaling Denoising Steps").

- ``"random"``: N independent samples per image, the verifier's best kept (rejection sampling's final mode).
- ``"zero-order"``: a pivot sample, then rounds of neighbours that keep most of the pivot's tokens and re-draw a
  fraction of them at chosen scales (through the loop's forced tokens, as editing does); the pivot moves to its best
  neighbour when that scores higher.
- ``"paths"``: a beam over scales: W·F partial pyramids per image; at each branch scale their previews are scored,
  the best W kept and each forked F ways (the KV cache is cloned with the state); after the last branch scale the W
  survivors are finished and the final choice is made among full images.

The budget is counted in transformer token positions, one plain sample = 1.0 (guidance doubles both sides, so it
cancels), per image; it is never exceeded. Verifier calls are counted beside it, not in it. Each image's first
candidate is the plain sample of its own generator (for paths: its first row, which the beam may prune, so there
the first candidate is the first full image the beam finishes); with the default selection no result scores below
its first candidate, and for random and paths budget 1 gives the plain sample (zero-order needs a round of
neighbours: budget ≥ 1 + neighbours). At a branch scale, paths scores previews; a verifier that
compares an image with its preview (self-consistency) has nothing to compare there and ranks them equally.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..evaluation.samples import to_uint8
from ..pipelines.state import VARSamplingState
from .verifiers import Verifier, preview_scale_of

ALGORITHMS = ("random", "zero-order", "paths")


@dataclass
class SearchOutput:
    """What a search returns.

    Attributes:
        images: the kept images, uint8 (B, H, W, 3).
        class_labels: (B,).
        scores: the verifier's score of each kept image.
        first_scores: the score of each image's first candidate (its plain sample; for paths the first full image
            the beam finished): ``scores >= first_scores`` with the default selection (not with a
            ``selection_temperature``).
        budget_used: (B,) transformer compute per image, in plain samples.
        verifier_calls: images (and previews) the verifier scored.
        candidates: full or partial samples drawn.
    """

    images: np.ndarray
    class_labels: torch.LongTensor
    scores: torch.Tensor
    first_scores: torch.Tensor
    budget_used: torch.Tensor
    verifier_calls: int
    candidates: int

    @property
    def total_budget_used(self) -> float:
        return float(self.budget_used.sum())


# Independent streams derived from one generator, one domain per purpose: the images of a call, the candidates of an
# image, the choice among them. (Deriving two levels from the same root would hand an image's candidates the seeds of
# its neighbours' plain samples.)
CANDIDATES, IMAGES, SELECTION = 0, 1, 2


def _derived_seeds(generator: torch.Generator, count: int, purpose: int) -> list[int]:
    """``count`` seeds derived from ``generator``'s state for ``purpose``, without advancing it."""
    source = torch.Generator(generator.device)
    source.set_state(generator.get_state())
    root = int(torch.randint(0, 2**62, (1,), generator=source, device=generator.device))
    return [int(s) >> 1 for s in np.random.SeedSequence([root, purpose]).generate_state(count, dtype=np.uint64)]


def child_generators(generator: torch.Generator, count: int, purpose: int = CANDIDATES) -> list[torch.Generator]:
    """``count`` generators: the first continues from ``generator``'s own state (so candidate 0 is the plain
    sample), the others are seeded from it for ``purpose`` (deterministic, independent, ``generator`` untouched)."""
    first = torch.Generator(generator.device)
    first.set_state(generator.get_state())
    seeds = _derived_seeds(generator, max(count - 1, 0), purpose)
    return [first] + [torch.Generator(generator.device).manual_seed(seed) for seed in seeds]


def selection_generator(generator: torch.Generator) -> torch.Generator:
    """A CPU generator for choosing among candidates (soft selection), derived from ``generator`` without advancing
    it and independent of the candidates' own streams (the scores it draws from live on the CPU)."""
    return torch.Generator().manual_seed(_derived_seeds(generator, 1, SELECTION)[0])


def choose(scores: torch.Tensor, temperature: float | None, generators: list[torch.Generator] | None) -> torch.Tensor:
    """Per row of ``scores`` (images × candidates): the best candidate, or with a ``temperature`` one drawn with
    probability ∝ exp(score / temperature), which keeps some of the model's diversity instead of the verifier's
    single favourite (strict selection overfits the verifier: its score rises while FID worsens)."""
    if temperature is None:
        return scores.argmax(dim=1)
    probabilities = (scores.float().cpu() / temperature).softmax(dim=1)
    return torch.stack(
        [torch.multinomial(p.to(g.device), 1, generator=g).squeeze(0).cpu() for p, g in zip(probabilities, generators)]
    )


class SearchSampler:
    """Search with a verifier over a :class:`~diffusers_var.VARPipeline`'s samples, within a budget.

    Args:
        pipe: the pipeline (its sampling loop is used as is).
        verifier: scores (uint8 images, class ids[, previews]) → (N,), higher is better.
        algorithm: ``"random"``, ``"zero-order"`` or ``"paths"``.
        budget: transformer compute per image, in plain samples (≥ 1).
        neighbours, redraw_fraction, redraw_scales: zero-order: neighbours per round, the share of a pivot's tokens
            each neighbour re-draws, at which scales (default: all; the others keep the pivot's tokens).
        beam_width, branch_factor, branch_scales: paths: W kept per image, F forks of each, the scales where previews
            are scored (default: the first scale at least half the final side). Defaults fill the budget.
        selection_temperature: random and paths: instead of the best final candidate, draw one with probability
            ∝ exp(score / temperature) (against verifier overfitting; ``None``, the default, keeps the best, and
            only then is no result below its first candidate).
    """

    def __init__(
        self,
        pipe,
        verifier: Verifier,
        algorithm: str = "random",
        budget: float = 4.0,
        neighbours: int = 3,
        redraw_fraction: float = 0.5,
        redraw_scales: tuple[int, ...] | None = None,
        beam_width: int | None = None,
        branch_factor: int | None = None,
        branch_scales: tuple[int, ...] | None = None,
        selection_temperature: float | None = None,
    ):
        from .rejection import default_rejection_scale

        patch_nums = tuple(pipe.scheduler.config.patch_nums)
        self.sizes = [side * side for side in patch_nums]
        self.total = sum(self.sizes)
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}.")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 1 <= budget < math.inf:
            raise ValueError(
                f"budget is transformer compute per image in plain samples, a finite number ≥ 1, got {budget!r}."
            )
        self.pipe, self.verifier, self.algorithm, self.budget = pipe, verifier, algorithm, float(budget)
        preview = preview_scale_of(verifier)
        if preview is not None and not 0 <= preview < len(patch_nums) - 1:
            raise ValueError(
                f"The verifier compares images with their preview at scale {preview}; it must be a scale before the "
                f"last, in [0, {len(patch_nums) - 2}] for patch_nums={patch_nums}."
            )
        if selection_temperature is not None:
            if algorithm == "zero-order":
                raise ValueError("selection_temperature applies to the final choice of random and paths search.")
            if (
                isinstance(selection_temperature, bool)
                or not isinstance(selection_temperature, (int, float))
                or not (0 < selection_temperature < math.inf)
            ):
                raise ValueError(f"selection_temperature must be a number > 0, got {selection_temperature!r}.")
        self.selection_temperature = selection_temperature
        last = len(patch_nums) - 1

        def scales(value, name: str, allowed_last: int) -> tuple[int, ...]:
            value = tuple(value)
            if not value or any(
                isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= allowed_last for s in value
            ):
                raise ValueError(
                    f"{name} must be scale indices in [0, {allowed_last}] of patch_nums={patch_nums}, got {value!r}."
                )
            return tuple(sorted(set(value)))

        if algorithm == "zero-order":
            if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 1:
                raise ValueError(f"neighbours must be an integer ≥ 1, got {neighbours!r}.")
            if not isinstance(redraw_fraction, (int, float)) or not 0 < redraw_fraction <= 1:
                raise ValueError(f"redraw_fraction must be in (0, 1], got {redraw_fraction!r}.")
            self.rounds = int((self.budget - 1) // neighbours)
            if self.rounds < 1:
                raise ValueError(
                    f"budget {budget:g} allows no round of {neighbours} neighbours after the pivot: it needs ≥ "
                    f"{1 + neighbours}; lower neighbours or raise the budget."
                )
            self.neighbours, self.redraw_fraction = neighbours, float(redraw_fraction)
            self.redraw_scales = scales(
                range(last + 1) if redraw_scales is None else redraw_scales, "redraw_scales", last
            )
        if algorithm == "paths":
            default_scale = default_rejection_scale(patch_nums)
            self.branch_scales = scales(
                (default_scale,) if branch_scales is None else branch_scales, "branch_scales", last - 1
            )
            width = max(1, int(self.budget // 4)) if beam_width is None else beam_width
            if isinstance(width, bool) or not isinstance(width, int) or width < 1:
                raise ValueError(f"beam_width must be an integer ≥ 1, got {beam_width!r}.")
            if branch_factor is None:  # the widest fan-out the budget pays for
                branch_factor = 1
                while self._paths_cost(width, branch_factor + 1) <= self.budget + 1e-9:
                    branch_factor += 1
            if isinstance(branch_factor, bool) or not isinstance(branch_factor, int) or branch_factor < 1:
                raise ValueError(f"branch_factor must be an integer ≥ 1, got {branch_factor!r}.")
            cost = self._paths_cost(width, branch_factor)
            if cost > self.budget + 1e-9:
                raise ValueError(
                    f"A beam of width {width} forked {branch_factor} ways at scales {self.branch_scales} costs "
                    f"{cost:.2f} plain samples per image, more than the budget {budget:g}: lower beam_width or "
                    "branch_factor, or raise the budget."
                )
            self.beam_width, self.branch_factor = width, branch_factor

    def _paths_cost(self, width: int, factor: int) -> float:
        """Per image: W·F rows up to the last branch scale, W rows after it."""
        split = self.branch_scales[-1] + 1
        return (width * factor * sum(self.sizes[:split]) + width * sum(self.sizes[split:])) / self.total

    # -- sampling through the pipeline's own loop -----------------------------------------------------------------

    def _sample(self, labels, generators, sampling, state_callback=None, forced=None):
        """uint8 images, the kept rows' labels, and (for verifiers that need them) their previews."""
        scale = preview_scale_of(self.verifier)
        recorded = {}

        def callback(pipe, scale_index: int, state: VARSamplingState):
            if scale is not None and scale_index == scale:
                recorded["previews"] = to_uint8(pipe.decode_latents(state.latents, "np"))
            if state_callback is None:
                return None
            returned = state_callback(pipe, scale_index, state)
            rows = recorded["select"].pop("rows", None)  # the rows a selection kept: the previews follow them
            if rows is not None and "previews" in recorded:
                recorded["previews"] = recorded["previews"][rows]
            return returned

        recorded["select"] = {}
        self._recorded = recorded
        out = self.pipe._sample(
            torch.as_tensor(labels), generator=generators, output_type="np", return_dict=True,
            callback_on_step_end=None, callback_on_step_end_tensor_inputs=None, state_callback=callback,
            output_scales=False, forced_token_maps=forced[0] if forced else None,
            forced_masks=forced[1] if forced else None, **sampling,
        )  # fmt: skip
        return to_uint8(out.images), out.class_labels.cpu(), recorded.get("previews"), out.token_maps

    def _score(self, images, labels, previews) -> torch.Tensor:
        self.verifier_calls += len(images)
        if preview_scale_of(self.verifier) is not None:
            return torch.as_tensor(self.verifier(images, labels, previews=previews)).float().cpu()
        return torch.as_tensor(self.verifier(images, labels)).float().cpu()

    @torch.no_grad()
    def __call__(self, class_labels: list[int], generators: list[torch.Generator], **sampling) -> SearchOutput:
        """Search for each of ``class_labels`` (class ids), image i drawing from ``generators[i]`` (its first
        candidate is exactly the plain sample of that generator). ``sampling``: the pipeline's ``guidance_scale``,
        ``top_k``, ``top_p``, ``temperature``."""
        bad = [c for c in class_labels if isinstance(c, bool) or not isinstance(c, (int, np.integer))]
        if bad:
            raise ValueError(f"class_labels are class ids (integers), got {bad[:5]}.")
        labels = [int(c) for c in class_labels]
        if not labels or len(generators) != len(labels):
            raise ValueError(f"Give one generator per image: {len(labels)} labels, {len(generators)} generators.")
        from .rejection import sampling_arguments

        sampling = sampling_arguments(self.pipe, sampling, "Search")
        self.verifier_calls, self.candidates = 0, 0
        if self.algorithm == "random":
            count = int(math.floor(self.budget + 1e-9))
            return self.random_search(labels, [child_generators(g, count) for g in generators], sampling)
        if self.algorithm == "zero-order":
            return self._zero_order(labels, generators, sampling)
        return self._paths(labels, generators, sampling)

    def _output(self, images, labels, scores, first, used: float) -> SearchOutput:
        return SearchOutput(
            images=images, class_labels=torch.tensor(labels), scores=scores, first_scores=first,
            budget_used=torch.full((len(labels),), used), verifier_calls=self.verifier_calls,
            candidates=self.candidates,
        )  # fmt: skip

    def random_search(self, labels: list[int], per_image: list[list[torch.Generator]], sampling: dict) -> SearchOutput:
        """Candidate n of image i draws from ``per_image[i][n]``; each candidate index is one call of the loop for
        all images; the best of each image is kept. (Rejection sampling's final mode is this.)"""
        count = len(per_image[0])
        self.verifier_calls, self.candidates = 0, 0
        selectors = [selection_generator(g[0]) for g in per_image] if self.selection_temperature else None
        all_images, all_scores = [], []
        for n in range(count):
            images, _, previews, _ = self._sample(labels, [g[n] for g in per_image], sampling)
            self.candidates += len(labels)
            all_images.append(images)
            all_scores.append(self._score(images, torch.tensor(labels), previews))
        scores = torch.stack(all_scores, dim=1)  # images × candidates
        chosen = choose(scores, self.selection_temperature, selectors)
        rows = torch.arange(len(labels))
        kept = np.stack([all_images[int(c)][i] for i, c in enumerate(chosen)])
        return self._output(kept, labels, scores[rows, chosen], scores[:, 0].clone(), float(count))

    def _zero_order(self, labels, generators, sampling) -> SearchOutput:
        count, rounds, n = len(labels), self.rounds, self.neighbours
        per_image = [child_generators(g, 1 + rounds * n + 1) for g in generators]
        masks_from = [g[-1] for g in per_image]  # which tokens a neighbour re-draws: a generator of its own
        images, _, previews, tokens = self._sample(labels, [g[0] for g in per_image], sampling)
        self.candidates += count
        pivot_scores = self._score(images, torch.tensor(labels), previews)
        first, pivot_images = pivot_scores.clone(), images.copy()
        pivot_tokens = [t.clone() for t in tokens]
        for r in range(rounds):
            rows = [i for i in range(count) for _ in range(n)]
            forced_tokens = [t[rows] for t in pivot_tokens]
            keep = []
            for si, t in enumerate(forced_tokens):
                if si in self.redraw_scales:
                    draws = torch.stack(
                        [torch.rand(t.shape[1:], generator=masks_from[i], device=masks_from[i].device) for i in rows]
                    )
                    keep.append((draws >= self.redraw_fraction).to(t.device))
                else:
                    keep.append(torch.ones_like(t, dtype=torch.bool))
            neighbour_generators = [per_image[i][1 + r * n + k] for i in range(count) for k in range(n)]
            images, _, previews, tokens = self._sample(
                [labels[i] for i in rows], neighbour_generators, sampling, forced=(forced_tokens, keep)
            )
            self.candidates += len(rows)
            scores = self._score(images, torch.tensor([labels[i] for i in rows]), previews).view(count, n)
            best_score, best = scores.max(dim=1)
            for i in range(count):
                if best_score[i] > pivot_scores[i]:
                    row = i * n + int(best[i])
                    pivot_scores[i], pivot_images[i] = best_score[i], images[row]
                    for si in range(len(pivot_tokens)):
                        pivot_tokens[si][i] = tokens[si][row]
        return self._output(pivot_images, labels, pivot_scores, first, float(1 + rounds * n))

    def _paths(self, labels, generators, sampling) -> SearchOutput:
        count, width, factor = len(labels), self.beam_width, self.branch_factor
        rows_per_image = width * factor
        forks_needed = 1 + rows_per_image * (len(self.branch_scales) + 1)
        per_image = [child_generators(g, forks_needed) for g in generators]
        used = {i: 0 for i in range(count)}  # next unused generator per image
        start_generators, start_labels = [], []
        for i in range(count):
            start_generators += per_image[i][:rows_per_image]
            start_labels += [labels[i]] * rows_per_image
            used[i] = rows_per_image
        last_branch = self.branch_scales[-1]
        record = {"image_of_row": [i for i in range(count) for _ in range(rows_per_image)]}

        def branch(pipe, scale_index: int, state: VARSamplingState):
            if scale_index not in self.branch_scales:
                return None
            previews = to_uint8(pipe.decode_latents(state.latents, "np"))
            row_images = record["image_of_row"]
            scores = self._score(previews, state.class_labels.cpu(), previews)
            keep_rows, new_generators, new_images = [], [], []
            for i in range(count):
                mine = [r for r, image in enumerate(row_images) if image == i]
                ranked = sorted(mine, key=lambda r: (-float(scores[r]), r))[:width]
                ranked.sort()  # stable: the plain sample's row stays first when it is kept
                for r in ranked:
                    copies = 1 if scale_index == last_branch else factor
                    for c in range(copies):
                        keep_rows.append(r)
                        new_images.append(i)
                        if c == 0:
                            new_generators.append(state.generators[r])
                        else:
                            new_generators.append(per_image[i][used[i]])
                            used[i] += 1
            selected = state.select(torch.tensor(keep_rows))
            selected.generators = new_generators
            record["image_of_row"] = new_images
            self._recorded["select"]["rows"] = keep_rows
            return selected

        images, kept_labels, previews, _ = self._sample(start_labels, start_generators, sampling, state_callback=branch)
        self.candidates += count * rows_per_image
        scores = self._score(images, kept_labels, previews).view(count, width)
        selectors = [selection_generator(g) for g in generators] if self.selection_temperature else None
        best = choose(scores, self.selection_temperature, selectors)  # the final choice is made among full images
        chosen = (torch.arange(count) * width + best).numpy()
        # its first candidate: the first full image the beam finished (the plain sample when it survived)
        cost = self._paths_cost(width, factor)
        kept_scores = scores[torch.arange(count), best]
        return self._output(images[chosen], labels, kept_scores, scores[:, 0].clone(), cost)
