"""The frozen reference model of the post-training objectives (CCA, DDO): loaded, checked against the trained model,
frozen, and optionally kept in CPU memory between its forward passes.

Both objectives score an image by the log-likelihood ratio log p_θ(x|c) − log p_ref(x|c), so the reference must
read the same token pyramids as the trained model: same tokenizer, vocabulary, scales, latent width and classes.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..models.transformer import VARTransformer
from ..models.vqvae import MultiScaleVQVAE

# what the log-likelihood of a token pyramid depends on; a reference that differs in any cannot be compared
_MATCHING_CONFIG = ("vocab_size", "patch_nums", "latent_channels", "num_classes")


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Set every dropout and drop-path probability to 0, in place (returns ``model``).

    The likelihood ratio is then exactly 0 where θ equals the reference, and the trained model and its reference
    score the same function of the weights (DDO disables all dropout; CCA's VAR recipes set drop-path to 0). The
    saved config keeps the original rates, so a later fine-tuning with cross-entropy gets them back.
    """
    from ..models.transformer import DropPath

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(module, DropPath):
            module.prob = 0.0
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.0
    return model


def check_reference(
    reference: VARTransformer,
    transformer: VARTransformer,
    reference_vqvae: MultiScaleVQVAE | None = None,
    vqvae: MultiScaleVQVAE | None = None,
) -> None:
    """Raise if ``reference`` cannot score the token pyramids of ``transformer``: a different vocabulary, scales,
    latent width or class count, or (when both are given) a different tokenizer."""
    for key in _MATCHING_CONFIG:
        ours, theirs = getattr(transformer.config, key), getattr(reference.config, key)
        if (list(ours) if isinstance(ours, (list, tuple)) else ours) != (
            list(theirs) if isinstance(theirs, (list, tuple)) else theirs
        ):
            raise ValueError(
                f"The reference model's {key} is {theirs}, the trained model's is {ours}: the likelihood ratio "
                "compares the two on the same token pyramids. Give a --reference_model fine-tuned from the same "
                "model (or leave it out: the starting weights are the reference)."
            )
    if reference_vqvae is not None and vqvae is not None:
        from ..retrieval.datastore import tokenizer_fingerprint

        if tokenizer_fingerprint(reference_vqvae) != tokenizer_fingerprint(vqvae):
            raise ValueError(
                "The reference pipeline's tokenizer differs from the trained model's, so its token maps mean other "
                "images. Give a reference that shares the tokenizer (or a transformer folder), or leave "
                "--reference_model out: the starting weights are the reference."
            )


def load_reference(name_or_path: str, cache_dir: str | None = None) -> tuple[VARTransformer, MultiScaleVQVAE | None]:
    """A reference transformer from a VARPipeline folder or Hub repo (with its tokenizer, for the check) or from a
    transformer folder (``transformer/`` of a pipeline)."""
    folder = Path(name_or_path)
    if folder.is_dir() and (folder / "config.json").is_file() and not (folder / "model_index.json").is_file():
        return VARTransformer.from_pretrained(folder), None
    from ..pipelines.var import VARPipeline

    pipe = VARPipeline.from_pretrained(name_or_path, cache_dir=cache_dir)
    return pipe.transformer, pipe.vqvae


def frozen_reference(model: VARTransformer, offload_to: torch.device | str | None = None) -> VARTransformer:
    """A frozen copy of ``model``'s current weights: no gradients, evaluation mode, no dropout, sharing no tensor
    with ``model``. Built afresh at the start of each self-play round.

    ``offload_to``: keep the copy's weights in CPU memory and move each layer to this device only for its forward
    (accelerate's ``cpu_offload``), so that the reference costs one layer of accelerator memory instead of a whole
    model, at the price of a host-to-device transfer of its weights per step.

    Example:
        ```py
        >>> reference = frozen_reference(transformer)            # beside the trained model
        >>> reference = frozen_reference(transformer, "cuda:0")  # weights in CPU memory, computed on cuda:0
        ```
    """
    reference = copy.deepcopy(model)
    reference.requires_grad_(False).eval()
    disable_dropout(reference)
    if offload_to is None:
        return reference
    from accelerate import cpu_offload

    return cpu_offload(reference.to("cpu"), execution_device=torch.device(offload_to))
