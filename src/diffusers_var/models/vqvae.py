"""MultiScaleVQVAE: VAR's tokenizer, an image ↔ pyramid-of-token-maps autoencoder."""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.accelerate_utils import apply_forward_hook

from ..remote_code import package_only
from ..validation import NonFiniteError
from .autoencoder_blocks import Decoder, Encoder
from .loading import load_strictly
from .quantizer import MultiScaleResidualQuantizer

# images may leave [-1, 1] by this much (e.g. a bicubic resize overshooting) before tokenize refuses them
IMAGE_RANGE_TOLERANCE = 0.1


def check_decoded_images(images: torch.Tensor) -> torch.Tensor:
    """Raise :class:`NonFiniteError` naming the decoder if decoded images hold NaN or inf; return them otherwise."""
    finite = torch.isfinite(images).flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise NonFiniteError(
            f"The tokenizer's decoder (vqvae.decoder) produced NaN or inf pixels in {len(bad)} of {len(finite)} "
            f"image(s) (e.g. index {bad[0]}): its weights are damaged or it overflowed in reduced precision. Load "
            "the tokenizer again, or decode in float32."
        )
    return images


def keep_on_execution_device(method):
    """For the per-scale steps of the sampling loop: like diffusers' ``apply_forward_hook``, an offload hook brings
    the tokenizer to the execution device, but under model offload without sending the transformer back to the CPU
    (both run at every scale; the decoder's ``apply_forward_hook`` sends it back once the loop is done)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        hook = getattr(self, "_hf_hook", None)
        hooks = getattr(hook, "hooks", [hook])  # accelerate's SequentialHook holds several
        offload = next((h for h in hooks if type(h).__name__ == "CpuOffload"), None)  # (accelerate may be absent)
        if offload is not None:  # model offload: join the transformer on the device without sending it away
            if next(self.parameters()).device != torch.device(offload.execution_device):
                self.to(offload.execution_device)
        elif hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(self)
        return method(self, *args, **kwargs)

    return wrapper


@dataclass
class MultiScaleVQVAEOutput(BaseOutput):
    """Output of :meth:`MultiScaleVQVAE.forward`.

    Attributes:
        sample: reconstruction (B, 3, H, W), not clamped, for the training losses.
        vq_loss: the VQ loss (commitment weighted by β).
        codebook_usage: fraction of the codebook used in the batch, per scale, (S,).
        token_maps: the chosen codes, one (B, pn, pn) map per scale.
    """

    sample: torch.Tensor
    # defaults, so that accelerate's mixed-precision wrapper can rebuild the output from a dict
    vq_loss: torch.Tensor | None = None
    codebook_usage: torch.Tensor | None = None
    token_maps: list[torch.LongTensor] | None = None


class MultiScaleVQVAE(ModelMixin, ConfigMixin):
    r"""VAR's multi-scale residual VQVAE.

    An image in [-1, 1] is encoded to a latent grid (B, z_channels, h, w) with h = ``patch_nums[-1]``, and explained by
    one token map per scale, coarse to fine. The defaults are the official tokenizer ``vae_ch160v4096z32``.

    Args:
        in_channels / out_channels: image channels.
        ch, ch_mult, num_res_blocks: width, per-level width multipliers and residual blocks per level; the image is
            downsampled by 2^(len(ch_mult) − 1).
        dropout: dropout in the residual blocks.
        norm_num_groups: GroupNorm groups (every width must be a multiple of it).
        mid_attention / lowest_level_attention: self-attention in the middle and at the lowest resolution.
        z_channels: latent and code dimension (Cvae).
        vocab_size: codebook size V.
        beta: commitment weight of the VQ loss.
        use_znorm: choose codes by cosine similarity.
        quant_conv_kernel_size: kernel of the conv before and after quantisation.
        quant_resi, share_quant_resi, default_qresi_counts: the φ convolutions; see
            :class:`~diffusers_var.models.quantizer.MultiScaleResidualQuantizer`.
        patch_nums: side of each scale's token map.

    Example:
        ```py
        >>> import torch
        >>> from diffusers_var import MultiScaleVQVAE
        >>> vqvae = MultiScaleVQVAE(ch=32, ch_mult=(1, 2), norm_num_groups=8, z_channels=8, vocab_size=64,
        ...                         patch_nums=(1, 2, 4))
        >>> token_maps = vqvae.tokenize(torch.rand(2, 3, 8, 8) * 2 - 1)
        >>> [tuple(t.shape) for t in token_maps]
        [(2, 1, 1), (2, 2, 2), (2, 4, 4)]
        >>> vqvae.detokenize(token_maps).shape
        torch.Size([2, 3, 8, 8])
        ```
    """

    _supports_gradient_checkpointing = True  # encoder and decoder layers; enable_gradient_checkpointing()
    _skip_layerwise_casting_patterns = ["quantizer"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        ch: int = 160,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        mid_attention: bool = True,
        lowest_level_attention: bool = True,
        z_channels: int = 32,
        vocab_size: int = 4096,
        beta: float = 0.25,
        use_znorm: bool = False,
        quant_conv_kernel_size: int = 3,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        default_qresi_counts: int = 0,
        patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    ):
        super().__init__()
        for width in (ch * m for m in ch_mult):
            if width % norm_num_groups:
                raise ValueError(
                    f"Every encoder width must be a multiple of norm_num_groups={norm_num_groups}, but ch={ch} × "
                    f"ch_mult={tuple(ch_mult)} gives {width}. Change ch or norm_num_groups."
                )
        if len(patch_nums) < 2 or list(patch_nums) != sorted(set(patch_nums)):
            raise ValueError(f"patch_nums must be at least two strictly increasing sides, got {tuple(patch_nums)}.")
        # lists, as JSON gives them back, so that a saved and reloaded config equals this one
        self.register_to_config(patch_nums=[int(p) for p in patch_nums], ch_mult=[int(m) for m in ch_mult])
        blocks = dict(
            z_channels=z_channels,
            ch=ch,
            ch_mult=tuple(ch_mult),
            num_res_blocks=num_res_blocks,
            dropout=dropout,
            norm_num_groups=norm_num_groups,
            mid_attention=mid_attention,
            lowest_level_attention=lowest_level_attention,
        )
        self.encoder = Encoder(in_channels=in_channels, **blocks)
        self.decoder = Decoder(out_channels=out_channels, **blocks)
        padding = quant_conv_kernel_size // 2
        self.quant_conv = torch.nn.Conv2d(z_channels, z_channels, quant_conv_kernel_size, padding=padding)
        self.post_quant_conv = torch.nn.Conv2d(z_channels, z_channels, quant_conv_kernel_size, padding=padding)
        self.quantizer = MultiScaleResidualQuantizer(
            vocab_size=vocab_size,
            z_channels=z_channels,
            patch_nums=tuple(patch_nums),
            beta=beta,
            use_znorm=use_znorm,
            quant_resi=quant_resi,
            share_quant_resi=share_quant_resi,
            default_qresi_counts=default_qresi_counts,
        )

    @classmethod
    @package_only
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """``ModelMixin.from_pretrained``, strict: missing, unexpected or mis-shaped weights (a damaged file, or a
        config.json that disagrees with it) raise a ValueError naming the file and the keys, where diffusers would
        warn and leave them uninitialised. ``output_loading_info=True`` returns the report instead, and
        ``ignore_mismatched_sizes=True`` (with ``low_cpu_mem_usage=False``) accepts mis-shaped weights."""
        return load_strictly(
            super().from_pretrained,
            pretrained_model_name_or_path,
            (),
            kwargs,
            lambda folder: cls.from_config(cls.load_config(folder)),
        )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        """Side of the images this tokenizer's ``patch_nums`` describe."""
        return self.config.patch_nums[-1] * self.downsample_factor

    # -- checks --------------------------------------------------------------------------------------------------

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        """Check shape, dtype and values of images for the encoder; return them in the model's dtype."""
        if not isinstance(images, torch.Tensor):
            raise ValueError(
                f"images must be a torch.Tensor (B, 3, H, W) in [-1, 1], got {type(images).__name__}. Convert PIL "
                "images with diffusers' VaeImageProcessor().preprocess(...)."
            )
        expected = (self.config.in_channels, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"Expected images of shape (B, {expected[0]}, {expected[1]}, {expected[2]}) in [-1, 1], got "
                f"{tuple(images.shape)}. This tokenizer's patch_nums={tuple(self.config.patch_nums)} fix the size at "
                f"{self.image_size} px; resize or crop the images first."
            )
        if not images.is_floating_point():
            raise ValueError(
                f"images must be a float tensor in [-1, 1], got {images.dtype}. For uint8 pixels use "
                "images.float() / 127.5 - 1."
            )
        if images.numel():
            low, high = (float(v) for v in images.aminmax())  # NaN if any pixel is, ±inf if any is
            if not (math.isfinite(low) and math.isfinite(high)):
                count = int((~torch.isfinite(images)).sum())
                raise ValueError(f"images hold {count} NaN or inf values; tokenize needs finite pixels.")
            if low < -1 - IMAGE_RANGE_TOLERANCE or high > 1 + IMAGE_RANGE_TOLERANCE:
                if low >= 0 and high > 2:
                    guess = "This looks like [0, 255] pixels: use images / 127.5 - 1."
                elif low < -1.5 or high > 1.5:
                    guess = "This looks like a mean/std normalisation (e.g. ImageNet's): use (pixels * 2 - 1) instead."
                else:
                    guess = "Clamp them, or check the preprocessing (a resize that overshoots?)."
                raise ValueError(f"images must lie in [-1, 1], but they range over [{low:.4g}, {high:.4g}]. {guess}")
            if low >= 0:
                warnings.warn(
                    f"Every pixel value is ≥ 0 (range [{low:.3g}, {high:.3g}]): this looks like images in [0, 1], "
                    "but the tokenizer expects [-1, 1]; use images * 2 - 1 (ignore this if the images are "
                    "simply bright).",
                    UserWarning,
                    stacklevel=3,
                )
        return images.to(self.dtype)

    def check_token_maps(self, token_maps: list[torch.Tensor]) -> None:
        """Raise a ValueError unless ``token_maps`` is one (B, pn, pn) map of codes in [0, V) per scale."""
        patch_nums = tuple(self.config.patch_nums)
        if not isinstance(token_maps, (list, tuple)) or len(token_maps) != len(patch_nums):
            count = len(token_maps) if isinstance(token_maps, (list, tuple)) else type(token_maps).__name__
            raise ValueError(
                f"Expected a list of {len(patch_nums)} token maps for patch_nums={patch_nums}, got {count}."
            )
        batch = token_maps[0].shape[0]
        for si, (token_map, side) in enumerate(zip(token_maps, patch_nums)):
            if tuple(token_map.shape) != (batch, side, side) or token_map.dtype not in (
                torch.int64,
                torch.int32,
            ):
                raise ValueError(
                    f"Token map {si} must be an integer tensor of shape ({batch}, {side}, {side}) to match "
                    f"patch_nums={patch_nums}, got {tuple(token_map.shape)} of {token_map.dtype}."
                )
            if token_map.numel() and (token_map.min() < 0 or token_map.max() >= self.config.vocab_size):
                raise ValueError(
                    f"Token map {si} holds codes outside [0, {self.config.vocab_size}): "
                    f"min {int(token_map.min())}, max {int(token_map.max())}."
                )

    # -- the public path ------------------------------------------------------------------------------------------

    @apply_forward_hook
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] → continuous latents f (B, z_channels, h, w), before quantisation."""
        images = self._check_images(images)
        return self.quant_conv(self.encoder(images))

    @apply_forward_hook
    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Quantised latents f̂ → images, not clamped. NaN or inf pixels raise :class:`NonFiniteError` naming the
        decoder, except in a training step (training mode with gradients), where the loss shows them without a
        device sync per step."""
        images = self.decoder(self.post_quant_conv(f_hat))
        if self.training and torch.is_grad_enabled():
            return images
        return check_decoded_images(images)

    @torch.no_grad()
    @apply_forward_hook
    def tokenize(self, images: torch.Tensor) -> list[torch.LongTensor]:
        """Images (B, 3, H, W) in [-1, 1] → one (B, pn, pn) token map per scale."""
        token_maps, _ = self.quantizer.quantize(self.encode(images))
        return token_maps

    @apply_forward_hook
    def token_maps_to_fhat(self, token_maps: list[torch.LongTensor]) -> torch.Tensor:
        """Token maps → f̂ (B, z_channels, h, w), the sum of every scale's contribution."""
        self.check_token_maps(token_maps)
        return self.quantizer.token_maps_to_fhat(token_maps)

    @apply_forward_hook
    def detokenize(self, token_maps: list[torch.LongTensor]) -> torch.Tensor:
        """Token maps → images (B, 3, H, W) in [-1, 1]; NaN or inf pixels raise :class:`NonFiniteError`."""
        return self.decode(self.token_maps_to_fhat(token_maps)).clamp(-1, 1)

    @apply_forward_hook
    def next_scale_inputs(self, token_maps: list[torch.LongTensor]) -> torch.Tensor:
        """Token maps → the transformer's teacher-forcing input (B, L − first_l, z_channels)."""
        self.check_token_maps(token_maps)
        return self.quantizer.next_scale_inputs(token_maps)

    @keep_on_execution_device
    def code_embeddings(self, token_maps: list[torch.LongTensor]) -> torch.Tensor:
        """Token maps (each (..., pn, pn), one per scale) → their codebook vectors at every position, flattened
        scale by scale: (..., L, z_channels). What a retrieval transformer attends to for its neighbours."""
        self.check_token_maps([t.reshape(-1, *t.shape[-2:]) for t in token_maps])
        codes = torch.cat([t.flatten(-2) for t in token_maps], dim=-1)
        return self.quantizer.embedding(codes)

    # -- autoregressive sampling, one scale at a time ---------------------------------------------------------------

    @keep_on_execution_device
    def accumulate_scale(
        self,
        f_hat: torch.Tensor,
        scale_index: int,
        token_map: torch.LongTensor,
        code_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Add a sampled scale to f̂: its codes' embeddings, or with ``code_weights`` (B, pn², V) a soft mix."""
        if code_weights is None:
            embedded = self.quantizer.embed(token_map)
        else:
            embedded = self.quantizer.embed_soft(code_weights.to(self.dtype), token_map.shape[-1])
        return f_hat + self.quantizer.scale_contribution(embedded, scale_index)

    def scale_input(self, f_hat: torch.Tensor, scale_index: int) -> torch.Tensor:
        """f̂ area-pooled to scale ``scale_index``, as the transformer's input tokens (B, pn², z_channels)."""
        return self.quantizer.downsample(f_hat, scale_index).flatten(2).transpose(1, 2)

    @torch.no_grad()
    @apply_forward_hook
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Tokenize and detokenize in one pass (the tokenizer's reconstruction), in [-1, 1]."""
        _, f_hats = self.quantizer.quantize(self.encode(images))
        return self.decode(f_hats[-1]).clamp(-1, 1)

    def forward(self, images: torch.Tensor, return_dict: bool = True) -> MultiScaleVQVAEOutput | tuple:
        """Training pass: reconstruction with a straight-through quantiser, VQ loss and codebook usage."""
        quantized = self.quantizer(self.encode(images))
        sample = self.decode(quantized.quantized.to(images.dtype))
        output = (
            sample,
            quantized.loss,
            quantized.codebook_usage,
            quantized.token_maps,
        )
        return MultiScaleVQVAEOutput(*output) if return_dict else output
