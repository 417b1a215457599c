"""VARRetrievalPipeline: class-conditional VAR that draws on retrieved real images (after Re-Imagen).

For each sample it retrieves k real images of the asked label from a datastore (``diffusers-var index``), or takes
reference images given in the call, and conditions every scale on their token pyramids: through the transformer's
retrieval attention when it was trained with it (``retrieval_mode="trained"``), by mixing each scale's distribution
with the neighbours' codes (``"training_free"``, any VAR), or both (``"combined"``, the default for a model with
retrieval attention). A label the model never trained on (a name its ``id2label`` lacks) is drawn from the null
class and its neighbours alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import logging

from ..retrieval.conditioning import RETRIEVAL_MODES, RetrievalConditioning
from ..retrieval.mixing import RETRIEVAL_SCHEDULES, retrieval_weights
from ..validation import check_generator, check_integer
from .image_inputs import ImageInput, prepare_images
from .state import VARSamplingState
from .var import VARPipeline, VARPipelineOutput

logger = logging.get_logger(__name__)

# seed domain of the neighbour draws: retrieval never consumes the sampling generator, so λ = 0 (or no neighbours)
# keeps the plain call's tokens
_RETRIEVAL_SEED_OFFSET = 0x5EED_0000

DEFAULT_TRAINING_FREE_NEIGHBOURS = 4
# training-free defaults, chosen on the long-tail recipe's model (30 samples each of a held-out and a frequent
# digit): λ = 0.8 with no smoothing or agreement weighting drew the held-out digit right 90 % of the time and the
# frequent one 100 %, as far from the real digits as real handwriting is; spatial smoothing (0.25) mixes codes of
# neighbouring positions into incoherent residuals (10-33 % on the held-out digit), and agreement weighting copies
DEFAULT_RETRIEVAL_WEIGHT = 0.8
DEFAULT_RETRIEVAL_SMOOTHING = 0.0
DEFAULT_RETRIEVAL_SHARPNESS = 0.0
DEFAULT_RETRIEVAL_GUIDANCE_SCALE = 1.0
NEIGHBOUR_SELECTIONS = ("neighbourhood", "random")


@dataclass
class VARRetrievalPipelineOutput(VARPipelineOutput):
    """:class:`VARPipelineOutput` plus what was retrieved.

    Attributes:
        label_names: the label asked for each image (a datastore name, or the model's class name).
        neighbour_rows: (B, k) datastore rows of each image's neighbours (``None`` with reference images).
        retrieval_mode: ``"trained"``, ``"training_free"`` or ``"combined"``.
    """

    label_names: list[str] | None = None
    neighbour_rows: np.ndarray | None = None
    retrieval_mode: str | None = None


class VARRetrievalPipeline(VARPipeline):
    r"""Sample with retrieved neighbours: rare classes from a few examples, unseen classes from examples alone.

    It has :class:`VARPipeline`'s components, loading and saving; ``VARRetrievalPipeline(**pipe.components,
    **pipe.parameters)`` shares a loaded pipeline's models. The datastore is an argument of the call (it is data,
    not a model component).

    Example:
        ```py
        >>> from diffusers_var import VARRetrievalPipeline
        >>> from diffusers_var.retrieval import RetrievalDatastore
        >>> pipe = VARRetrievalPipeline.from_pretrained("recipe/pipeline")
        >>> store = RetrievalDatastore.load("recipe/datastore")
        >>> out = pipe(["7", "3"], datastore=store, generator=torch.Generator().manual_seed(0))
        >>> out.label_names, out.retrieval_mode
        (['7', '3'], 'combined')
        ```
    """

    def default_retrieval_mode(self) -> str:
        """``"combined"`` (the attention and the mixing) when the transformer has retrieval attention, else
        ``"training_free"``. Why not the attention alone: on the long-tail recipe (digit 5 held out, 3 and 8 rare,
        50 samples per digit) it drew the held-out digit right 22 % of the time and the rare ones 77 %, where the
        combination drew them 100 % and 98 % (frequent digits 99.7 % either way), no closer to the real digits
        than real handwriting is. Trained on nine classes, the attention learns which known class the neighbours
        show more than how to copy what they show."""
        return "combined" if self.transformer.has_retrieval else "training_free"

    @torch.no_grad()
    def __call__(
        self,
        class_labels: str | int | list[str | int] | None = None,
        datastore=None,
        reference_images: ImageInput | None = None,
        num_neighbours: int | None = None,
        retrieval_mode: str | None = None,
        retrieval_weight: float | Sequence[float] | None = None,
        retrieval_schedule: str = "constant",
        retrieval_smoothing: float | None = None,
        retrieval_sharpness: float | None = None,
        retrieval_guidance_scale: float = DEFAULT_RETRIEVAL_GUIDANCE_SCALE,
        neighbour_selection: str = "neighbourhood",
        guidance_scale: float = 2.5,
        top_k: int | None = 900,
        top_p: float | None = 0.96,
        temperature: float = 1.0,
        more_smooth: bool = False,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        state_callback: Callable[[VARPipeline, int, VARSamplingState], VARSamplingState | None] | None = None,
        output_scales: bool = False,
    ) -> VARRetrievalPipelineOutput | tuple:
        r"""Generate images of the given labels, conditioned on retrieved neighbours.

        Args:
            class_labels: with a ``datastore``, its label names (str) or the model's class ids; a name the model's
                ``id2label`` lacks is an unseen class, drawn with the null class from its neighbours alone. With
                ``reference_images``, the model's class ids or names (a ``None`` entry: unconditional), or ``None``
                for random classes, as in :meth:`VARPipeline.__call__`.
            datastore: a :class:`~diffusers_var.retrieval.RetrievalDatastore` tokenized with this pipeline's
                tokenizer: each image gets ``num_neighbours`` examples of its label, drawn from a generator derived
                from ``generator`` (the sampling draws stay those of a plain call).
            reference_images: instead of a datastore: the images every sample is conditioned on (k = their count),
                in [0, 1] at the model's size.
            num_neighbours: k; default the transformer's ``num_neighbours`` when it attends, else 4.
            retrieval_mode: ``"combined"`` (attention and mixing: the default when the transformer has retrieval
                attention, see :meth:`default_retrieval_mode`), ``"trained"`` (attention alone) or
                ``"training_free"`` (the default otherwise).
            retrieval_weight: training-free and combined: λ in [0, 1] (default 0.8), or one λ per scale.
            retrieval_schedule: training-free: ``"constant"`` or ``"linear_decay"`` (λ at the first scale to 0 at
                the last).
            retrieval_smoothing: training-free: weight of the adjacent positions in ``p_retrieved`` (default 0).
            retrieval_sharpness: training-free: how strongly the neighbours whose codes the sample has taken so far
                lead the next scale (``softmax(sharpness · agreement)`` over the neighbours; default 0: all alike).
            retrieval_guidance_scale: trained and combined: guidance on retrieval (rows without neighbours), 1.0 =
                none.
            neighbour_selection: with a datastore, ``"neighbourhood"`` (default: an anchor image of the label is
                drawn, and its k nearest images of the label are the neighbours, the anchor excluded, as in
                training) or ``"random"`` (k images of the label drawn uniformly).
            guidance_scale, top_k, top_p, temperature, more_smooth, num_images_per_prompt, generator, output_type,
            return_dict, callback_on_step_end, callback_on_step_end_tensor_inputs, state_callback, output_scales:
                as in :meth:`VARPipeline.__call__`.
        """
        self._check_call_arguments(
            guidance_scale, top_k, top_p, temperature, more_smooth, output_type, generator,
            callback_on_step_end, callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        mode = retrieval_mode or self.default_retrieval_mode()
        if mode not in RETRIEVAL_MODES:
            raise ValueError(f"retrieval_mode must be one of {RETRIEVAL_MODES}, got {mode!r}.")
        if retrieval_schedule not in RETRIEVAL_SCHEDULES:
            raise ValueError(f"retrieval_schedule must be one of {RETRIEVAL_SCHEDULES}, got {retrieval_schedule!r}.")
        if mode == "trained" and any(  # "combined" takes both kinds of knobs
            x is not None for x in (retrieval_weight, retrieval_smoothing, retrieval_sharpness)
        ):
            raise ValueError(
                "retrieval_weight, retrieval_smoothing and retrieval_sharpness belong to retrieval_mode="
                "'training_free' or 'combined'; the trained mode (the attention alone) has retrieval_guidance_scale."
            )
        if (datastore is None) == (reference_images is None):
            raise ValueError("Pass a datastore or reference_images (one of the two) to retrieve from.")
        if num_neighbours is not None:
            check_integer("num_neighbours", num_neighbours, minimum=1)

        if datastore is not None:
            if num_neighbours is None:
                num_neighbours = (
                    self.transformer.config.num_neighbours
                    if mode != "training_free"
                    else DEFAULT_TRAINING_FREE_NEIGHBOURS
                )
            names, labels = self.datastore_labels(datastore, class_labels, num_images_per_prompt)
            datastore.check_tokenizer(self.vqvae)
            check_generator(generator, len(names))
            if neighbour_selection not in NEIGHBOUR_SELECTIONS:
                raise ValueError(
                    f"neighbour_selection must be one of {NEIGHBOUR_SELECTIONS}, got {neighbour_selection!r}."
                )
            draw = datastore.neighbourhood if neighbour_selection == "neighbourhood" else datastore.examples_of
            rows = np.stack(
                [
                    draw(name, num_neighbours, generator=g)
                    for name, g in zip(names, self._retrieval_generators(generator, len(names)))
                ]
            )
            flat = datastore.token_maps(self.vqvae, rows.reshape(-1))
            neighbour_maps = [m.view(len(names), num_neighbours, *m.shape[1:]) for m in flat]
        else:
            labels = self._call_labels(class_labels, num_images_per_prompt, generator, allow_unconditional=True)
            names = [self._name_of(int(c)) for c in labels]
            pixels = prepare_images(reference_images, self.vqvae.image_size, "reference_images")
            if num_neighbours not in (None, pixels.shape[0]):
                raise ValueError(
                    f"num_neighbours={num_neighbours} but {pixels.shape[0]} reference_images were given: every "
                    "reference image is a neighbour; leave num_neighbours out."
                )
            references = self.vqvae.tokenize(pixels.to(self._execution_device, self.vqvae.dtype))
            neighbour_maps = [m.unsqueeze(0).expand(len(labels), *m.shape) for m in references]
            rows = None

        retrieval = RetrievalConditioning(
            neighbour_token_maps=neighbour_maps,
            mode=mode,
            weights=None if mode == "trained" else self._weights(retrieval_weight, retrieval_schedule),
            smoothing=DEFAULT_RETRIEVAL_SMOOTHING if retrieval_smoothing is None else retrieval_smoothing,
            guidance_scale=retrieval_guidance_scale,
            sharpness=DEFAULT_RETRIEVAL_SHARPNESS if retrieval_sharpness is None else retrieval_sharpness,
        )
        retrieval.check(self, len(labels))
        out = self._sample(
            labels,
            guidance_scale=guidance_scale,
            top_k=top_k,
            top_p=top_p,
            temperature=temperature,
            more_smooth=more_smooth,
            generator=generator,
            output_type=output_type,
            return_dict=True,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            state_callback=state_callback,
            output_scales=output_scales,
            retrieval=retrieval,
        )
        output = VARRetrievalPipelineOutput(**out, label_names=names, neighbour_rows=rows, retrieval_mode=mode)
        return output if return_dict else output.to_tuple()

    # -- labels and neighbours -------------------------------------------------------------------------------------

    def _weights(self, retrieval_weight, schedule: str) -> list[float]:
        weight = DEFAULT_RETRIEVAL_WEIGHT if retrieval_weight is None else retrieval_weight
        return retrieval_weights(weight, self.scheduler.num_scales, schedule)

    def _name_of(self, class_id: int) -> str:
        if class_id == self.transformer.config.num_classes:
            return "<unconditional>"
        names = (self.config.id2label or {}).get(class_id)
        return names.split(",")[0].strip() if names else str(class_id)

    def model_class_of(self, name: str) -> int:
        """The model's class id for a label name, or the null class for a name the model never trained on."""
        if name in self.labels:
            return self.get_label_ids(name)[0]
        return self.transformer.config.num_classes

    def datastore_labels(
        self, datastore, class_labels, num_images_per_prompt: int = 1
    ) -> tuple[list[str], torch.LongTensor]:
        """The label name and the model's class id of every image (each label repeated ``num_images_per_prompt``
        times): names must be the datastore's; class ids name the model's classes; a name the model's ``id2label``
        lacks is the null class (unseen). A ValueError lists the datastore's labels otherwise."""
        check_integer("num_images_per_prompt", num_images_per_prompt, minimum=1)
        if class_labels is None:
            raise ValueError(
                f"With a datastore, class_labels names what to retrieve: give label names of the datastore, e.g. "
                f"{datastore.label_names[:5]}."
            )
        entries = [class_labels] if isinstance(class_labels, (str, int)) else list(class_labels)
        names = []
        for entry in entries:
            if isinstance(entry, bool) or not isinstance(entry, (str, int, np.integer)):
                raise ValueError(f"class_labels entries must be label names or class ids, got {entry!r}.")
            if isinstance(entry, str):
                names.append(entry)
            else:
                class_id = self._class_ids([int(entry)])[0]
                names.append(self._name_of(class_id))
        unknown = sorted({n for n in names if n not in datastore.label_names})
        if unknown:
            raise ValueError(
                f"The datastore has no label(s) {unknown}; it has {datastore.label_names[:10]}"
                f"{' …' if len(datastore.label_names) > 10 else ''}. Add their images with diffusers-var index."
            )
        if not self.labels and any(isinstance(entry, str) for entry in entries):
            logger.warning(
                "This pipeline has no class names (id2label), so every datastore label is drawn as an unseen class "
                "(the null class and its neighbours alone). Build it with **pipe.parameters, or set_id2label(...)."
            )
        names = [n for n in names for _ in range(num_images_per_prompt)]
        labels = torch.tensor([self.model_class_of(n) for n in names])
        return names, labels

    @staticmethod
    def _retrieval_generators(generator, count: int) -> list[torch.Generator]:
        """One CPU generator per image for the neighbour draws, derived from (never drawn from) ``generator``; without
        one, a seed from the global RNG (as a call without a generator draws everything from it)."""
        if isinstance(generator, (list, tuple)):
            return [torch.Generator().manual_seed(g.initial_seed() + _RETRIEVAL_SEED_OFFSET) for g in generator]
        seed = generator.initial_seed() if generator is not None else int(torch.randint(2**62, (1,)))
        shared = torch.Generator().manual_seed(seed + _RETRIEVAL_SEED_OFFSET)
        return [shared] * count
