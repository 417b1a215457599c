"""LoRA for the VAR transformer, through transformers' PEFT integration.

Training adds low-rank adapters to the attention and MLP projections and trains only them
(``examples/train_var.py --lora_rank R``); the result is a PEFT adapter folder (``adapter_model.safetensors`` and
``adapter_config.json``, which names the base model). Loading works as for any transformers model
(``pipe.transformer.load_adapter(folder)``) or in diffusers' manner on the pipeline
(:meth:`VARPipeline.load_lora_weights`, :meth:`~VARPipeline.fuse_lora`, ...), which this module implements.

Example:
    ```py
    >>> pipe = VARPipeline.from_pretrained("var-digits")
    >>> pipe.load_lora_weights("path/to/lora-output")     # or a Hub repo id
    >>> pipe.fuse_lora()                                  # merge into the weights for inference speed
    ```
"""

from __future__ import annotations

import os

import torch

# what the adapters wrap by default: each block's attention (fused qkv, output) and MLP projections
DEFAULT_TARGET_MODULES = ("qkv", "out_proj", "fc1", "fc2")
# beside the adapter: the class names of its training data (an adapter config has no place for them)
ID2LABEL_FILE = "id2label.json"


def require_peft():
    """The ``peft`` package, or an ImportError that says how to install it."""
    try:
        import peft
    except ImportError as error:
        raise ImportError(
            "LoRA needs the `peft` package: pip install 'diffusers-var[train]' (or pip install peft)."
        ) from error
    return peft


def lora_config(
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: tuple[str, ...] | list[str] = DEFAULT_TARGET_MODULES,
    base_model: str | None = None,
):
    """A ``peft.LoraConfig`` for the VAR transformer; ``alpha`` defaults to the rank (scale 1)."""
    if rank < 1:
        raise ValueError(f"The LoRA rank must be ≥ 1, got {rank}.")
    return require_peft().LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        base_model_name_or_path=base_model,
    )


def add_lora(transformer: torch.nn.Module, config) -> tuple[int, int]:
    """Add the adapter of ``config`` to ``transformer`` and freeze everything else; (trainable, total) parameters.

    Raises a ValueError naming the modules that exist if a target module matches nothing.
    """
    require_peft()
    names = {name.rsplit(".", 1)[-1] for name, _ in transformer.named_modules()}
    unknown = sorted(set(config.target_modules) - names)
    if unknown:
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise ValueError(f"LoRA target module(s) {unknown} are not in the transformer; its linear layers are {linear}.")
    base_model = config.base_model_name_or_path
    try:
        transformer.add_adapter(config)
    except ValueError as error:  # transformers refuses a peft older than it needs, in its own words
        raise ValueError(f"transformers' PEFT integration refused the adapter: {error}") from error
    if base_model:  # transformers records the transformer's own folder; the adapter's base is the pipeline
        for adapter in transformer.peft_config.values():
            adapter.base_model_name_or_path = base_model
    trainable = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in transformer.parameters())


def tuner_layers(model: torch.nn.Module) -> list:
    """The modules that carry adapters (PEFT's ``BaseTunerLayer``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def has_adapters(model: torch.nn.Module) -> bool:
    """Whether adapters are attached (transformers then saves only the adapter, not the model)."""
    return bool(getattr(model, "peft_config", None))


def fuse(model: torch.nn.Module, lora_scale: float = 1.0, adapter_names: list[str] | None = None) -> None:
    """Merge the active adapters into the base weights, scaled by ``lora_scale`` (as diffusers does, the layers keep
    that scale, so :func:`unfuse` takes out exactly what was merged)."""
    layers = tuner_layers(model)
    if not layers:
        raise ValueError("There is no LoRA adapter to fuse: load one with load_lora_weights first.")
    for layer in layers:
        if lora_scale != 1.0:
            layer.scale_layer(lora_scale)
        layer.merge(adapter_names=adapter_names)


def unfuse(model: torch.nn.Module) -> None:
    """Undo :func:`fuse`: take the merged adapters out of the base weights again."""
    for layer in tuner_layers(model):
        if layer.merged:
            layer.unmerge()


def unload(model: torch.nn.Module) -> None:
    """Remove the adapter layers, putting their base layers back; weights fused with :func:`fuse` stay fused (as
    diffusers' ``unload_lora_weights`` does), so fuse → unload → save gives a plain model with the adapter in it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and name:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    model._hf_peft_config_loaded = False
    # load_adapter leaves its key renaming (the PEFT "base_model.model." prefix) as the model's weight conversions,
    # which the next save_pretrained would apply to the plain weights; VAR's own loading has none
    model._weight_conversions = []


def read_id2label(name_or_path: str | os.PathLike, **hub_kwargs) -> dict[int, str] | None:
    """The class names saved beside an adapter (a folder or a Hub repo id), or None if it has none."""
    import json

    path = os.path.join(os.fspath(name_or_path), ID2LABEL_FILE)
    if not os.path.isdir(os.fspath(name_or_path)):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            path = hf_hub_download(os.fspath(name_or_path), ID2LABEL_FILE, **hub_kwargs)
        except (EntryNotFoundError, LocalEntryNotFoundError):
            return None
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return {int(k): v for k, v in json.load(handle).items()}


def adapter_source(name_or_path: str | os.PathLike) -> str:
    """A folder or repo id as ``load_adapter`` takes it, with a clear error for a folder without an adapter."""
    path = os.fspath(name_or_path)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise ValueError(
            f"{path} holds no LoRA adapter (adapter_config.json); train one with examples/train_var.py --lora_rank."
        )
    return path
