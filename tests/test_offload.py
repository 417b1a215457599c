"""Offloading: what ``enable_model_cpu_offload`` and ``enable_sequential_cpu_offload`` apply (accelerate's hooks),
run on CPU. Sampling must go through entry points the hooks see, and give the tokens of a plain run.

(diffusers builds the execution device as ``cpu:0`` when asked for the CPU, which accelerate's sequential hooks
cannot handle for any model; the sequential tests therefore attach accelerate's ``cpu_offload`` themselves, with the
``cpu`` device, exactly as ``enable_sequential_cpu_offload`` does otherwise.)
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from accelerate import cpu_offload
from accelerate.hooks import AlignDevicesHook, CpuOffload
from conftest import tiny_pipeline


def sample(pipe, **kwargs):
    kwargs = {"class_labels": [1, 2], "top_k": 5, "output_type": "pt", **kwargs}
    return pipe(generator=torch.Generator().manual_seed(0), **kwargs)


def count_hook_calls(monkeypatch, hook_class) -> Counter:
    """Count pre_forward calls of every hook of ``hook_class``, by the class of the module they serve."""
    calls = Counter()
    original = hook_class.pre_forward

    def counting(self, module, *args, **kwargs):
        calls[type(module).__name__] += 1
        return original(self, module, *args, **kwargs)

    monkeypatch.setattr(hook_class, "pre_forward", counting)
    return calls


@pytest.mark.parametrize("output_type", ["pt", "latent"])
def test_sequential_offload_from_the_meta_device_gives_the_same_tokens(monkeypatch, output_type):
    expected = sample(tiny_pipeline(), output_type=output_type)
    pipe = tiny_pipeline()
    for model in (pipe.transformer, pipe.vqvae):
        cpu_offload(model, torch.device("cpu"), offload_buffers=len(model._parameters) > 0)
    assert {p.device.type for p in [*pipe.transformer.parameters(), *pipe.vqvae.parameters()]} == {"meta"}
    calls = count_hook_calls(monkeypatch, AlignDevicesHook)

    out = sample(pipe, output_type=output_type)

    assert all(torch.equal(a, b) for a, b in zip(out.token_maps, expected.token_maps))
    torch.testing.assert_close(out.images, expected.images, atol=1e-6, rtol=0)
    # every weight was brought in by its own module's hook: the transformer's (at each of the 3 scales), the
    # codebook's (quantizer embedding) and, for images, the decoder's
    assert calls["QKVProjection"] == 3 * 2  # 2 blocks × 3 scales
    assert calls["VARTransformer"] == 3 * 2  # its own weights' hook and the input-placing hook, at each scale
    assert calls["Embedding"] >= 3 * 2 + 3  # class embedding and level embedding per scale, the codebook per scale
    assert calls["Conv2d"] >= 3  # the φ convolutions of every scale
    assert (calls["GroupNorm"] > 0) == (output_type == "pt")  # the decoder runs only for images
    assert {p.device.type for p in pipe.transformer.parameters()} == {"meta"}  # and sent back


def test_sequential_offload_also_covers_tokenize_and_gumbel_smoothing():
    reference = tiny_pipeline()
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    expected_tokens = reference.vqvae.tokenize(images)
    expected = sample(reference, more_smooth=True)
    pipe = tiny_pipeline()
    for model in (pipe.transformer, pipe.vqvae):
        cpu_offload(model, torch.device("cpu"), offload_buffers=len(model._parameters) > 0)
    assert all(torch.equal(a, b) for a, b in zip(pipe.vqvae.tokenize(images), expected_tokens))
    torch.testing.assert_close(sample(pipe, more_smooth=True).images, expected.images, atol=1e-6, rtol=0)


def test_model_offload_hooks_fire_and_give_the_same_samples(monkeypatch):
    expected = sample(tiny_pipeline())
    pipe = tiny_pipeline()
    pipe.enable_model_cpu_offload(device="cpu")
    calls = count_hook_calls(monkeypatch, CpuOffload)

    out = sample(pipe)

    assert all(torch.equal(a, b) for a, b in zip(out.token_maps, expected.token_maps))
    torch.testing.assert_close(out.images, expected.images, atol=1e-6, rtol=0)
    assert calls["VARTransformer"] == 3  # forward at every scale: the transformer's hook sees each one
    assert calls["MultiScaleVQVAE"] >= 1  # decode (apply_forward_hook)
    assert all(p.device.type == "cpu" for p in pipe.transformer.parameters())


def test_keep_on_execution_device_places_the_tokenizer_without_offloading_the_transformer(monkeypatch):
    """Inside the loop the tokenizer joins the transformer; only decoding (the usual hook) sends the transformer
    back. Checked with the hooks' own bookkeeping, since on a CPU-only machine every device is the CPU."""
    pipe = tiny_pipeline()
    pipe.enable_model_cpu_offload(device="cpu")
    offloaded = []
    for hook in pipe._all_hooks:
        monkeypatch.setattr(hook, "offload", lambda hook=hook: offloaded.append(type(hook.model).__name__))
    moved = []
    to = type(pipe.vqvae).to
    monkeypatch.setattr(type(pipe.vqvae), "to", lambda self, *a, **k: moved.append(a) or to(self, *a, **k))
    # pretend the tokenizer sits on another device, so the per-scale hook has to move it
    monkeypatch.setattr(
        type(pipe.vqvae), "parameters", lambda self, recurse=True: iter([torch.empty(0, device="meta")])
    )
    latents = torch.zeros(1, 8, 4, 4)
    pipe.vqvae.accumulate_scale(latents, 0, torch.zeros(1, 1, 1, dtype=torch.long))
    assert moved and offloaded == []  # brought to the execution device, and the transformer left where it is


def test_layerwise_casting_on_the_tokenizer_samples():
    """diffusers' layerwise casting (float8 storage, float32 compute) hooks every layer of the tokenizer; the
    quantizer stays in full precision (it picks codes by distance)."""
    expected = sample(tiny_pipeline())
    pipe = tiny_pipeline()
    pipe.vqvae.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert pipe.vqvae.decoder.conv_out.weight.dtype == torch.float8_e4m3fn
    assert pipe.vqvae.quantizer.embedding.weight.dtype == torch.float32
    out = sample(pipe)
    assert all(torch.equal(a, b) for a, b in zip(out.token_maps, expected.token_maps))
    assert torch.isfinite(out.images).all() and (out.images - expected.images).abs().max() < 0.25
