"""Images and masks as users pass them (PIL, numpy or torch, in [0, 1], diffusers' conventions) turned into what the
tokenizer and the sampling loop take, with errors that name the value and what is allowed."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor | list


def _as_float_array(value, name: str) -> torch.Tensor:
    if isinstance(value, PIL.Image.Image):
        return torch.from_numpy(np.asarray(value).astype(np.float32) / 255.0)
    if isinstance(value, np.ndarray):
        if value.dtype == np.uint8:
            raise ValueError(f"{name} is a uint8 numpy array: pass floats in [0, 1] (array / 255), or a PIL image.")
        if not np.issubdtype(value.dtype, np.floating) and value.dtype != np.bool_:
            raise ValueError(f"{name} must hold floats in [0, 1], got a numpy array of {value.dtype}.")
        return torch.from_numpy(np.array(value, dtype=np.float32))  # a copy: the input may be read-only
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.uint8:
            raise ValueError(f"{name} is a uint8 tensor: pass floats in [0, 1] (tensor / 255), or a PIL image.")
        return value.detach().float().cpu() if value.dtype != torch.bool else value.float().cpu()
    raise ValueError(
        f"{name} must be a PIL image, a numpy array or a torch tensor in [0, 1] (or a list of them), got "
        f"{type(value).__name__}."
    )


def _check_range(values: torch.Tensor, name: str) -> None:
    if values.numel() == 0:
        raise ValueError(f"{name} is empty.")
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} holds NaN or inf values; it must lie in [0, 1].")
    low, high = float(values.min()), float(values.max())
    if low < -1e-6 or high > 1 + 1e-6:
        hint = " This looks like [0, 255]: divide by 255." if high > 1.5 and low >= 0 else ""
        hint = hint or (" This looks like [-1, 1]: use (x + 1) / 2." if low < 0 and low >= -1 - 1e-6 else "")
        raise ValueError(f"{name} must lie in [0, 1], but its values range over [{low:.4g}, {high:.4g}].{hint}")


def prepare_images(image: ImageInput, size: int, name: str = "image") -> torch.Tensor:
    """``image`` → a float tensor (B, 3, size, size) in [-1, 1], what ``vqvae.tokenize`` takes.

    Accepts a PIL image (converted to RGB), a list of them, a numpy array (H, W, 3) or (B, H, W, 3) and a tensor
    (3, H, W) or (B, 3, H, W), in [0, 1] (diffusers' image convention). The size must be the model's: editing
    works on the model's own token grid, so nothing is resized here.
    """
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError(f"{name} is an empty list.")
        return torch.cat([prepare_images(item, size, name) for item in image])
    if isinstance(image, PIL.Image.Image):
        image = image.convert("RGB")
    pixels = _as_float_array(image, name)
    if isinstance(image, (PIL.Image.Image, np.ndarray)):  # channels last
        if pixels.ndim == 3:
            pixels = pixels[None]
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(
                f"{name} must have 3 channels, (H, W, 3) or (B, H, W, 3) for numpy, got shape {tuple(pixels.shape)}."
            )
        pixels = pixels.permute(0, 3, 1, 2)
    else:
        if pixels.ndim == 3:
            pixels = pixels[None]
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(
                f"{name} must have 3 channels, (3, H, W) or (B, 3, H, W) for a tensor, got shape {tuple(pixels.shape)}."
            )
    if tuple(pixels.shape[-2:]) != (size, size):
        raise ValueError(
            f"{name} is {pixels.shape[-1]}×{pixels.shape[-2]} px, but this model works on {size}×{size} px images; "
            f"resize or crop it to {size}×{size} first."
        )
    _check_range(pixels, name)
    return pixels * 2 - 1


def prepare_mask(mask_image: ImageInput, name: str = "mask_image") -> torch.Tensor:
    """``mask_image`` → a float tensor (B or 1, 1, h, w) in [0, 1], at its own size (white, 1 = regenerate).

    Accepts a PIL image (mode ``L`` or ``1``; an RGB image must be grey), a numpy array (H, W), (H, W, 1) or
    (B, H, W, 1), a tensor (H, W), (1, H, W) or (B, 1, H, W), or a list of them.
    """
    if isinstance(mask_image, (list, tuple)):
        if not mask_image:
            raise ValueError(f"{name} is an empty list.")
        return torch.cat([prepare_mask(item, name) for item in mask_image])
    if isinstance(mask_image, PIL.Image.Image) and mask_image.mode == "F":  # float pixels: values as they are
        mask_image = np.asarray(mask_image, dtype=np.float32)
    elif isinstance(mask_image, PIL.Image.Image) and mask_image.mode.startswith("I"):
        raise ValueError(
            f"{name} is a PIL image of mode {mask_image.mode} (integers of unknown range); pass a mode L image "
            "(0-255), or a numpy array or tensor in [0, 1]."
        )
    if isinstance(mask_image, PIL.Image.Image):
        if mask_image.mode not in ("L", "1"):
            rgb = np.asarray(mask_image.convert("RGB"))
            if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])):
                raise ValueError(
                    f"{name} is a {mask_image.mode} image with colour; a mask has 1 channel: pass a grey (mode L) "
                    "image, white = regenerate."
                )
        mask_image = mask_image.convert("L")
    mask = _as_float_array(mask_image, name)
    if isinstance(mask_image, np.ndarray):
        if mask.ndim == 3 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        elif mask.ndim == 4 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        elif mask.ndim == 3 or mask.ndim == 4:
            raise ValueError(
                f"{name} must have 1 channel: (H, W), (H, W, 1) or (B, H, W, 1) for numpy, got shape "
                f"{tuple(mask.shape)}."
            )
    elif isinstance(mask_image, torch.Tensor) and mask.ndim in (3, 4):
        if mask.shape[-3] != 1:
            raise ValueError(
                f"{name} must have 1 channel: (H, W), (1, H, W) or (B, 1, H, W) for a tensor, got shape "
                f"{tuple(mask.shape)}."
            )
        mask = mask.flatten(0, -3)  # (B, H, W)
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"{name} must be a single-channel mask (H, W), got shape {tuple(mask.shape)}.")
    _check_range(mask, name)
    return mask[:, None]


def keep_masks(mask: torch.Tensor, patch_nums: tuple[int, ...]) -> list[torch.BoolTensor]:
    """Per scale, which tokens of the input to keep: ``1 − mask`` resized bilinearly (align_corners=False) from the
    mask's own size to the scale's side and thresholded at > 0.5, as the official zero-shot editing does; scales
    of at most 3 tokens are kept whole (too coarse to split). ``mask`` (B, 1, h, w) in [0, 1], 1 = regenerate."""
    keep = 1 - mask.float()
    masks = []
    for side in patch_nums:
        kept = F.interpolate(keep, size=(side, side), mode="bilinear", align_corners=False)[:, 0] > 0.5
        if side * side <= 3:
            kept = torch.ones_like(kept)
        masks.append(kept)
    return masks
