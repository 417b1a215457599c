"""``VARPipeline.compile()``: torch.compile of the parts of sampling that run as static-shape kernels.

What is compiled is what repeats: every transformer block (regional compilation, as diffusers'
``compile_repeated_blocks``) and the tokenizer's decoder. The sampling loop itself (Python control, the
scheduler's draws, the checks) stays eager. Shapes are static: each scale is its own graph (``dynamic=False``),
which is what lets inductor choose kernels per shape and, with ``mode="reduce-overhead"`` on CUDA, ask for CUDA
graphs.

Every block reads its part of the KV cache through its own :class:`~diffusers_var.models.kv_cache.VARLayerCache`
(buffers and cached AdaLN projection passed in, never looked up by layer number), so all blocks run one graph per
scale: ten graphs for the blocks at 256 px, plus one per decoder shape, per batch size. A cache that search has
branched (``clone``/``select``) projects the class again at its next scale, which is one more graph for that scale.
"""

from __future__ import annotations

import os
import shutil
import warnings

import torch

# graphs per compiled code object: one per (scale, batch shape), e.g. ten scales × a few batch sizes
RECOMPILE_LIMIT = 64


def compile_unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot compile for ``device`` here (``None``: it can), checked before anything is compiled."""
    if not hasattr(torch, "compile"):
        return f"this torch ({torch.__version__}) has no torch.compile"
    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        return f"torch.compile has no backend {backend!r} (available: {', '.join(torch._dynamo.list_backends())})"
    if backend != "inductor":
        return None
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "inductor needs triton for CUDA kernels: pip install triton"
    if device.type == "cpu":
        compilers = [os.environ.get("CXX"), "g++", "c++", "clang++"]
        if not any(c and shutil.which(c) for c in compilers):
            return "inductor needs a C++ compiler for CPU kernels (g++ or clang++ on PATH, or CXX)"
        return None
    return f"inductor is not set up here for {device.type} devices"


def compile_pipeline(pipe, mode: str | None = None, backend: str = "inductor", fullgraph: bool = False, **options):
    """Compile ``pipe``'s transformer blocks and decoder in place; see :meth:`VARPipeline.compile`."""
    if mode is not None and backend != "inductor":
        raise ValueError(f"mode={mode!r} is an inductor setting; with backend={backend!r} leave mode=None.")
    modes = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    if mode not in modes:
        raise ValueError(f"mode must be one of {modes}, got {mode!r}.")
    device = pipe._execution_device
    reason = compile_unavailable_reason(backend, device)
    if reason is not None:
        warnings.warn(f"VARPipeline.compile: {reason}; sampling stays eager (same results, not faster).", stacklevel=3)
        return pipe
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    settings = dict(backend=backend, mode=mode, fullgraph=fullgraph, dynamic=False, **options)
    for block in pipe.transformer.blocks:
        block.compile(**settings)
    pipe.vqvae.decoder.compile(**settings)
    pipe._compile_settings = {k: v for k, v in settings.items() if v is not None}
    return pipe
