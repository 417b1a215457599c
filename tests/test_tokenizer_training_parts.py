"""The parts of tokenizer training: LPIPS from disk, discriminators, codebook usage and restarts, PSNR."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_images, tiny_vqvae

from diffusers_var.evaluation.features import BackboneFeatures, load_vision_backbone
from diffusers_var.training.codebook import CodebookUsage, restart_dead_codes
from diffusers_var.training.discriminators import (
    DinoDiscriminator,
    PatchDiscriminator,
    hinge_discriminator_loss,
    hinge_generator_loss,
)
from diffusers_var.training.perceptual import LPIPS
from diffusers_var.training.tokenizer_objective import TokenizerLosses, psnr


def save_random_lpips(path) -> None:
    """Random LPIPS weights in the ``lpips`` package's state-dict layout (``lin0.model.1.weight``, …)."""
    torch.manual_seed(0)
    state = {}
    for key, value in LPIPS().state_dict().items():
        if key.startswith("lins."):
            key = f"lin{key[5]}.{key[7:]}"
        state[key] = torch.randn_like(value).abs() * 0.1 if key.startswith("lin") else torch.randn_like(value) * 0.1
    state["scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)  # present in lpips files; constants here
    torch.save(state, path)


def save_tiny_dinov2(path) -> None:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, patch_size=4, image_size=16
    )
    Dinov2Model(config).save_pretrained(path)


def test_lpips_from_file_is_a_distance(tmp_path):
    save_random_lpips(tmp_path / "lpips.pth")
    lpips = LPIPS.from_file(tmp_path / "lpips.pth")
    images, other = tiny_images(2, 32, seed=0), tiny_images(2, 32, seed=1)
    assert lpips(images, images).abs().max() < 1e-6
    distance = lpips(images, other)
    assert distance.shape == (2,) and (distance > 0).all()
    # it is a loss: gradients reach the images, but the network stays frozen
    fake = other.clone().requires_grad_(True)
    lpips(fake, images).sum().backward()
    assert fake.grad.abs().sum() > 0 and all(p.grad is None for p in lpips.parameters())


def test_lpips_refuses_missing_and_foreign_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        LPIPS.from_file(tmp_path / "absent.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="not an LPIPS-VGG state dict.*missing"):
        LPIPS.from_file(tmp_path / "foreign.pth")
    (tmp_path / "truncated.pth").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="Cannot read weights"):
        LPIPS.from_file(tmp_path / "truncated.pth")


def test_discriminators_and_hinge_losses(tmp_path):
    images = tiny_images(2, 16)
    patch = PatchDiscriminator(channels=8, num_layers=2)
    assert patch(images).shape[:2] == (2, 1)
    save_tiny_dinov2(tmp_path / "dino")
    dino = DinoDiscriminator.from_pretrained(tmp_path / "dino")
    assert dino.layers == (1, 2) and dino(images).shape == (2, 2 * 17)  # 16 patches + CLS, two layers
    assert all(not p.requires_grad for p in dino.backbone.parameters())
    dino.train()
    assert not dino.backbone.training and dino.heads.training
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    assert hinge_generator_loss(fake).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not a transformers model folder"):
        load_vision_backbone(tmp_path / "nowhere")


def test_backbone_features_shape(tmp_path):
    save_tiny_dinov2(tmp_path / "dino")
    features = BackboneFeatures.from_pretrained(tmp_path / "dino")
    assert features(tiny_images(3, 8)).shape == (3, 16)


def test_codebook_usage_and_restart():
    usage = CodebookUsage(num_scales=2, vocab_size=6)
    usage.update([torch.tensor([[0]]), torch.tensor([[0, 1], [1, 3]])])
    assert usage.fraction_used().tolist() == pytest.approx([1 / 6, 3 / 6])
    assert usage.dead_codes().tolist() == [2, 4, 5]
    state = usage.state_dict()
    usage.reset()
    assert usage.dead_codes().numel() == 6
    usage.load_state_dict(state)
    assert usage.dead_codes().tolist() == [2, 4, 5]

    embedding = torch.nn.Embedding(6, 4)
    before = embedding.weight.detach().clone()
    features = torch.arange(8.0).view(2, 4) + 100
    moved = restart_dead_codes(embedding, usage.dead_codes(), features, torch.Generator().manual_seed(0))
    assert moved == 2  # only two features to move codes onto
    changed = (embedding.weight != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [2, 4]
    assert {tuple(embedding.weight[i].tolist()) for i in changed} == {tuple(f.tolist()) for f in features}


def test_psnr_and_tokenizer_loss():
    images = torch.zeros(1, 3, 4, 4)
    assert psnr(images + 0.2, images).item() == pytest.approx(10 * torch.log10(torch.tensor(1 / 0.01)).item())
    vqvae = tiny_vqvae(patch_nums=(1, 2, 4, 8)).train()
    batch = tiny_images(2, 16)
    output = vqvae(batch)
    losses = TokenizerLosses("l2", vq_weight=0.5, discriminator=PatchDiscriminator(channels=8, num_layers=2))
    loss, logs = losses.tokenizer_loss(output, batch, adversarial=True)
    expected = logs["reconstruction_loss"] + 0.5 * logs["vq_loss"] + 0.1 * logs["generator_loss"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert "hinge GAN (PatchDiscriminator)" in losses.describe()
    with pytest.raises(ValueError, match="'l1' or 'l2'"):
        TokenizerLosses("huber")
