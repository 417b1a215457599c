"""Argument checks shared by the scheduler, the pipeline and the tokenizer.

Each check raises a ValueError that names the argument, the value it got, what is allowed and, where there is an
obvious one, the fix, before the value can reach torch and fail there with a message about something else.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch


class NonFiniteError(RuntimeError):
    """A model produced NaN or inf: damaged weights, or an overflow in half precision. Nothing is returned."""


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool)


def check_integer(name: str, value, minimum: int | None = None, allow_none: bool = False) -> None:
    """``value`` is a Python or NumPy integer (not a bool, not a float such as 2.0) ≥ ``minimum``."""
    if value is None and allow_none:
        return
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer{' or None' if allow_none else ''}, got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be ≥ {minimum}, got {value}.")


def check_real(
    name: str,
    value,
    minimum: float | None = None,
    maximum: float | None = None,
    minimum_inclusive: bool = True,
    allow_none: bool = False,
    hint: str = "",
) -> None:
    """``value`` is a finite real number (not a bool) in the given range; ``hint`` explains the range."""
    if value is None and allow_none:
        return
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}.{hint}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}.{hint}")
    below = minimum is not None and (value < minimum if minimum_inclusive else value <= minimum)
    if below or (maximum is not None and value > maximum):
        if maximum is None:
            allowed = f"be {'≥' if minimum_inclusive else '>'} {minimum}"
        elif minimum is None:
            allowed = f"be ≤ {maximum}"
        else:
            allowed = f"lie in {'[' if minimum_inclusive else '('}{minimum}, {maximum}]"
        raise ValueError(f"{name} must {allowed}, got {value}.{hint}")


def check_generator(generator, batch_size: int | None = None) -> None:
    """None, a ``torch.Generator``, or a list of them (one per image when ``batch_size`` is given)."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, (list, tuple)) and generator and all(isinstance(g, torch.Generator) for g in generator):
        if batch_size is not None and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for {batch_size} images; pass one, or one per image.")
        return
    raise ValueError(
        f"generator must be a torch.Generator or a list of them, got {generator!r}. For a seed, pass "
        "torch.Generator().manual_seed(seed)."
    )


def class_label_entries(class_labels, allow_unconditional: bool = False) -> list[int | str | None]:
    """Flatten ``class_labels`` into a list of ints, names and (if allowed) ``None`` for unconditional entries.

    Accepted: an int, a name, a 1-D integer tensor or array, or a non-empty list of ints and names. Floats (even
    2.0), bools, nested lists and empty lists are refused: each would otherwise be read as some class silently.
    """
    allowed = "class ids (ints) or names" + (", or None for an unconditional image" if allow_unconditional else "")
    if isinstance(class_labels, (torch.Tensor, np.ndarray)):
        dtype = class_labels.dtype
        integral = (
            not class_labels.is_floating_point() and not class_labels.is_complex() and dtype != torch.bool
            if isinstance(class_labels, torch.Tensor)
            else np.issubdtype(dtype, np.integer)
        )
        if not integral or class_labels.ndim > 1:
            raise ValueError(
                f"class_labels must be a 0-D or 1-D integer tensor of class ids, got {tuple(class_labels.shape)} "
                f"of {dtype}."
            )
        class_labels = class_labels.reshape(-1).tolist()
        if not class_labels:
            raise ValueError("class_labels is empty; give at least one class (or None for random classes).")
        return class_labels
    if isinstance(class_labels, (str, numbers.Integral)) and not _is_bool(class_labels):
        return [class_labels]
    if not isinstance(class_labels, (list, tuple)):
        raise ValueError(f"class_labels must be {allowed}, got {class_labels!r}.")
    if not class_labels:
        raise ValueError("class_labels is empty; give at least one class (or None for random classes).")
    entries = []
    for position, entry in enumerate(class_labels):
        if isinstance(entry, torch.Tensor) and entry.ndim == 0 and not entry.is_floating_point():
            entry = entry.item()
        if entry is None and allow_unconditional:
            entries.append(None)
        elif isinstance(entry, str) or (isinstance(entry, numbers.Integral) and not _is_bool(entry)):
            entries.append(entry if isinstance(entry, str) else int(entry))
        else:
            raise ValueError(f"class_labels[{position}] is {entry!r}; each entry must be one of {allowed}.")
    return entries
