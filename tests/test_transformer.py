"""VARTransformer: teacher forcing, the block-causal mask, the KV-cached sampling path and training features."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_transformer

from diffusers_var import VARConfig, VARTransformer, VARTransformerOutput

LABELS = torch.tensor([3, 7])


def _inputs(model: VARTransformer, batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.num_tokens - model.first_l, model.config.latent_channels, generator=generator)


@pytest.mark.parametrize("shared_adaln", [False, True])
@pytest.mark.parametrize("attn_l2_norm", [True, False])
def test_kv_cached_sampling_path_equals_teacher_forcing(shared_adaln, attn_l2_norm):
    """Running scale by scale against the cache gives the same logits as the masked full-sequence pass."""
    model = tiny_transformer(shared_adaln=shared_adaln, attn_l2_norm=attn_l2_norm)
    inputs = _inputs(model)
    with torch.no_grad():
        full = model(LABELS, inputs).logits
        cache = model.allocate_kv_cache(2)
        pointers = [k.data_ptr() for k in cache.keys]
        pieces = []
        for si, (begin, end) in enumerate(model.begin_ends):
            scale_input = None if si == 0 else inputs[:, begin - model.first_l : end - model.first_l]
            pieces.append(model.forward_scale(LABELS, si, scale_input, cache))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert [k.data_ptr() for k in cache.keys] == pointers, "the cache was reallocated while sampling"
    assert cache.length == model.num_tokens


@pytest.mark.parametrize("shared_adaln", [False, True])
def test_cached_sampling_projects_the_class_once_per_labels_tensor(shared_adaln):
    """The AdaLN projections depend on the class only: a cache computes them at the first scale and reuses them
    while the labels are the same, unchanged tensor; new or modified labels are projected again (never stale)."""
    model = tiny_transformer(shared_adaln=shared_adaln)
    projections = [model.head_adaln] + ([model.shared_adaln] if shared_adaln else [b.adaln for b in model.blocks])
    calls = []
    for module in projections:
        module.register_forward_hook(lambda module, inputs, output: calls.append(module))
    inputs = _inputs(model)

    def scale_input(si):
        begin, end = model.begin_ends[si]
        return None if si == 0 else inputs[:, begin - model.first_l : end - model.first_l]

    labels = LABELS.clone()
    with torch.no_grad():
        full = model(labels, inputs).logits
        cache, calls[:] = model.allocate_kv_cache(2), []
        pieces = [model.forward_scale(labels, si, scale_input(si), cache) for si in range(len(model.patch_nums))]
        assert len(calls) == len(projections), "the class was projected again at a later scale"
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)

        cache = model.allocate_kv_cache(2)
        model.forward_scale(labels, 0, None, cache)
        other = torch.tensor([1, 2])
        calls[:] = []
        model.forward_scale(other, 1, scale_input(1), cache)  # another tensor: projected anew
        assert len(calls) == len(projections)
        calls[:] = []
        other.fill_(5)  # the same tensor changed in place: projected anew again
        model.forward_scale(other, 2, scale_input(2), cache)
        assert len(calls) == len(projections)
        cache = model.allocate_kv_cache(2)
        model.forward_scale(labels, 0, None, cache)
        calls[:] = []
        model.forward_scale(labels, 1, scale_input(1), cache.select(torch.tensor([1, 0])))  # rows moved: anew
        assert len(calls) == len(projections)


def test_block_causal_mask_hides_finer_scales():
    model = tiny_transformer()
    inputs = _inputs(model)
    changed = inputs.clone()
    begin_last = model.begin_ends[-1][0] - model.first_l
    changed[:, begin_last:] += 1.0  # only the last scale's inputs change
    with torch.no_grad():
        a, b = model(LABELS, inputs).logits, model(LABELS, changed).logits
    coarse = model.begin_ends[-1][0]
    assert torch.equal(a[:, :coarse], b[:, :coarse])
    assert not torch.allclose(a[:, coarse:], b[:, coarse:])
    mask = model.block_causal_mask(torch.float32)
    assert mask.shape == (21, 21) and mask[0, 1] == float("-inf") and mask[4, 1] == 0 and mask[1, 4] == 0


def test_loss_is_label_smoothed_cross_entropy():
    model = tiny_transformer(label_smoothing=0.1)
    targets = torch.randint(32, (2, 21), generator=torch.Generator().manual_seed(0))
    out = model(LABELS, _inputs(model), labels=targets)
    expected = F.cross_entropy(out.logits.reshape(-1, 32), targets.flatten(), label_smoothing=0.1)
    torch.testing.assert_close(out.loss, expected)
    loss, logits = model(LABELS, _inputs(model), labels=targets, return_dict=False)
    torch.testing.assert_close(logits, out.logits)
    token_maps = [targets[:, :1].view(2, 1, 1), targets[:, 1:5].view(2, 2, 2), targets[:, 5:].view(2, 4, 4)]
    torch.testing.assert_close(model(LABELS, _inputs(model), labels=token_maps).loss, out.loss)


def test_class_dropout_only_in_training():
    model = tiny_transformer(class_dropout_prob=1.0)
    inputs = _inputs(model)
    with torch.no_grad():
        null = model(torch.full_like(LABELS, 10), inputs).logits
        conditional = model(LABELS, inputs).logits  # eval: labels kept
        model.train()
        dropped = model(LABELS, inputs).logits  # train with p=1: every label becomes the null class
    assert not torch.allclose(conditional, null)
    torch.testing.assert_close(dropped, null)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_transformer(class_dropout_prob=0.0).train()
    targets = torch.randint(32, (2, 21), generator=torch.Generator().manual_seed(1))
    model(LABELS, _inputs(model), labels=targets).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert all(block.gradient_checkpointing for block in model.blocks)
    model(LABELS, _inputs(model), labels=targets).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, plain[name], msg=name)


def test_every_parameter_is_trained():
    model = tiny_transformer(class_dropout_prob=0.0, shared_adaln=True).train()
    targets = torch.randint(32, (2, 21), generator=torch.Generator().manual_seed(1))
    model(LABELS, _inputs(model), labels=targets).loss.backward()
    untouched = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    # class rows other than 3 and 7 get no gradient by construction; everything else must
    assert untouched == [], untouched


def test_initialisation_follows_the_official_recipe():
    torch.manual_seed(0)
    config = VARConfig(
        num_classes=10, vocab_size=32, latent_channels=8, patch_nums=(1, 2, 4), depth=4, embed_dim=64, num_heads=4
    )
    model = VARTransformer(config)
    std = (1 / 64 / 3) ** 0.5
    assert abs(model.input_proj.weight.std().item() - std) < 0.2 * std
    gates = model.blocks[0].adaln.weight[: 2 * 64]
    assert gates.abs().max() < 1e-4  # AdaLN gates start near zero, so each block starts as the identity
    assert abs(model.head.weight.std().item() - 0.02 * std) < 0.2 * 0.02 * std
    residual = model.blocks[0].mlp.fc2.weight.std().item()
    assert abs(residual - std / (2 * 4) ** 0.5) < 0.2 * std / (2 * 4) ** 0.5
    assert torch.all(model.blocks[0].attn.logit_scale == torch.tensor(4.0).log())


def test_bad_inputs_are_refused():
    model = tiny_transformer()
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 10\]"):
        model(torch.tensor([3, 11]), _inputs(model))
    with pytest.raises(ValueError, match=r"next_scale_inputs must have shape \(2, 20, 8\)"):
        model(LABELS, torch.zeros(2, 19, 8))
    with pytest.raises(ValueError, match="labels must have shape"):
        model(LABELS, _inputs(model), labels=torch.zeros(2, 20, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        VARConfig(embed_dim=30, num_heads=4)
    cache = model.allocate_kv_cache(2)
    with pytest.raises(ValueError, match="Scale 1 needs the first 1 positions cached"):
        model.forward_scale(LABELS, 1, torch.zeros(2, 4, 8), cache)


@pytest.mark.parametrize("new_classes", [4, 25])
def test_resize_class_embedding_keeps_classes_and_the_null_row(tmp_path, new_classes):
    model = tiny_transformer()
    old = model.class_embedding.weight.detach().clone()
    model.resize_class_embedding(new_classes)
    weight = model.class_embedding.weight
    kept = min(10, new_classes)
    assert weight.shape == (new_classes + 1, 32) and weight.requires_grad
    assert torch.equal(weight[:kept], old[:kept]) and torch.equal(weight[new_classes], old[10])
    assert model.config.num_classes == new_classes
    model.save_pretrained(tmp_path)
    reloaded = VARTransformer.from_pretrained(tmp_path)
    assert reloaded.config.num_classes == new_classes and torch.equal(reloaded.class_embedding.weight, weight)
    with pytest.raises(ValueError, match="num_classes must be ≥ 1"):
        model.resize_class_embedding(0)


# -- the transformers model API ---------------------------------------------------------------------------------------


def test_cached_calls_go_through_forward_and_return_the_cache():
    model = tiny_transformer()
    inputs = _inputs(model)
    with torch.no_grad():
        full = model(LABELS, inputs).logits
        cache = model.allocate_kv_cache(2)
        out = model(LABELS, None, kv_cache=cache, scale_index=0)
        assert out.cache is cache and out.logits.shape == (2, 1, 32)
        begin, end = model.begin_ends[1]
        second = model(LABELS, inputs[:, begin - 1 : end - 1], kv_cache=cache, scale_index=1).logits
    torch.testing.assert_close(second, full[:, begin:end], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pass kv_cache as well"):
        model(LABELS, inputs, scale_index=0)
    with pytest.raises(ValueError, match="labels .* need teacher forcing"):
        model(LABELS, None, labels=torch.zeros(2, 21, dtype=torch.long), kv_cache=model.allocate_kv_cache(2),
              scale_index=0)  # fmt: skip
    with pytest.raises(ValueError, match=r"Scale 2 needs an input of shape \(2, 16, 8\)"):
        model(LABELS, None, kv_cache=cache, scale_index=2)  # the cache holds scales 0-1, but no input is given
    with pytest.raises(ValueError, match=r"scale_index must be in \[0, 3\)"):
        model(LABELS, None, kv_cache=cache, scale_index=3)


def test_config_aliases_and_output_defaults_follow_transformers():
    model = tiny_transformer()
    config = model.config
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (32, 2, 2)
    config.num_hidden_layers = 3  # an alias writes the real field
    assert config.depth == 3
    config.num_hidden_layers = 2
    inputs = _inputs(model)
    with torch.no_grad():
        assert model(LABELS, inputs).hidden_states is None
        model.set_attn_implementation("eager")  # transformers allows output_attentions in the config only for eager
        config.output_hidden_states, config.output_attentions = True, True
        out = model(LABELS, inputs)
        assert len(out.hidden_states) == 3 and len(out.attentions) == 2
        config.return_dict = False
        assert isinstance(model(LABELS, inputs), tuple)
        assert isinstance(model(LABELS, inputs, return_dict=True), VARTransformerOutput)


def test_attention_weights_show_which_scales_a_token_sees():
    model = tiny_transformer()
    inputs = _inputs(model)
    with torch.no_grad():
        out = model(LABELS, inputs, output_attentions=True)
    weights = out.attentions[0]
    assert len(out.attentions) == 2 and weights.shape == (2, 2, 21, 21)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 21))
    visible = model.block_causal_mask(torch.float32) == 0
    assert (weights[..., ~visible] == 0).all() and (weights[..., visible] > 0).all()
    # the cached path returns each scale's weights over every position cached so far
    with torch.no_grad():
        cache = model.allocate_kv_cache(2)
        model(LABELS, None, kv_cache=cache, scale_index=0)
        begin, end = model.begin_ends[1]
        cached = model(LABELS, inputs[:, begin - 1 : end - 1], kv_cache=cache, scale_index=1, output_attentions=True)
    torch.testing.assert_close(cached.attentions[0], weights[:, :, begin:end, :end], atol=1e-5, rtol=1e-5)


def test_eager_and_sdpa_agree_and_the_setting_is_honoured(monkeypatch):
    model = tiny_transformer()
    inputs = _inputs(model)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        sdpa = model(LABELS, inputs).logits
        model.set_attn_implementation("eager")
        calls = []
        real_softmax = torch.Tensor.softmax
        monkeypatch.setattr(
            torch.Tensor, "softmax", lambda self, *a, **k: calls.append(1) or real_softmax(self, *a, **k)
        )
        eager = model(LABELS, inputs).logits
    assert len(calls) >= 2, "attn_implementation='eager' did not run the eager attention"
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)


def test_input_embeddings_and_input_require_grads():
    def frozen_and_checkpointed(require_input_grads: bool) -> tuple[VARTransformer, torch.Tensor]:
        model = tiny_transformer()
        model.requires_grad_(False)
        if require_input_grads:
            model.enable_input_require_grads()  # what PEFT calls for gradient checkpointing over a frozen base
        model.activation_checkpointing_enable({"use_reentrant": True})  # reentrant needs inputs that require grad
        qkv = model.blocks[0].attn.qkv.weight
        qkv.requires_grad_(True)  # as an adapter inside a checkpointed block would be
        return model.train(), qkv

    model, qkv = frozen_and_checkpointed(require_input_grads=False)
    assert not model(LABELS, _inputs(model), labels=torch.zeros(2, 21, dtype=torch.long)).loss.requires_grad
    model, qkv = frozen_and_checkpointed(require_input_grads=True)
    assert model.get_input_embeddings() is model.class_embedding  # the embedding of class_labels, the main input
    model(LABELS, _inputs(model), labels=torch.zeros(2, 21, dtype=torch.long)).loss.backward()
    assert qkv.grad is not None and qkv.grad.abs().sum() > 0
    replacement = torch.nn.Embedding(12, 32)
    model.set_input_embeddings(replacement)
    assert model.class_embedding is replacement
    with pytest.raises(NotImplementedError, match="resize_class_embedding"):
        model.resize_token_embeddings(40)


def test_a_dropped_kv_cache_frees_its_buffers_at_once():
    """No reference cycle: the pipeline drops the cache before decoding and search drops every branch it replaces,
    which must free the buffers then, not at Python's next full garbage collection."""
    model = tiny_transformer()
    enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.no_grad():
            cache = model.allocate_kv_cache(2)
            model.forward_scale(LABELS, 0, None, cache)
            branches = [cache.clone(), cache.select(torch.tensor([1]))]
            alive = [weakref.ref(c) for c in (cache, *branches)] + [weakref.ref(cache.keys[0])]
            del cache, branches
        assert [ref() for ref in alive] == [None] * len(alive)
    finally:
        if enabled:
            gc.enable()
