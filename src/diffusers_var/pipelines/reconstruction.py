"""Reconstructing an image with VAR, three ways, named for what they are.

- ``"tokenizer"``: tokenize, then detokenize: the VQVAE's own reconstruction, the ceiling for the other two.
- ``"teacher_forcing"``: at each scale, the transformer's most likely tokens given the image's own (ground-truth)
  coarser scales. This is a diagnostic of the transformer, **not a reconstruction**: every scale is handed the right
  answer for the scales before it, so the errors that accumulate in real generation never happen, and it does not
  test whether the model can generate the image.
- ``"autoregressive"``: true generation, from the class token alone, each scale conditioned on the model's own
  previous predictions, with exactly the attention, scale order and quantisation of sampling (it is the sampling
  loop, with the first ``prefix_scales`` scales of the image's own pyramid kept). With every scale kept it is the
  tokenizer's reconstruction, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput

from ..validation import NonFiniteError
from .image_inputs import ImageInput, prepare_images

METHODS = ("tokenizer", "teacher_forcing", "autoregressive")
AUTOREGRESSIVE_SAMPLING = ("guidance_scale", "top_k", "top_p", "temperature")


@dataclass
class VARReconstructionOutput(BaseOutput):
    """Output of :meth:`VARPipeline.reconstruct`.

    Attributes:
        images: the reconstructions, as ``output_type``.
        token_maps: the method's tokens, one (B, pn, pn) map per scale.
        token_accuracy: per scale, the share of tokens equal to the tokenizer's (over the batch); 1.0 at every scale
            for ``"tokenizer"``.
        psnr: per scale, the PSNR (dB, mean over the images) against the input image of the image decoded from f̂
            after that scale: how close the reconstruction gets as scales are added.
        method: the method used.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    token_maps: list[torch.LongTensor]
    token_accuracy: list[float]
    psnr: list[float]
    method: str


def _psnr(images: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over the batch of 10·log10(1 / MSE), images in [0, 1]."""
    mse = (images.float() - target.float()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(1 / mse)).mean())


@torch.no_grad()
def reconstruct(
    pipe,
    image: ImageInput,
    class_labels=None,
    method: str = "autoregressive",
    prefix_scales: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    output_type: str = "pil",
    **sampling,
) -> VARReconstructionOutput:
    """See :meth:`VARPipeline.reconstruct`."""
    from .var import OUTPUT_TYPES

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
    num_scales = len(pipe.vqvae.config.patch_nums)
    if method != "autoregressive" and (prefix_scales is not None or sampling):
        given = (["prefix_scales"] if prefix_scales is not None else []) + sorted(sampling)
        raise ValueError(f"{', '.join(given)} only apply to method='autoregressive', not {method!r}.")
    unknown = sorted(set(sampling) - set(AUTOREGRESSIVE_SAMPLING))
    if unknown:
        raise ValueError(f"reconstruct takes the sampling arguments {AUTOREGRESSIVE_SAMPLING}, not {unknown}.")
    if prefix_scales is None:
        prefix_scales = 0
    if isinstance(prefix_scales, bool) or not isinstance(prefix_scales, int) or not 0 <= prefix_scales <= num_scales:
        raise ValueError(
            f"prefix_scales is how many scales of the image's own pyramid to keep, an integer in [0, {num_scales}], "
            f"got {prefix_scales!r}."
        )
    device = pipe._execution_device
    target = prepare_images(image, pipe.vqvae.image_size).to(device)  # [-1, 1]
    truth = pipe.vqvae.tokenize(target.to(pipe.vqvae.dtype))
    batch = truth[0].shape[0]
    labels = pipe._labels_for_images(class_labels, batch)

    if method == "tokenizer":
        token_maps = truth
    elif method == "teacher_forcing":
        logits = pipe.transformer(  # explicit flags: a config asking for tuples or attention maps must not apply
            labels.to(device), pipe.vqvae.next_scale_inputs(truth), return_dict=True, output_attentions=False,
            output_hidden_states=False,
        ).logits  # fmt: skip
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteError("The transformer's teacher-forcing logits hold NaN or inf: its weights are damaged.")
        sizes = [side * side for side in pipe.vqvae.config.patch_nums]
        predicted = logits.argmax(-1).split(sizes, dim=1)
        token_maps = [t.reshape(batch, side, side) for t, side in zip(predicted, pipe.vqvae.config.patch_nums)]
    else:
        sampling = {"guidance_scale": 1.0, "top_k": 1, "top_p": 1.0, "temperature": 1.0} | sampling
        keep = [torch.full_like(t, si < prefix_scales, dtype=torch.bool) for si, t in enumerate(truth)]
        out = pipe._sample(
            labels, forced_token_maps=truth, forced_masks=keep, generator=generator, output_type="latent",
            return_dict=True, callback_on_step_end=None, callback_on_step_end_tensor_inputs=None,
            state_callback=None, output_scales=False, more_smooth=False, **sampling,
        )  # fmt: skip
        token_maps = out.token_maps

    # f̂ scale by scale, as sampling accumulates it (the same operations: with every scale kept, the same bits)
    side = pipe.vqvae.config.patch_nums[-1]
    latents = torch.zeros(batch, pipe.vqvae.config.z_channels, side, side, dtype=pipe.vqvae.dtype, device=device)
    original = (target.float() + 1) / 2
    accuracy, psnr = [], []
    for si, (tokens, true_tokens) in enumerate(zip(token_maps, truth)):
        latents = pipe.vqvae.accumulate_scale(latents, si, tokens)
        accuracy.append(float((tokens == true_tokens).float().mean()))
        psnr.append(_psnr(pipe.decode_latents(latents, "pt"), original))
    images = pipe.decode_latents(latents, output_type)
    pipe.maybe_free_model_hooks()
    return VARReconstructionOutput(
        images=images, token_maps=token_maps, token_accuracy=accuracy, psnr=psnr, method=method
    )
