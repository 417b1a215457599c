"""VARScaleScheduler: the scale schedule, guidance schedule and token sampling of VAR."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from ..validation import check_integer, check_real

GUIDANCE_SCHEDULES = ("linear", "constant")


@dataclass
class VARSchedulerOutput(BaseOutput):
    """Output of :meth:`VARScaleScheduler.step`.

    Attributes:
        token_map: sampled codes (B, pn, pn).
        code_weights: with Gumbel smoothing, the soft code weights (B, pn², V) that replace the hard embedding;
            otherwise ``None``.
        logits: the guided, temperature-scaled logits (B, pn², V) after filtering (−inf where filtered out).
        finite: a 0-D bool tensor on the logits' device, False if the model's logits held NaN or +inf, or a row of
            nothing but −inf (:func:`finite_flag`; such logits were made drawable so the draw could not fail). Read it
            once after the last scale: reading it per scale would wait for the device each time.
    """

    token_map: torch.LongTensor
    code_weights: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    finite: torch.Tensor | None = None


def top_k_top_p_filter_(logits: torch.Tensor, top_k: int | None = 0, top_p: float | None = 1.0) -> torch.Tensor:
    """In place: set to −inf every logit below the k-th largest (ties kept), then outside the top-p nucleus (the
    largest always kept). ``top_k=0`` / ``top_p=1`` (or ``None``) switch a filter off. Works on the last dimension.
    """
    vocab = logits.shape[-1]
    top_k, top_p = top_k or 0, 1.0 if top_p is None else top_p
    if 0 < top_k < vocab:
        kth_largest = logits.topk(top_k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth_largest, float("-inf"))
    if top_p < 1:
        ascending, order = logits.sort(dim=-1)
        drop_sorted = ascending.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        del ascending
        drop_sorted[..., -1] = False
        logits.masked_fill_(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def top_k_top_p_filter(logits: torch.Tensor, top_k: int | None = 0, top_p: float | None = 1.0) -> torch.Tensor:
    """:func:`top_k_top_p_filter_` on a copy."""
    return top_k_top_p_filter_(logits.clone(), top_k, top_p)


def finite_flag(logits: torch.Tensor) -> torch.Tensor:
    """A 0-D bool tensor on the logits' device, False if any row (last dimension) holds NaN or +inf or nothing but
    −inf; no host sync. −inf elsewhere is a masked code, which is fine.

    One reduction: a row's max is NaN if any value is, +inf if any is, −inf only if all are (20× cheaper on CPU than
    ``isfinite(logits).all()``, which materialises a mask).
    """
    return torch.isfinite(logits.amax(dim=-1)).all()


def make_drawable_(logits: torch.Tensor) -> torch.Tensor:
    """In place: NaN and +inf (a broken model, or −inf − −inf under guidance where a code is masked in both halves)
    become −inf, and a row left with nothing but −inf becomes uniform, so the draw cannot fail (on CUDA a failed
    draw kills the process). Finite logits and masked (−inf) codes are untouched."""
    logits.nan_to_num_(nan=float("-inf"), posinf=float("-inf"), neginf=float("-inf"))
    return logits.masked_fill_(logits.amax(dim=-1, keepdim=True) == float("-inf"), 0.0)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | list | None) -> torch.LongTensor:
    """One draw per row of probs (N, V).

    With one generator on the same device, this is ``torch.multinomial`` on the whole matrix, so the random stream
    matches the official sampler. A generator on another device (e.g. a CPU generator for CUDA logits) draws the
    equivalent exponential race ``argmax(p / q)``, q ~ Exp(1), on its own device, as diffusers' ``randn_tensor`` does.
    A list of generators draws row group by row group (one generator per image), so an image does not depend on
    the rest of its batch.
    """
    if isinstance(generator, (list, tuple)):
        groups = probs.chunk(len(generator))
        return torch.cat([sample_categorical(p, g) for p, g in zip(groups, generator)])
    if generator is None or generator.device.type == probs.device.type:
        return torch.multinomial(probs, 1, replacement=True, generator=generator)[:, 0]
    race = torch.empty(probs.shape, device=generator.device, dtype=torch.float32).exponential_(generator=generator)
    return (probs / race.to(probs.device)).argmax(dim=-1)


def _exponential_like(logits: torch.Tensor, generator: torch.Generator | list | None) -> torch.Tensor:
    if isinstance(generator, (list, tuple)):
        return torch.cat([_exponential_like(x, g) for x, g in zip(logits.chunk(len(generator)), generator)])
    device = generator.device if generator is not None else logits.device
    noise = torch.empty(logits.shape, dtype=logits.dtype, device=device).exponential_(generator=generator)
    return noise.to(logits.device)


class VARScaleScheduler(SchedulerMixin, ConfigMixin):
    r"""Turns the transformer's logits at each scale into a token map.

    One :meth:`step` per scale: classifier-free guidance on the [conditional; unconditional] logits, temperature,
    top-k, top-p, a categorical draw, and optionally the official Gumbel smoothing of the code embeddings.

    **Guidance.** ``guidance_scale`` follows diffusers: 1.0 is no guidance. At scale ``si`` the logits are
    ``(1 + t)·cond − t·uncond`` with ``t = (guidance_scale − 1)·si / (S − 1)`` under the default ``"linear"``
    schedule (the official ramp; the first scale is unguided), or ``t = guidance_scale − 1`` under ``"constant"``.
    The official ``cfg=c`` is ``guidance_scale = 1 + c`` with the linear schedule.

    Args:
        patch_nums: side of each scale's token map, coarse to fine.
        guidance_schedule: ``"linear"`` (official) or ``"constant"``.
        more_smooth_tau_max / more_smooth_tau_min: Gumbel temperature at the first scale and its floor; the
            temperature falls as ``max(tau_max·(1 − 0.95·si/(S − 1)), tau_min)``.

    Example:
        ```py
        >>> import torch
        >>> from diffusers_var import VARScaleScheduler
        >>> scheduler = VARScaleScheduler(patch_nums=(1, 2, 4))
        >>> logits = torch.randn(4, 4, 64)  # [cond; uncond] for 2 images at the 2x2 scale
        >>> out = scheduler.step(logits, 1, guidance_scale=2.5, top_k=10, generator=torch.Generator().manual_seed(0))
        >>> out.token_map.shape
        torch.Size([2, 2, 2])
        ```
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        guidance_schedule: str = "linear",
        more_smooth_tau_max: float = 0.27,
        more_smooth_tau_min: float = 0.005,
    ):
        if guidance_schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(f"guidance_schedule must be one of {GUIDANCE_SCHEDULES}, got {guidance_schedule!r}.")
        if len(patch_nums) < 2:
            raise ValueError(f"patch_nums needs at least two scales, got {tuple(patch_nums)}.")
        self.register_to_config(patch_nums=[int(p) for p in patch_nums])  # as JSON gives it back: round trips equal
        self.timesteps = torch.arange(len(patch_nums))

    @property
    def num_scales(self) -> int:
        return len(self.config.patch_nums)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        """VAR always runs every scale; this only checks the count and places ``timesteps`` (scale indices)."""
        if num_inference_steps is not None and num_inference_steps != self.num_scales:
            raise ValueError(
                f"VAR samples exactly one step per scale ({self.num_scales} for patch_nums="
                f"{tuple(self.config.patch_nums)}), got num_inference_steps={num_inference_steps}."
            )
        self.timesteps = torch.arange(self.num_scales, device=device)

    def scale_progress(self, scale_index: int) -> float:
        """Position of a scale on [0, 1]: si / (S − 1)."""
        return scale_index / (self.num_scales - 1)

    def guidance_weight(self, scale_index: int, guidance_scale: float) -> float:
        """The t in ``(1 + t)·cond − t·uncond`` at this scale."""
        strength = guidance_scale - 1
        if self.config.guidance_schedule == "linear":
            return strength * self.scale_progress(scale_index)
        return strength

    @staticmethod
    def check_sampling_args(
        guidance_scale: float, top_k: int | None, top_p: float | None, temperature: float, more_smooth: bool = False
    ) -> None:
        """Raise a ValueError naming the first argument that is not a finite number in its range (``None`` switches
        top-k/top-p off)."""
        check_real("guidance_scale", guidance_scale, minimum=0, hint=" 1.0 means no guidance.")
        check_integer("top_k", top_k, minimum=0, allow_none=True)
        check_real("top_p", top_p, minimum=0, maximum=1, minimum_inclusive=False, allow_none=True, hint=" 1.0 is off.")
        check_real("temperature", temperature, minimum=0, minimum_inclusive=False)
        if not isinstance(more_smooth, bool):
            raise ValueError(f"more_smooth must be True or False, got {more_smooth!r}.")

    def step(
        self,
        model_output: torch.Tensor,
        scale_index: int,
        guidance_scale: float = 1.0,
        top_k: int | None = 0,
        top_p: float | None = 1.0,
        temperature: float = 1.0,
        more_smooth: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        retrieval_probs: torch.Tensor | None = None,
        retrieval_weight: float = 0.0,
    ) -> VARSchedulerOutput | tuple:
        r"""Sample one scale's token map.

        Args:
            model_output: logits (B, pn², V), or (2B, pn², V) as [cond; uncond] when ``guidance_scale != 1``.
            scale_index: the scale these logits predict.
            guidance_scale, top_k, top_p, temperature: see the class docstring; ``top_k=0``/``top_p=1`` disable.
            more_smooth: also return Gumbel-softmax code weights (for visualisation; not for FID).
            generator: a ``torch.Generator``, or one per image.
            retrieval_probs, retrieval_weight: training-free retrieval: the draw is from ``(1 − λ)·p + λ·r`` with
                ``p`` the filtered model distribution, ``r = retrieval_probs`` (B, pn², V) and ``λ =
                retrieval_weight``; the returned ``logits`` are then the log of that mixture. λ = 0 is the plain
                step, draw for draw.
        """
        self.check_sampling_args(guidance_scale, top_k, top_p, temperature, more_smooth)
        side = self.config.patch_nums[scale_index]
        finite = finite_flag(model_output)
        logits = model_output
        if guidance_scale != 1.0:
            t = self.guidance_weight(scale_index, guidance_scale)
            conditional, unconditional = logits.chunk(2)
            logits = (1 + t) * conditional - t * unconditional
        if logits.shape[1] != side * side:
            raise ValueError(f"Scale {scale_index} has {side * side} positions, but the logits have {logits.shape[1]}.")
        if logits is model_output:
            logits = logits.clone()  # filtering works in place (as the official sampler does), but not on our input
        make_drawable_(logits)
        if temperature != 1.0:
            logits.div_(temperature)
        batch, _, vocab = logits.shape
        top_k_top_p_filter_(logits, top_k=top_k, top_p=top_p)
        probs = logits.softmax(dim=-1)
        if retrieval_weight:
            check_real("retrieval_weight", retrieval_weight, minimum=0, maximum=1, hint=" It mixes two distributions.")
            if retrieval_probs is None or retrieval_probs.shape != probs.shape:
                got = None if retrieval_probs is None else tuple(retrieval_probs.shape)
                raise ValueError(f"retrieval_probs must have shape {tuple(probs.shape)} (B, pn², V), got {got}.")
            probs = probs.mul_(1 - retrieval_weight).add_(retrieval_probs.to(probs), alpha=retrieval_weight)
            logits = probs.log()
        tokens = sample_categorical(probs.view(-1, vocab), generator)
        token_map = tokens.view(batch, side, side)

        code_weights = None
        if more_smooth:
            progress = self.scale_progress(scale_index)
            tau = max(
                self.config.more_smooth_tau_max * (1 - progress * 0.95),
                self.config.more_smooth_tau_min,
            )
            sharpened = logits * (1 + progress)
            gumbel = -_exponential_like(sharpened, generator).log()
            code_weights = ((sharpened + gumbel) / tau).softmax(dim=-1)

        if not return_dict:
            return (token_map, code_weights, logits, finite)
        return VARSchedulerOutput(token_map=token_map, code_weights=code_weights, logits=logits, finite=finite)
