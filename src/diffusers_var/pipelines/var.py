"""VARPipeline: class-conditional image generation by next-scale prediction."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput

from ..hub import download_snapshot, push_pipeline_to_hub
from ..models.transformer import VARTransformer
from ..models.vqvae import MultiScaleVQVAE
from ..pretrained import BUNDLED_MODELS, bundled_model_path
from ..remote_code import package_only, remote_code_layout, write_remote_code
from ..retrieval.conditioning import RetrievalConditioning
from ..retrieval.mixing import neighbour_agreement_weights, retrieved_token_distribution
from ..saving import install_pipeline_save, save_folder
from ..schedulers.scale import VARScaleScheduler
from ..validation import NonFiniteError, check_generator, check_integer, class_label_entries
from .state import VARSamplingState

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class VARPipelineOutput(BaseOutput):
    """Output of :class:`VARPipeline`.

    Attributes:
        images: PIL images, a (B, H, W, 3) array or a (B, 3, H, W) tensor in [0, 1]; with ``output_type="latent"``,
            the latents f̂ (B, Cvae, h, w) that ``pipe.vqvae.decode`` turns into images in [-1, 1].
        class_labels: the class id of each image, (B,) (``num_classes`` for an unconditional one).
        token_maps: the sampled codes, one (B, pn, pn) tensor per scale (fewer if a callback interrupted the call).
        scale_images: with ``output_scales=True``, the images decoded from f̂ after each scale (one batch per scale,
            as ``output_type``; the last equals ``images``).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    class_labels: torch.LongTensor
    token_maps: list[torch.LongTensor] | None = None
    scale_images: list | None = None


def check_no_adapters(pipeline: VARPipeline) -> None:
    """Refuse to save a pipeline whose transformer carries LoRA adapters: transformers would write only the adapter
    in place of the transformer's weights, and the folder would not load."""
    if getattr(pipeline.transformer, "peft_config", None):
        raise ValueError(
            "The transformer carries LoRA adapters, so its save would hold only the adapter. Save the adapter with "
            "pipe.transformer.save_pretrained(folder), or bake it in with pipe.fuse_lora() and "
            "pipe.unload_lora_weights() first."
        )


def check_components(vqvae: MultiScaleVQVAE, transformer: VARTransformer, scheduler: VARScaleScheduler) -> None:
    """Raise a ValueError naming the disagreement if the three components cannot work together."""
    patch_nums = {
        "vqvae": tuple(vqvae.config.patch_nums),
        "transformer": tuple(transformer.config.patch_nums),
        "scheduler": tuple(scheduler.config.patch_nums),
    }
    if len(set(patch_nums.values())) != 1:
        raise ValueError(f"The components disagree on patch_nums: {patch_nums}. Use components built for one model.")
    if vqvae.config.vocab_size != transformer.config.vocab_size:
        raise ValueError(
            f"The transformer predicts {transformer.config.vocab_size} codes but the vqvae has "
            f"vocab_size={vqvae.config.vocab_size}."
        )
    if vqvae.config.z_channels != transformer.config.latent_channels:
        raise ValueError(
            f"The transformer reads latent_channels={transformer.config.latent_channels} but the vqvae has "
            f"z_channels={vqvae.config.z_channels} (Cvae)."
        )


class VARPipeline(DiffusionPipeline):
    r"""Class-conditional generation with VAR (Visual AutoRegressive modeling, next-scale prediction).

    The transformer predicts each scale's whole token map from the class and all coarser scales; the scheduler
    guides and samples it; the tokenizer turns the final pyramid into an image.

    Args:
        vqvae: the multi-scale tokenizer.
        transformer: the next-scale predictor.
        scheduler: scale, guidance and sampling schedule.
        id2label: class id → name (comma-separated synonyms allowed), for :meth:`get_label_ids`.

    Guidance follows diffusers: ``guidance_scale=1`` is unguided, and the official ``cfg=c`` is
    ``guidance_scale=1 + c`` under the default linear schedule.

    Example:
        ```py
        >>> import torch
        >>> from diffusers_var import VARPipeline
        >>> pipe = VARPipeline.from_pretrained("path/to/var-d16")  # a folder made by `diffusers-var convert`
        >>> images = pipe(class_labels=["golden retriever", 207], guidance_scale=2.5, top_k=900, top_p=0.96,
        ...               generator=torch.Generator().manual_seed(0)).images
        ```
    """

    # The transformer and the tokenizer's quantizer both run at every scale; under model offload the tokenizer joins
    # the transformer on the device for the loop, and the transformer leaves when the decoder runs.
    model_cpu_offload_seq = "transformer->vqvae"
    _callback_tensor_inputs = ["latents", "token_maps"]

    def __init__(
        self,
        vqvae: MultiScaleVQVAE,
        transformer: VARTransformer,
        scheduler: VARScaleScheduler,
        id2label: dict[int, str] | dict[str, str] | None = None,  # JSON gives str keys on load
    ):
        super().__init__()
        check_components(vqvae, transformer, scheduler)
        self.register_modules(vqvae=vqvae, transformer=transformer, scheduler=scheduler)
        self.set_id2label(id2label)

    # -- speed -----------------------------------------------------------------------------------------------------

    def compile(
        self, mode: str | None = None, backend: str = "inductor", fullgraph: bool = False, **options
    ) -> VARPipeline:
        r"""Compile the transformer's blocks and the tokenizer's decoder with ``torch.compile``, in place.

        Regional compilation of the blocks with static shapes (``dynamic=False``): the first call at each batch
        size compiles every scale, later calls reuse the graphs; ``torch._dynamo.config.recompile_limit`` is raised
        to at least 64 for that. All blocks share one graph per scale (see
        :mod:`diffusers_var.pipelines.compilation`). The sampling loop stays eager; weights, ``state_dict`` keys and
        saving are unchanged. Call it after moving the pipeline to its device.

        Args:
            mode: inductor's mode: ``"reduce-overhead"`` on CUDA asks for CUDA graphs (batch-1 latency, where
                kernel launches dominate; not yet measured on a GPU); ``"max-autotune"`` searches kernels;
                ``None``: inductor's default.
            backend: a ``torch.compile`` backend. When it cannot compile here (inductor without a C++ compiler on
                CPU or without triton on CUDA), a warning says why and sampling stays eager: the same results, not
                faster.
            fullgraph, options: passed to ``torch.compile``.

        Returns:
            The pipeline itself.

        Example:
            ```py
            >>> pipe = VARPipeline.from_pretrained("var-digits").compile()
            >>> images = pipe(class_labels=[3, 7], generator=torch.Generator().manual_seed(0)).images
            ```
        """
        from .compilation import compile_pipeline

        return compile_pipeline(self, mode=mode, backend=backend, fullgraph=fullgraph, **options)

    # -- class labels ----------------------------------------------------------------------------------------------

    def set_id2label(self, id2label: dict[int, str] | dict[str, str] | None) -> None:
        """Set the class names (comma-separated synonyms per id) that :meth:`get_label_ids` and the CLI resolve."""
        id2label = {int(k): v for k, v in id2label.items()} if id2label else None
        self.register_to_config(id2label=id2label)
        self.labels, self._ambiguous_labels = {}, {}
        for class_id, names in (id2label or {}).items():
            for name in (n.strip() for n in names.split(",")):
                if self.labels.setdefault(name, class_id) != class_id:  # e.g. ImageNet's two "crane"s
                    self._ambiguous_labels.setdefault(name, {self.labels[name]}).add(class_id)

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Map class names (any of the comma-separated synonyms in ``id2label``) to class ids."""
        names = [label] if isinstance(label, str) else list(label)
        unknown = [n for n in names if n not in self.labels]
        if unknown:
            hint = (
                f" Known names include {sorted(self.labels)[:5]}."
                if self.labels
                else " This pipeline has no id2label (built from another pipeline? add **pipe.parameters to "
                "**pipe.components to share its class names)."
            )
            raise ValueError(f"Unknown class name(s) {unknown}.{hint}")
        ambiguous = [n for n in names if n in self._ambiguous_labels]
        if ambiguous:
            name = ambiguous[0]
            raise ValueError(
                f"The class name {name!r} names classes {sorted(self._ambiguous_labels[name])}; pass the id instead."
            )
        return [self.labels[n] for n in names]

    def _class_ids(self, class_labels, allow_unconditional: bool = False) -> list[int]:
        """Class ids for ``class_labels`` (ints, names, a 1-D integer tensor; ``None`` entries, where allowed, are
        the null class: unconditional images). Anything else is a ValueError naming the entry."""
        entries = class_label_entries(class_labels, allow_unconditional)
        num_classes = self.transformer.config.num_classes
        ids = [
            num_classes if entry is None else self.get_label_ids(entry)[0] if isinstance(entry, str) else entry
            for entry in entries
        ]
        bad = [c for c, entry in zip(ids, entries) if entry is not None and not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"Class id(s) {bad} out of range: this model has classes 0 to {num_classes - 1}.")
        return ids

    def _call_labels(
        self, class_labels, num_images_per_prompt: int, generator, allow_unconditional: bool
    ) -> torch.LongTensor:
        """The class of every image of a sampling call: ``class_labels`` each repeated ``num_images_per_prompt``
        times, or (``None``) that many random classes drawn from ``generator``."""
        check_integer("num_images_per_prompt", num_images_per_prompt, minimum=1)
        if class_labels is not None:
            labels = torch.tensor(self._class_ids(class_labels, allow_unconditional=allow_unconditional))
            return labels.repeat_interleave(num_images_per_prompt)
        if isinstance(generator, (list, tuple)) and len(generator) != num_images_per_prompt:
            raise ValueError(
                f"Got {len(generator)} generators for num_images_per_prompt={num_images_per_prompt} random-class "
                "images; pass one generator, or one per image."
            )
        return self._random_class_labels(num_images_per_prompt, generator)

    def _labels_for_images(self, class_labels, count: int, one_image_many_labels: bool = False) -> torch.LongTensor:
        """The class of each of ``count`` given images (editing, reconstruction): one label (``None``: unconditional)
        for all, or one per image; with ``one_image_many_labels``, several labels for a single image."""
        if isinstance(class_labels, torch.Tensor) and class_labels.ndim == 0:
            class_labels = class_labels.item()
        single = class_labels is None or isinstance(class_labels, (int, str, np.integer))
        if single and not isinstance(class_labels, bool):
            class_labels = [class_labels] * count
        labels = torch.tensor(self._class_ids(class_labels, allow_unconditional=True))
        if labels.shape[0] != count and not (one_image_many_labels and count == 1):
            several = ", or one image with several labels" if one_image_many_labels else ""
            raise ValueError(
                f"Got {labels.shape[0]} class labels for {count} images: pass one label, one per image{several}."
            )
        return labels

    def _random_class_labels(self, count: int, generator) -> torch.LongTensor:
        """Draw classes uniformly from the generator before any token, as the official sampler does."""
        num_classes = self.transformer.config.num_classes
        if isinstance(generator, (list, tuple)):
            return torch.cat([self._random_class_labels(1, g) for g in generator])
        device = generator.device if generator is not None else torch.device("cpu")
        uniform = torch.full((1, num_classes), 1.0 / num_classes, device=device)
        return torch.multinomial(uniform, count, replacement=True, generator=generator).reshape(count).cpu()

    # -- the sampling loop: one state, stepped one scale at a time -------------------------------------------------

    @property
    def guidance_scale(self) -> float:
        """The guidance of the running call; a callback may change it for the remaining scales."""
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        """The number of scales of the running call (one step per scale)."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` in a callback to stop after the current scale and decode what there is."""
        return self._interrupt

    def prepare_sampling_state(
        self,
        class_labels: torch.LongTensor,
        guided: bool,
        device: torch.device | None = None,
        forced_token_maps: list[torch.LongTensor] | None = None,
        forced_masks: list[torch.BoolTensor] | None = None,
        retrieval: RetrievalConditioning | None = None,
    ) -> VARSamplingState:
        """A state before the first scale for samples of ``class_labels`` (with null-class rows if ``guided``).

        The labels are checked here, once: ids in [0, num_classes] (``num_classes`` is the null class, an
        unconditional sample); an id out of range would otherwise be a device-side assert on CUDA.
        ``forced_token_maps`` and ``forced_masks`` (both or neither; one (B, pn, pn) map per scale) make
        :meth:`sample_next_scale` keep the given tokens where the mask is True: zero-shot editing.
        ``retrieval`` conditions every scale on retrieved images (:class:`RetrievalConditioning`).
        """
        device = device or self._execution_device
        if not isinstance(class_labels, torch.Tensor) or class_labels.ndim != 1 or class_labels.is_floating_point():
            raise ValueError(f"class_labels must be a 1-D integer tensor of class ids, got {class_labels!r}.")
        num_classes = self.transformer.config.num_classes
        if class_labels.numel() == 0 or int(class_labels.min()) < 0 or int(class_labels.max()) > num_classes:
            raise ValueError(
                f"class_labels must be a non-empty tensor of ids in [0, {num_classes}] ({num_classes} is "
                f"unconditional), got {class_labels.tolist()}."
            )
        class_labels = class_labels.to(device)
        null = torch.full_like(class_labels, self.transformer.config.num_classes)
        # row groups: [conditional; null class (guidance on the class); no neighbours (guidance on retrieval)]
        retrieval_guided = retrieval is not None and retrieval.attends and retrieval.guidance_scale != 1.0
        groups = [class_labels] + ([null] if guided else []) + ([class_labels] if retrieval_guided else [])
        model_labels = torch.cat(groups)
        side = self.vqvae.config.patch_nums[-1]
        latents = torch.zeros(
            class_labels.shape[0], self.vqvae.config.z_channels, side, side, dtype=self.vqvae.dtype, device=device
        )
        kv_cache = self.transformer.allocate_kv_cache(model_labels.shape[0], device=device)
        state = VARSamplingState(class_labels, model_labels, kv_cache, latents)
        if retrieval is not None:
            retrieval.apply(self, state, guided)
        if (forced_token_maps is None) != (forced_masks is None):
            raise ValueError("forced_token_maps and forced_masks go together: pass both or neither.")
        if forced_token_maps is not None:
            self.vqvae.check_token_maps(forced_token_maps)
            batch = class_labels.shape[0]
            shapes = [(batch, side, side) for side in self.vqvae.config.patch_nums]
            if [tuple(t.shape) for t in forced_token_maps] != shapes or [
                (tuple(m.shape), m.dtype) for m in forced_masks
            ] != [(shape, torch.bool) for shape in shapes]:
                raise ValueError(
                    f"forced_token_maps and forced_masks must be one map per scale of shapes {shapes} (masks bool), "
                    "one row per sample."
                )
            state.forced_token_maps = [t.to(device, torch.long) for t in forced_token_maps]
            state.forced_masks = [m.to(device) for m in forced_masks]
        return state

    def sample_next_scale(
        self,
        state: VARSamplingState,
        guidance_scale: float = 2.5,
        top_k: int | None = 900,
        top_p: float | None = 0.96,
        temperature: float = 1.0,
        more_smooth: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
        retrieval_guidance_scale: float = 1.0,
    ) -> VARSamplingState:
        """Sample the state's next scale in place: the transformer's logits against the cache, the scheduler's draw,
        and the tokenizer adding the new tokens to the latents. Returns the state.

        With retrieval (see :class:`RetrievalConditioning`), the transformer sees the neighbours (trained mode) or
        the draw is mixed with their codes (training-free mode); ``retrieval_guidance_scale`` guides on retrieval
        in the trained mode when the state has rows without neighbours."""
        si = state.scale_index
        if si >= self.scheduler.num_scales:
            raise ValueError(f"The state has all {si} scales already.")
        if retrieval_guidance_scale != 1.0 and not state.retrieval_guided:
            raise ValueError(
                "retrieval_guidance_scale must stay 1.0 in a call that started without guidance on retrieval (there "
                "are no rows without neighbours to guide with); start it with retrieval_guidance_scale != 1."
            )
        if guidance_scale != 1.0 and not state.class_guided:
            raise ValueError(
                "guidance_scale must stay 1.0 in a call that started without guidance (there are no unconditional "
                "rows to guide with); start it with guidance_scale != 1 to change guidance along the way."
            )
        scale_input = None if si == 0 else self.vqvae.scale_input(state.latents, si)
        if scale_input is not None and state.guided:
            scale_input = torch.cat([scale_input] * state.row_groups)
        logits = self.transformer(  # explicit flags: a config asking for tuples or attention maps must not apply here
            state.model_labels,
            scale_input,
            kv_cache=state.kv_cache,
            scale_index=si,
            return_dict=True,
            output_attentions=False,
            output_hidden_states=False,
            neighbour_codes=state.neighbour_codes,
            neighbour_mask=state.neighbour_mask,
        ).logits
        state.neighbour_codes = None  # encoded into the cache at the first scale
        logits, guidance_scale = self._guided_logits(state, logits, si, guidance_scale, retrieval_guidance_scale)
        retrieval_probs, retrieval_weight = None, 0.0
        if state.neighbour_token_maps is not None and state.retrieval_weights[si] > 0:
            retrieval_weight = state.retrieval_weights[si]
            weights = neighbour_agreement_weights(
                state.token_maps, state.neighbour_token_maps[:si], state.retrieval_sharpness
            )
            retrieval_probs = retrieved_token_distribution(
                state.neighbour_token_maps[si], self.transformer.config.vocab_size, state.retrieval_smoothing, weights
            )
        step = self.scheduler.step(
            logits,
            si,
            guidance_scale,
            top_k,
            top_p,
            temperature,
            more_smooth,
            generator=generator,
            retrieval_probs=retrieval_probs,
            retrieval_weight=retrieval_weight,
        )
        del logits  # keep the peak down: nothing of this scale's logits outlives its step
        token_map, code_weights = step.token_map, step.code_weights
        if state.forced_masks is not None:
            # Editing: the whole map was drawn (the random stream stays the plain one); the kept positions take the
            # given tokens before f̂ sees them, so the finer scales are conditioned on the kept region.
            keep, forced = state.forced_masks[si], state.forced_token_maps[si]
            token_map = torch.where(keep, forced, token_map)
            if code_weights is not None:  # Gumbel smoothing: a kept position is its code exactly, not a soft mix
                one_hot = torch.nn.functional.one_hot(forced.flatten(1), code_weights.shape[-1])
                code_weights = torch.where(keep.flatten(1).unsqueeze(-1), one_hot.to(code_weights.dtype), code_weights)
        state.finite.append(step.finite)
        state.token_maps.append(token_map)
        state.latents = self.vqvae.accumulate_scale(state.latents, si, token_map, code_weights)
        return state

    def _guided_logits(
        self,
        state: VARSamplingState,
        logits: torch.Tensor,
        scale_index: int,
        guidance_scale: float,
        retrieval_guidance_scale: float,
    ) -> tuple[torch.Tensor, float]:
        """The logits and guidance the scheduler's step takes. Plain guidance is left to the scheduler (the official
        arithmetic, bit for bit); with rows without neighbours, the two guidances are combined here (Re-Imagen):
        ``c + t_class·(c − u_class) + t_retrieval·(c − u_retrieval)``, each t on the scheduler's ramp."""
        batch = state.batch_size
        if not state.retrieval_guided:
            if state.guided and guidance_scale == 1.0:
                return logits[:batch], 1.0  # guidance switched off mid-call: the conditional rows alone
            return logits, guidance_scale
        groups = logits.chunk(state.row_groups)
        conditional = guided = groups[0]
        if state.class_guided and guidance_scale != 1.0:
            t = self.scheduler.guidance_weight(scale_index, guidance_scale)
            guided = guided + t * (conditional - groups[1])
        if retrieval_guidance_scale != 1.0:
            t = self.scheduler.guidance_weight(scale_index, retrieval_guidance_scale)
            guided = guided + t * (conditional - groups[-1])
        return guided, 1.0

    @torch.no_grad()
    def decode_state(self, state: VARSamplingState, output_type: str = "pil"):
        """The state's images as ``output_type``: raises :class:`NonFiniteError` first if any scale's logits were
        not finite (the draws went on so the loop could finish, but the image would be noise)."""
        self._check_finite_logits(state.finite)
        return self.decode_latents(state.latents, output_type)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, output_type: str = "pil"):
        """Latents f̂ → images in [0, 1] as ``output_type`` (``"latent"`` returns them as they are); NaN or inf in
        the latents or the decoded pixels raise :class:`NonFiniteError`. (Only :meth:`decode_state` also knows
        whether the logits that chose the tokens were finite.)"""
        if output_type == "latent":
            if not bool(torch.isfinite(latents).all()):
                raise NonFiniteError("The latents hold NaN or inf: the tokenizer's codebook or φ weights are damaged.")
            return latents
        images = (self.vqvae.decode(latents).clamp(-1, 1) + 1) / 2  # decode raises on NaN/inf pixels
        if output_type == "pt":
            return images
        images = images.permute(0, 2, 3, 1).float().cpu().numpy()
        return self.numpy_to_pil(images) if output_type == "pil" else images

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | list[int | str | None] | torch.Tensor | None = None,
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
    ) -> VARPipelineOutput | tuple:
        r"""Generate images of the given classes.

        Args:
            class_labels: class ids or names (``id2label``), a 1-D integer tensor, or ``None`` to draw
                ``num_images_per_prompt`` random classes from ``generator``. A ``None`` entry in a list asks for an
                unconditional image (the null class that guidance uses).
            guidance_scale: classifier-free guidance, 1.0 = none; official ``cfg=c`` is ``1 + c``.
            top_k: keep the k most likely codes (0 or None = all). top_p: nucleus mass in (0, 1] (1.0 or None = all).
            temperature: divides the guided logits.
            more_smooth: the official Gumbel smoothing of the code embeddings (visualisation, not for FID).
            num_images_per_prompt: images per class label.
            generator: a ``torch.Generator`` (a CPU one reproduces the official sampler's draws), or one per image.
            output_type: ``"pil"``, ``"np"``, ``"pt"``, or ``"latent"``: the latents f̂ (B, Cvae, h, w), which
                ``pipe.vqvae.decode(latents)`` turns into images in [-1, 1]. The token maps are in every output's
                ``token_maps``.
            callback_on_step_end: called after each scale as ``fn(pipe, scale_index, scale_index, kwargs)`` with the
                tensors named in ``callback_on_step_end_tensor_inputs`` (``"latents"``: f̂ so far; ``"token_maps"``:
                the maps sampled so far); returning a new ``"latents"`` changes what the next scales see. A callback
                may set ``pipe._guidance_scale`` for the remaining scales, or ``pipe._interrupt = True`` to stop and
                decode the coarser image it has. diffusers' ``PipelineCallback`` classes work too.
            state_callback: called after each scale (after ``callback_on_step_end``) as ``fn(pipe, scale_index,
                state)`` with the whole :class:`VARSamplingState`; it may return another state to continue with,
                of any batch size, e.g. ``state.select(rows)`` to finish only the best of several candidates
                (rejection sampling and search over scales are built on this). With one generator per image, the
                state's ``generators`` follow its rows. The output holds the final state's images and labels.
            output_scales: also return, in the output's ``scale_images``, the image decoded from f̂ after each
                scale (one batch per scale, as ``output_type``): how the image forms, coarse to fine. Costs one
                decoder pass per scale.

        Defaults are the official FID settings (cfg 1.5, top-k 900, top-p 0.96).
        """
        self._check_call_arguments(
            guidance_scale, top_k, top_p, temperature, more_smooth, output_type, generator,
            callback_on_step_end, callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        labels = self._call_labels(class_labels, num_images_per_prompt, generator, allow_unconditional=True)
        return self._sample(
            labels,
            guidance_scale=guidance_scale,
            top_k=top_k,
            top_p=top_p,
            temperature=temperature,
            more_smooth=more_smooth,
            generator=generator,
            output_type=output_type,
            return_dict=return_dict,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            state_callback=state_callback,
            output_scales=output_scales,
        )

    def _check_call_arguments(
        self, guidance_scale, top_k, top_p, temperature, more_smooth, output_type, generator, callback, tensor_inputs
    ) -> list[str]:
        """Check a call's sampling and output arguments before any work; returns the callback's tensor inputs."""
        self.scheduler.check_sampling_args(guidance_scale, top_k, top_p, temperature, more_smooth)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        check_generator(generator)
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = callback.tensor_inputs
        tensor_inputs = tensor_inputs or []
        if not set(tensor_inputs) <= set(self._callback_tensor_inputs):
            raise ValueError(
                f"callback_on_step_end_tensor_inputs may only name {self._callback_tensor_inputs}, got {tensor_inputs}."
            )
        return tensor_inputs

    def _sample(
        self,
        labels: torch.LongTensor,
        *,
        guidance_scale: float,
        top_k: int | None,
        top_p: float | None,
        temperature: float,
        more_smooth: bool,
        generator: torch.Generator | list[torch.Generator] | None,
        output_type: str,
        return_dict: bool,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs: list[str] | None,
        state_callback,
        output_scales: bool,
        forced_token_maps: list[torch.LongTensor] | None = None,
        forced_masks: list[torch.BoolTensor] | None = None,
        retrieval: RetrievalConditioning | None = None,
    ) -> VARPipelineOutput | tuple:
        """The sampling loop every pipeline of this package runs: samples of ``labels`` (class ids, one per
        image), scale by scale, with the callbacks, previews, forced tokens (editing) and retrieval as options."""
        tensor_inputs = self._check_call_arguments(
            guidance_scale, top_k, top_p, temperature, more_smooth, output_type, generator,
            callback_on_step_end, callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        if not isinstance(output_scales, bool):
            raise ValueError(f"output_scales must be True or False, got {output_scales!r}.")
        check_generator(generator, labels.shape[0])
        self._guidance_scale, self._interrupt = guidance_scale, False
        self._num_timesteps = self.scheduler.num_scales
        self.scheduler.set_timesteps(device=self._execution_device)
        state = self.prepare_sampling_state(
            labels,
            guided=guidance_scale != 1.0,
            forced_token_maps=forced_token_maps,
            forced_masks=forced_masks,
            retrieval=retrieval,
        )
        retrieval_guidance_scale = 1.0 if retrieval is None else retrieval.guidance_scale
        if isinstance(generator, (list, tuple)):
            state.generators = list(generator)
        scale_images = [] if output_scales else None
        for si in self.progress_bar(range(self.scheduler.num_scales)):
            if self.interrupt:
                break
            self.scheduler.check_sampling_args(self._guidance_scale, top_k, top_p, temperature, more_smooth)
            generators = generator if state.generators is None else state.generators
            self.sample_next_scale(
                state,
                self._guidance_scale,
                top_k,
                top_p,
                temperature,
                more_smooth,
                generators,
                retrieval_guidance_scale,
            )
            if callback_on_step_end is not None:
                available = {"latents": state.latents, "token_maps": state.token_maps}
                returned = callback_on_step_end(self, si, si, {name: available[name] for name in tensor_inputs})
                state.latents = self._callback_latents(returned, state.latents, callback_on_step_end)
            if state_callback is not None:
                state = self._callback_state(state_callback(self, si, state), state, state_callback)
            if output_scales:  # the image f̂ gives so far: coarse at first, the final image after the last scale
                scale_images.append(self.decode_state(state, output_type))

        state.kv_cache = None  # the largest buffer: freed before decoding
        images = self.decode_state(state, output_type)
        labels, token_maps = state.class_labels, state.token_maps
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, labels, token_maps) if scale_images is None else (images, labels, token_maps, scale_images)
        return VARPipelineOutput(images=images, class_labels=labels, token_maps=token_maps, scale_images=scale_images)

    def reconstruct(
        self,
        image,
        class_labels: int | str | list[int | str | None] | torch.Tensor | None = None,
        method: str = "autoregressive",
        prefix_scales: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        **sampling,
    ):
        r"""Reconstruct images, and say per scale how close each step gets (token accuracy and PSNR).

        Args:
            image: the images, in [0, 1] at the model's size (PIL, numpy or tensor, as for
                :class:`VARInpaintPipeline`).
            class_labels: their classes (one for all or one per image; ``None``: unconditional).
            method: ``"tokenizer"`` (tokenize then detokenize: the VQVAE's reconstruction), ``"teacher_forcing"``
                (the transformer's argmax at each scale given the image's own coarser scales: a diagnostic of the
                transformer, **not** a reconstruction, since every scale is given the right answer for the ones
                before it), or ``"autoregressive"`` (default: true generation from the class token, each scale
                conditioned on the model's own predictions, through the sampling loop itself).
            prefix_scales: autoregressive only: keep the first ``prefix_scales`` scales of the image's own pyramid
                (default 0); with all of them it equals the tokenizer's reconstruction exactly.
            generator: autoregressive only, for its draws.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            sampling: autoregressive only: ``guidance_scale``, ``top_k``, ``top_p``, ``temperature``. The default is
                greedy and unguided (``top_k=1``, ``guidance_scale=1.0``), like teacher forcing, so that the two differ
                only in what each scale is conditioned on.

        Returns:
            :class:`~diffusers_var.pipelines.reconstruction.VARReconstructionOutput` with ``images``,
            ``token_maps``, ``token_accuracy`` and ``psnr`` (one value per scale).

        Example:
            ```py
            >>> pipe = VARPipeline.from_pretrained("var-digits")
            >>> image = torch.rand(1, 3, 32, 32)  # a real digit in [0, 1] in practice
            >>> [round(a, 2) for a in pipe.reconstruct(image, 3, method="tokenizer").token_accuracy]
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
            ```
        """
        from .reconstruction import reconstruct

        return reconstruct(self, image, class_labels, method, prefix_scales, generator, output_type, **sampling)

    @staticmethod
    def _callback_latents(returned, latents: torch.Tensor, callback) -> torch.Tensor:
        """The latents a callback returned (or the current ones), checked to be usable in their place."""
        if not isinstance(returned, dict):
            raise ValueError(
                f"callback_on_step_end ({getattr(callback, '__name__', type(callback).__name__)}) must return the dict "
                f"of tensors it was given (changed or not), got {type(returned).__name__}."
            )
        new = returned.pop("latents", latents)
        if not isinstance(new, torch.Tensor) or new.shape != latents.shape:
            shape = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise ValueError(f"A callback returned latents of shape {shape}; they must keep {tuple(latents.shape)}.")
        return new.to(latents.device, latents.dtype)

    @staticmethod
    def _callback_state(returned, state: VARSamplingState, callback) -> VARSamplingState:
        """The state a ``state_callback`` returned (``None``: the same one), checked to be one the loop can go on
        with."""
        if returned is None:
            return state
        name = getattr(callback, "__name__", type(callback).__name__)
        if not isinstance(returned, VARSamplingState):
            raise ValueError(f"state_callback ({name}) must return a VARSamplingState or None, got {type(returned)}.")
        if returned.scale_index != state.scale_index or returned.guided != state.guided:
            raise ValueError(
                f"state_callback ({name}) returned a state at scale {returned.scale_index} (guided: "
                f"{returned.guided}); the loop is at scale {state.scale_index} (guided: {state.guided})."
            )
        if returned.generators is not None and len(returned.generators) != returned.batch_size:
            raise ValueError(
                f"state_callback ({name}) returned {len(returned.generators)} generators for "
                f"{returned.batch_size} samples; give one per sample (state.select keeps them aligned)."
            )
        return returned

    def _check_finite_logits(self, finite: list[torch.Tensor]) -> None:
        """Raise :class:`NonFiniteError` naming the first scale whose logits held NaN or inf (one device sync)."""
        if not finite:
            return
        finite = torch.stack(finite)
        if not bool(finite.all()):
            si = int((~finite).nonzero()[0])
            side = self.scheduler.config.patch_nums[si]
            raise NonFiniteError(
                f"The transformer's logits at scale {si} ({side}×{side} tokens) hold NaN or inf: its weights are "
                "damaged, or it overflowed in float16. Load the model again, or sample in float32 or bfloat16."
            )

    # -- LoRA adapters, in diffusers' manner (they live on the transformer, through transformers' PEFT support) -----

    @package_only
    def load_lora_weights(
        self, pretrained_model_name_or_path: str | os.PathLike, adapter_name: str | None = None, **kwargs
    ) -> None:
        """Load a LoRA adapter (a folder or Hub repo made by ``train_var.py --lora_rank``) into the transformer and
        activate it; ``kwargs`` go to ``transformer.load_adapter`` (e.g. ``revision``, ``token``). The class names
        of the adapter's training data, saved beside it, replace the pipeline's until :meth:`unload_lora_weights`.
        """
        from ..lora import adapter_source, read_id2label, require_peft

        require_peft()
        source = adapter_source(pretrained_model_name_or_path)
        self.transformer.load_adapter(source, adapter_name=adapter_name, **kwargs)
        self.transformer.set_adapter(adapter_name or "default")
        id2label = read_id2label(source, **{k: kwargs[k] for k in ("revision", "token", "cache_dir") if k in kwargs})
        if id2label:
            if not hasattr(self, "_id2label_before_lora"):
                self._id2label_before_lora = self.config.id2label
            self.set_id2label(id2label)

    @package_only
    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: list[str] | None = None) -> None:
        """Merge the loaded adapter(s) into the transformer's weights: sampling then costs what the base model does."""
        from ..lora import fuse

        fuse(self.transformer, lora_scale, adapter_names)

    @package_only
    def unfuse_lora(self) -> None:
        """Take fused adapters out of the transformer's weights again."""
        from ..lora import unfuse

        unfuse(self.transformer)

    @package_only
    def unload_lora_weights(self) -> None:
        """Remove the adapters and their class names. As in diffusers, weights fused with :meth:`fuse_lora` stay
        fused: ``fuse_lora()``, ``unload_lora_weights()``, ``save_pretrained(...)`` saves a plain fine-tuned model;
        call :meth:`unfuse_lora` first to get the base model back."""
        from ..lora import unload

        unload(self.transformer)
        if hasattr(self, "_id2label_before_lora"):
            self.set_id2label(self._id2label_before_lora)
            del self._id2label_before_lora

    # -- loading and sharing ---------------------------------------------------------------------------------------

    @classmethod
    @package_only
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> VARPipeline:
        """``DiffusionPipeline.from_pretrained``, loading every component in fp32 unless ``dtype`` says otherwise.

        (transformers 5 would otherwise load the transformer in its checkpoint's dtype while diffusers loads the
        tokenizer in fp32, so a pipeline saved in bf16 would come back with mixed precisions.)

        A bundled model's name (``"var-digits"``, see ``diffusers_var.pretrained``) loads the copy shipped in the
        package, unless a local folder of that name exists: a folder the user made always wins. A folder saved
        with ``remote_code=True`` loads with this package's classes (no ``trust_remote_code`` needed).
        """
        name = os.fspath(pretrained_model_name_or_path)
        if name in BUNDLED_MODELS and not os.path.exists(name):
            name = str(bundled_model_path(name))
        if kwargs.get("dtype") is None and kwargs.get("torch_dtype") is None:
            kwargs["dtype"] = torch.float32
        folder = name if os.path.isdir(name) else cls.download(name, **kwargs)
        if remote_code_layout(folder):
            pipe = cls._from_remote_code_folder(folder, kwargs)
        else:
            pipe = super().from_pretrained(folder, **kwargs)
        pipe.register_to_config(_name_or_path=name)  # the repo id, not the snapshot it was read from
        return pipe

    @classmethod
    @package_only
    def _from_remote_code_folder(cls, folder: str, kwargs: dict) -> VARPipeline:
        """A ``remote_code=True`` save, loaded with the package's own classes rather than the code beside it.

        Components passed in (``transformer=...``) are used as they are; ``dtype`` (one, or per component),
        ``variant`` and ``use_safetensors`` reach the component loads; the Hub options were used by the download.
        """
        import json

        hub_options = {"cache_dir", "revision", "token", "local_files_only", "force_download", "proxies"}
        model_options = {k: kwargs[k] for k in ("variant", "use_safetensors") if kwargs.get(k) is not None}
        components = {k: kwargs[k] for k in ("vqvae", "transformer", "scheduler", "id2label") if k in kwargs}
        unknown = set(kwargs) - hub_options - set(model_options) - set(components) - {"dtype", "torch_dtype"}
        if unknown:
            raise ValueError(
                f"Loading a remote_code=True save with diffusers-var's classes does not take {sorted(unknown)}; "
                "load the components yourself and pass them in (transformer=..., vqvae=...)."
            )
        dtype = kwargs.get("dtype") or kwargs.get("torch_dtype") or torch.float32

        def component_dtype(name: str) -> torch.dtype:
            return dtype.get(name, dtype.get("default", torch.float32)) if isinstance(dtype, dict) else dtype

        index = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))
        if "vqvae" not in components:
            components["vqvae"] = MultiScaleVQVAE.from_pretrained(
                Path(folder, "vqvae"), dtype=component_dtype("vqvae"), **model_options
            )
        if "transformer" not in components:
            components["transformer"] = VARTransformer.from_pretrained(
                Path(folder, "transformer"), dtype=component_dtype("transformer"), **model_options
            ).eval()
        if "scheduler" not in components:
            components["scheduler"] = VARScaleScheduler.from_pretrained(Path(folder, "scheduler"))
        components.setdefault("id2label", index.get("id2label"))
        return cls(**components)

    @classmethod
    @package_only
    def download(cls, pretrained_model_name: str, **kwargs) -> str:
        """Fetch a pipeline repo with ``huggingface_hub.snapshot_download`` (online, offline or from the HF cache).

        diffusers 0.42's own ``download`` looks third-party classes up in ``diffusers.pipelines`` and fails for
        this package, so we resolve the snapshot ourselves.
        """
        return download_snapshot(pretrained_model_name, **kwargs)

    @package_only
    def save_pretrained(
        self, save_directory: str | os.PathLike, overwrite: bool = False, remote_code: bool = False, **kwargs
    ) -> None:
        """``DiffusionPipeline.save_pretrained``, without ever losing a file that is not part of the save.

        ``save_directory`` may be new, empty, or hold an earlier pipeline save (beside ``README.md``,
        ``.gitattributes`` and ``.git``, as a cloned Hub repo does). Anything else there is refused unless
        ``overwrite=True``, and even then only the pipeline's own files are replaced. The save is written to a
        staging folder first, so a reader sees the old save, none, or the complete new one (see
        :mod:`diffusers_var.saving`). A ``variant`` keeps the other weights already there (e.g. the fp32 ones).
        ``remote_code=True`` writes the code beside the weights, so the folder (or a Hub repo made from it) loads
        where diffusers-var is not installed, with ``trust_remote_code=True`` (see :mod:`diffusers_var.remote_code`).

        Example:
            ```py
            >>> pipe.save_pretrained("var-d16")                  # new folder, or an earlier save of this pipeline
            >>> pipe.save_pretrained("my-repo", overwrite=True)  # beside other files, which stay
            >>> pipe.save_pretrained("shareable", remote_code=True)
            ```
        """
        if kwargs.get("push_to_hub"):
            raise ValueError("Use pipe.push_to_hub(repo_id) to share, so the upload gets a model card.")
        check_no_adapters(self)

        def write(staged: Path) -> None:
            DiffusionPipeline.save_pretrained(self, staged, **kwargs)
            if remote_code:
                write_remote_code(staged)

        save_folder(
            write,
            save_directory,
            install_pipeline_save,
            variant=kwargs.get("variant"),
            overwrite=overwrite,
        )

    @package_only
    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        card_template: str = "var",
        card_data: dict | None = None,
        remote_code: bool = False,
    ) -> str:
        """Upload the pipeline (safetensors) with a model card made from ``model_cards/<card_template>.md``;
        ``remote_code=True`` uploads the code too, so the repo loads without diffusers-var (``trust_remote_code``).
        """
        return push_pipeline_to_hub(
            self,
            repo_id,
            commit_message,
            private,
            token,
            create_pr,
            card_template,
            card_data,
            remote_code,
        )
