"""Reusable training parts: the VAR objective and its metrics, and the optimiser's parameter groups."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_images, tiny_transformer, tiny_vqvae

from diffusers_var.training.objective import teacher_forcing_batch, var_loss
from diffusers_var.training.optim import make_optimizer, parameter_groups, scaled_learning_rate


def test_objective_and_metrics():
    vqvae, transformer = tiny_vqvae(), tiny_transformer(label_smoothing=0.1)
    inputs, targets = teacher_forcing_batch(vqvae, tiny_images())
    assert inputs.shape == (2, 20, 8) and targets.shape == (2, 21)
    loss, metrics = var_loss(transformer, torch.tensor([1, 2]), inputs, targets)
    loss.backward()
    assert metrics.loss == pytest.approx(loss.item())
    logits = transformer(torch.tensor([1, 2]), inputs).logits.detach()
    last = logits[:, -16:].argmax(-1) == targets[:, -16:]
    assert metrics.last_scale_accuracy == pytest.approx(last.float().mean().item() * 100)
    plain = torch.nn.functional.cross_entropy(logits.reshape(-1, 32), targets.flatten()).item()
    assert metrics.mean_loss == pytest.approx(plain, rel=1e-5) and metrics.mean_loss != pytest.approx(metrics.loss)
    assert set(metrics.as_dict("train/")) == {
        "train/loss",
        "train/mean_loss",
        "train/last_scale_loss",
        "train/accuracy",
        "train/last_scale_accuracy",
    }


def test_parameter_groups_decay_only_weight_matrices():
    model = tiny_transformer(shared_adaln=True)
    decay, no_decay = parameter_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert "blocks.0.attn.qkv.weight" in decayed and "class_embedding.weight" in decayed
    for name in (
        "head.bias",
        "pos_start",
        "position_embedding",
        "level_embedding.weight",
        "blocks.0.scale_shift_table",
        "blocks.0.attn.logit_scale",
        "blocks.0.attn.q_bias",
    ):
        assert name in undecayed, name
    assert len(decayed) + len(undecayed) == len(list(model.parameters()))
    model.head.weight.requires_grad_(False)
    assert "head.weight" not in {names[id(p)] for g in parameter_groups(model, 0.05) for p in g["params"]}


def test_optimizer_defaults_and_lr_scaling():
    optimizer = make_optimizer(tiny_transformer(), learning_rate=1e-4)
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    assert scaled_learning_rate(1e-4, 768) == pytest.approx(3e-4)
