"""VARSearchPipeline: VARPipeline plus inference-time search with a verifier under a compute budget."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput

from ..search.algorithms import ALGORITHMS, IMAGES, SearchSampler, child_generators
from ..validation import check_generator
from .var import OUTPUT_TYPES, VARPipeline

# the knobs of each algorithm (anything else given for it is an error, not ignored)
ALGORITHM_OPTIONS = {
    "random": ("selection_temperature",),
    "zero-order": ("neighbours", "redraw_fraction", "redraw_scales"),
    "paths": ("beam_width", "branch_factor", "branch_scales", "selection_temperature"),
}


@dataclass
class VARSearchPipelineOutput(BaseOutput):
    """Output of :class:`VARSearchPipeline`.

    Attributes:
        images: the images the search kept, as ``output_type`` (``"pil"``, ``"np"`` or ``"pt"``; the uint8 pixels the
            verifier saw, / 255).
        class_labels: (B,).
        scores: the verifier's score of each kept image; ``first_scores``: of each image's first candidate.
        budget_used: (B,) transformer compute per image, in plain samples (never above the budget).
        verifier_calls: images and previews the verifier scored (not counted in the budget).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    class_labels: torch.LongTensor
    scores: torch.Tensor
    first_scores: torch.Tensor
    budget_used: torch.Tensor
    verifier_calls: int


class VARSearchPipeline(VARPipeline):
    r"""Sample with inference-time search: ``random`` (best of N), ``zero-order`` (neighbours of a pivot) or
    ``paths`` (a beam over scales), each scored by a verifier and limited by a budget in plain samples.

    It has :class:`VARPipeline`'s components and loading (``VARSearchPipeline(**pipe.components, **pipe.parameters)``,
    ``from_pretrained`` with bundled names); the search runs VARPipeline's own sampling loop. With budget 1, random
    and paths return the plain sample of each image's generator (zero-order needs budget ≥ 1 + neighbours).

    Example:
        ```py
        >>> import torch
        >>> from diffusers_var import VARSearchPipeline
        >>> from diffusers_var.search import ClassifierVerifier
        >>> pipe = VARSearchPipeline.from_pretrained("var-digits")
        >>> out = pipe([3, 7], verifier=ClassifierVerifier("digits-classifier"), algorithm="paths", budget=8,
        ...            generator=torch.Generator().manual_seed(0))
        >>> out.budget_used.tolist(), out.scores.exp()  # per image: compute used, p(y|x) of the kept image
        ```
    """

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | list[int | str] | torch.Tensor | None = None,
        verifier=None,
        algorithm: str = "random",
        budget: float = 4.0,
        guidance_scale: float = 2.5,
        top_k: int | None = 900,
        top_p: float | None = 0.96,
        temperature: float = 1.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        **search_options,
    ) -> VARSearchPipelineOutput | tuple:
        r"""Search for images of the given classes.

        Args:
            class_labels, guidance_scale, top_k, top_p, temperature, num_images_per_prompt, output_type, return_dict:
                as :class:`VARPipeline` (``output_type`` ``"latent"`` is not available: the verifier needs pixels).
            verifier: scores images of a class, higher is better (see :mod:`diffusers_var.search.verifiers`).
            algorithm: ``"random"``, ``"zero-order"`` or ``"paths"``.
            budget: transformer compute per image, in plain samples (≥ 1; guidance counted on both sides).
            generator: one generator (each image's own is derived from it, deterministically) or one per image.
            search_options: zero-order ``neighbours``, ``redraw_fraction``, ``redraw_scales``; paths
                ``beam_width``, ``branch_factor``, ``branch_scales``; random and paths ``selection_temperature`` (see
                :class:`~diffusers_var.search.algorithms.SearchSampler`).
        """
        if verifier is None or not callable(verifier):
            raise ValueError(
                "verifier is required: a callable scoring (images, class_labels), e.g. "
                "diffusers_var.search.ClassifierVerifier('digits-classifier')."
            )
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}.")
        unknown = sorted(set(search_options) - set(ALGORITHM_OPTIONS[algorithm]))
        if unknown:
            allowed = ", ".join(ALGORITHM_OPTIONS[algorithm]) or "none"
            raise ValueError(
                f"{', '.join(unknown)} are not options of algorithm={algorithm!r} (its options: {allowed})."
            )
        if output_type not in OUTPUT_TYPES or output_type == "latent":
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt' for a search, got {output_type!r}.")
        check_generator(generator)
        labels = self._call_labels(class_labels, num_images_per_prompt, generator, allow_unconditional=False)
        count = labels.shape[0]
        if isinstance(generator, (list, tuple)):
            check_generator(generator, count)
            generators = list(generator)
        else:
            # no generator: one seeded from the global RNG (torch.manual_seed makes the call reproducible)
            source = (
                generator
                if generator is not None
                else torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
            )
            generators = child_generators(source, count, IMAGES)
        if hasattr(verifier, "check_classes"):
            verifier.check_classes(self.transformer.config.num_classes)
        sampler = SearchSampler(self, verifier, algorithm, budget, **search_options)
        found = sampler(
            labels.tolist(), generators, guidance_scale=guidance_scale, top_k=top_k, top_p=top_p,
            temperature=temperature,
        )  # fmt: skip
        images = found.images.astype(np.float32) / 255
        if output_type == "pt":
            images = torch.from_numpy(images).permute(0, 3, 1, 2)
        elif output_type == "pil":
            images = self.numpy_to_pil(images)
        output = VARSearchPipelineOutput(
            images=images, class_labels=found.class_labels, scores=found.scores, first_scores=found.first_scores,
            budget_used=found.budget_used, verifier_calls=found.verifier_calls,
        )  # fmt: skip
        return output if return_dict else output.to_tuple()
