"""Strict loading for both model classes: a folder whose weights do not fit its config, or a damaged weight file,
is refused with the file and a short list of keys, never loaded with random or meta weights.

diffusers and transformers only warn about missing and unexpected weights (and fill them with a fresh init, or
leave them on the meta device), and report a damaged safetensors file without naming it. ``from_pretrained`` of
:class:`~diffusers_var.MultiScaleVQVAE` and :class:`~diffusers_var.VARTransformer` goes through
:func:`load_strictly`, which keeps the libraries' explicit opt-ins: ``output_loading_info=True`` returns the report
instead of raising, and ``ignore_mismatched_sizes=True`` accepts mis-shaped weights (which are then re-initialised).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

# what a folder's weights may be called, per library (safetensors first; .bin when a user saved without them)
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _short(keys: Iterable[str], limit: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}, … ({len(keys) - limit} more)" if len(keys) > limit else shown


def describe_key_problems(missing: Iterable[str], unexpected: Iterable[str], misshaped: Iterable[str]) -> str:
    """One line naming at most five keys of each kind, e.g. ``missing (1): head.weight``; "" if all is well."""
    parts = []
    for name, keys in (("missing", list(missing)), ("unexpected", list(unexpected)), ("mis-shaped", list(misshaped))):
        if keys:
            parts.append(f"{name} ({len(keys)}): {_short(keys)}")
    return "; ".join(parts)


def _folder(name_or_path: str | os.PathLike, kwargs: dict) -> Path | None:
    """The local folder a load reads: the path itself, or the snapshot in the HF cache that holds it."""
    subfolder = kwargs.get("subfolder") or ""
    path = Path(name_or_path) / subfolder
    if path.is_dir():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(
            str(name_or_path),
            filename=f"{subfolder}/config.json" if subfolder else "config.json",
            cache_dir=kwargs.get("cache_dir"),
            revision=kwargs.get("revision"),
        )
    except Exception:  # not a repo id: nothing to find
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    """The weight files a load of ``variant`` reads: safetensors when there are any (as both libraries prefer)."""
    for suffix in WEIGHT_SUFFIXES:
        files = [p for p in sorted(folder.glob(f"*{suffix}")) if p.is_file()]
        files = [p for p in files if (f".{variant}" in p.name if variant else p.name.count(".") == 1)]
        if files:
            return files
    return []


def _stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes in a weight file; raises if the file is damaged."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:  # reads the header and checks the data covers it
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    state = torch.load(path, map_location="meta", weights_only=True)
    return {key: tuple(value.shape) for key, value in state.items()}


def diagnose(
    name_or_path: str | os.PathLike, kwargs: dict, build_on_meta: Callable[[Path], torch.nn.Module]
) -> str | None:
    """Why a folder does not load: a damaged weight file, or weights that do not fit its config (None if unknown).

    ``build_on_meta(folder)`` builds the model its config describes, without memory, to compare shapes against.
    """
    folder = _folder(name_or_path, kwargs)
    if folder is None:
        return None
    files = _weight_files(folder, kwargs.get("variant"))
    stored = {}
    for path in files:
        try:
            stored.update(_stored_shapes(path))
        except Exception as error:  # safetensors and torch.load raise many types for damaged files
            message = " ".join(str(error).split())
            return (
                f"{path} is damaged or truncated ({type(error).__name__}: {message}). Download or save the model again."
            )
    if not files:
        return None
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build_on_meta(folder).state_dict().items()}
    except Exception:  # an unreadable config: the library's own error says more
        return None
    misshaped = [
        f"{key}: file {stored[key]} vs config {expected[key]}"
        for key in sorted(set(stored) & set(expected))
        if stored[key] != expected[key]
    ]
    problems = describe_key_problems(set(expected) - set(stored), set(stored) - set(expected), misshaped)
    if not problems:
        return None
    return _mismatch_message(folder, files, problems)


def _missing_shards(folder: Path) -> list[str]:
    """Shards that a sharded checkpoint's index lists but the folder lacks."""
    import json

    missing = set()
    for index in folder.glob("*.index*.json"):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            continue
        missing |= {name for name in shards if not (folder / name).is_file()}
    return sorted(missing)


def _mismatch_message(folder: Path | str, files: list[Path] | None, problems: str) -> str:
    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        return (
            f"{folder} holds a LoRA adapter, not a whole model ({problems}). Load the base model it names in "
            "adapter_config.json, then the adapter: pipe.load_lora_weights(...) or transformer.load_adapter(...)."
        )
    if folder.is_dir() and (missing := _missing_shards(folder)):
        return (
            f"{folder} lacks the weight shard(s) {_short(missing)} that its index lists ({problems}). Download or "
            "save the model again."
        )
    if folder.is_dir() and not (folder / "config.json").is_file():
        return (
            f"{folder} has no config.json, so its weights cannot be matched to a model. Download or save the model "
            "again."
        )
    where = str(files[0]) if files and len(files) == 1 else f"{folder} ({len(files or [])} weight files)"
    return (
        f"The weights in {where} do not fit {Path(folder) / 'config.json'}: {problems}. The weight file is damaged "
        "or the config was edited; save or download the model again (output_loading_info=True returns this report "
        "instead of raising)."
    )


def load_strictly(
    load: Callable,
    name_or_path: str | os.PathLike,
    args: tuple,
    kwargs: dict,
    build_on_meta: Callable[[Path], torch.nn.Module],
):
    """Run a library ``from_pretrained`` (``load``) and refuse what it would only warn about.

    Returns what ``load`` returns: the model, or ``(model, loading_info)`` when the caller asked for the report.
    """
    report = kwargs.pop("output_loading_info", False)
    try:
        model, info = load(name_or_path, *args, output_loading_info=True, **kwargs)
    except Exception as error:
        problem = diagnose(name_or_path, kwargs, build_on_meta)
        if problem is not None:
            raise ValueError(problem) from error
        raise
    if report:
        return model, info
    mismatched = [] if kwargs.get("ignore_mismatched_sizes") else info.get("mismatched_keys") or []
    mismatched = [k[0] if isinstance(k, tuple) else k for k in mismatched]
    problems = describe_key_problems(info.get("missing_keys") or [], info.get("unexpected_keys") or [], mismatched)
    if problems:
        folder = _folder(name_or_path, kwargs)
        files = _weight_files(folder, kwargs.get("variant")) if folder is not None else None
        raise ValueError(_mismatch_message(folder or name_or_path, files, problems))
    if kwargs.get("device_map") is None:  # with a device map, accelerate's hooks own the meta weights
        meta = [name for name, param in model.named_parameters() if param.is_meta]
        if meta:
            raise ValueError(f"{name_or_path}: weights left on the meta device after loading: {_short(meta)}.")
    return model
