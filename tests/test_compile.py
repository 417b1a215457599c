"""VARPipeline.compile(): the compiled blocks and decoder sample the same tokens as eager, or it stays eager."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import tiny_pipeline

from diffusers_var.pipelines import compilation


def _sample(pipe, **kwargs):
    return pipe(class_labels=[1, 3], output_type="pt", generator=torch.Generator().manual_seed(5), **kwargs)


def test_compiled_sampling_draws_the_eager_tokens():
    pipe = tiny_pipeline(patch_nums=(1, 2), depth=2)
    eager = [_sample(pipe, top_k=1), _sample(pipe, top_k=3, top_p=0.9)]
    start = time.perf_counter()
    assert pipe.compile() is pipe
    compiled = [_sample(pipe, top_k=1), _sample(pipe, top_k=3, top_p=0.9)]
    print(f"compile and two calls: {time.perf_counter() - start:.1f} s")
    assert all(block._compiled_call_impl is not None for block in pipe.transformer.blocks)
    assert pipe.vqvae.decoder._compiled_call_impl is not None
    for before, after in zip(eager, compiled):  # greedy, then seeded top-k/top-p
        assert all(torch.equal(a, b) for a, b in zip(before.token_maps, after.token_maps))
        torch.testing.assert_close(after.images, before.images, atol=1e-5, rtol=0)
    fresh = tiny_pipeline(patch_nums=(1, 2), depth=2)
    assert list(pipe.transformer.state_dict()) == list(fresh.transformer.state_dict())  # saving is unchanged


def test_compile_without_a_compiler_warns_and_stays_eager(monkeypatch):
    pipe = tiny_pipeline()
    monkeypatch.setattr(compilation.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.warns(UserWarning, match="C\\+\\+ compiler.*stays eager"):
        pipe.compile()
    assert all(block._compiled_call_impl is None for block in pipe.transformer.blocks)
    with pytest.warns(UserWarning, match="no backend 'nonexistent'"):
        pipe.compile(backend="nonexistent")
    with pytest.raises(ValueError, match="mode must be one of"):
        pipe.compile(mode="fastest")
    with pytest.raises(ValueError, match="inductor setting"):
        pipe.compile(mode="reduce-overhead", backend="eager")


def test_blocks_share_one_graph_per_scale():
    """The blocks read their cache through their own VARLayerCache, never by layer number, so dynamo builds one
    graph per scale for all of them (plus the decoder's), not depth × scales."""
    from torch._dynamo.utils import counters

    pipe = tiny_pipeline(patch_nums=(1, 2, 3), depth=4)
    torch._dynamo.reset()
    counters.clear()
    try:
        pipe.compile(backend="eager", fullgraph=True)  # fullgraph: no graph breaks either
        _sample(pipe)
        assert counters["stats"]["unique_graphs"] == 3 + 1
    finally:
        torch._dynamo.reset()
