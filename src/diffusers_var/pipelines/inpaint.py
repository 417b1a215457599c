"""Zero-shot editing with VAR: in-painting, out-painting and class-conditional editing, no training needed.

At every scale the tokens of the region to preserve are the input image's own (teacher-forced), and the model
samples the rest: the sampled map is drawn in full (the random stream stays the official one), the kept positions
are replaced by the input's tokens, and f̂ accumulates the result, so every finer scale sees the kept region.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from ..validation import check_integer
from .image_inputs import ImageInput, keep_masks, prepare_images, prepare_mask
from .state import VARSamplingState
from .var import VARPipeline, VARPipelineOutput


class VARInpaintPipeline(VARPipeline):
    r"""Regenerate the white part of ``mask_image`` in ``image`` and keep the rest, with VAR's own sampling loop.

    It follows the official zero-shot editing procedure (``demo_zero_shot_edit.ipynb``): the keep mask
    ``1 − mask_image`` is resized bilinearly (align_corners=False) from its own size to each scale and thresholded
    at > 0.5; scales of at most 3 tokens are kept whole; kept positions take the input's tokens, the others are
    sampled. (The bilinear resize does not average: a region thinner than a token in a full-resolution mask can vanish
    at a scale. Give the mask at the last scale's token resolution, as the official notebook does, for exact control
    over which tokens are regenerated.) Out-painting is the inverted mask; class-conditional editing regenerates a
    region under a new class (``class_labels``); ``None`` as the class (the default) is pure in-painting,
    unconditional on both guidance branches.

    It has :class:`VARPipeline`'s components, loading (bundled names such as ``var-digits`` too), saving and
    sampling defaults: ``VARInpaintPipeline(**pipe.components, **pipe.parameters)`` shares a loaded pipeline's
    models and class names (``**pipe.components`` alone shares the models; class ids still work).

    Example:
        ```py
        >>> import torch
        >>> from diffusers_var import VARInpaintPipeline
        >>> pipe = VARInpaintPipeline.from_pretrained("var-digits")
        >>> image = torch.rand(3, 32, 32)  # a real image in [0, 1] in practice
        >>> mask = torch.zeros(32, 32)
        >>> mask[16:] = 1  # regenerate the lower half
        >>> out = pipe(image=image, mask_image=mask, class_labels=5, generator=torch.Generator().manual_seed(0))
        >>> out.images[0].size
        (32, 32)
        ```
    """

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput | None = None,
        mask_image: ImageInput | None = None,
        class_labels: int | str | list[int | str | None] | torch.Tensor | None = None,
        image_token_maps: list[torch.LongTensor] | None = None,
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
        r"""Edit images.

        Args:
            image: the images to edit, in [0, 1] at the model's size: a PIL image, a list of them, a numpy array
                (H, W, 3) or (B, H, W, 3), or a tensor (3, H, W) or (B, 3, H, W).
            mask_image: white (1) = regenerate, black (0) = keep; any size (it is resized to each scale from its own
                size, never through the image's): a PIL image, a numpy array (H, W[, 1]) or (B, H, W, 1), a tensor
                (H, W), (1, H, W) or (B, 1, H, W), values in [0, 1]: one mask for the whole batch, or one per image.
            class_labels: the class to generate the region as: one for all images, one per image, or several for
                one image (edited once per class); ids or names; ``None`` (default) is unconditional, pure
                in-painting.
            image_token_maps: instead of ``image``, what ``pipe.vqvae.tokenize`` returned for it (skips tokenizing).
            guidance_scale, top_k, top_p, temperature, more_smooth, generator, output_type, return_dict,
            callback_on_step_end, callback_on_step_end_tensor_inputs, state_callback, output_scales: as
                :class:`VARPipeline`.
            num_images_per_prompt: edits per input image (consecutive in the output).

        Returns:
            :class:`VARPipelineOutput`; its ``token_maps`` are the effective tokens (kept and sampled) of each scale.
        """
        if (image is None) == (image_token_maps is None):
            raise ValueError("Pass either image (in [0, 1]) or image_token_maps (from vqvae.tokenize), not both.")
        if mask_image is None:
            raise ValueError("mask_image is required: white (1) = regenerate, black (0) = keep.")
        check_integer("num_images_per_prompt", num_images_per_prompt, minimum=1)
        self._check_call_arguments(  # before tokenizing: a bad argument fails at once
            guidance_scale, top_k, top_p, temperature, more_smooth, output_type, generator,
            callback_on_step_end, callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        device = self._execution_device
        if image is not None:
            pixels = prepare_images(image, self.vqvae.image_size)
            token_maps = self.vqvae.tokenize(pixels.to(device, self.vqvae.dtype))
        else:
            self.vqvae.check_token_maps(image_token_maps)
            token_maps = [t.to(device, torch.long) for t in image_token_maps]
        batch = token_maps[0].shape[0]
        mask = prepare_mask(mask_image)
        if mask.shape[0] not in (1, batch):
            raise ValueError(
                f"mask_image holds {mask.shape[0]} masks for {batch} images: pass one mask, or one per image."
            )
        keep = [k.expand(batch, -1, -1).to(device) for k in keep_masks(mask, tuple(self.vqvae.config.patch_nums))]

        labels = self._labels_for_images(class_labels, batch, one_image_many_labels=True)
        if batch == 1 and labels.shape[0] > 1:  # one image, several classes: edit it once per class
            token_maps = [t.expand(labels.shape[0], -1, -1) for t in token_maps]
            keep = [k.expand(labels.shape[0], -1, -1) for k in keep]
        repeat = num_images_per_prompt
        return self._sample(
            labels.repeat_interleave(repeat),
            forced_token_maps=[t.repeat_interleave(repeat, dim=0) for t in token_maps],
            forced_masks=[k.repeat_interleave(repeat, dim=0) for k in keep],
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
