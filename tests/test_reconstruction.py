"""VARPipeline.reconstruct: the tokenizer's reconstruction, teacher forcing (a diagnostic) and true autoregressive
reconstruction, each with per-scale token accuracy and PSNR."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_images

from diffusers_var import VARPipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "digits"))
from prepare_data import load_digits_split  # noqa: E402


def test_autoregressive_with_every_scale_kept_is_the_tokenizer_s_reconstruction_exactly(pipe):
    images = (tiny_images(3) + 1) / 2
    scales = len(pipe.vqvae.config.patch_nums)
    tokenizer = pipe.reconstruct(images, [1, 2, None], method="tokenizer", output_type="pt")
    kept = pipe.reconstruct(images, [1, 2, None], method="autoregressive", prefix_scales=scales, output_type="pt")
    assert torch.equal(kept.images, tokenizer.images)
    assert kept.token_accuracy == [1.0] * scales and tokenizer.token_accuracy == [1.0] * scales
    assert kept.psnr == tokenizer.psnr and len(kept.psnr) == scales
    detokenized = (pipe.vqvae.detokenize(pipe.vqvae.tokenize(images * 2 - 1)) + 1) / 2
    assert torch.allclose(tokenizer.images, detokenized, atol=1e-6)


def test_teacher_forcing_is_the_argmax_given_the_true_coarser_scales(pipe):
    images = (tiny_images(2) + 1) / 2
    truth = pipe.vqvae.tokenize(images * 2 - 1)
    logits = pipe.transformer(torch.tensor([4, 5]), pipe.vqvae.next_scale_inputs(truth)).logits
    out = pipe.reconstruct(images, [4, 5], method="teacher_forcing", output_type="pt")
    assert torch.equal(torch.cat([t.flatten(1) for t in out.token_maps], 1), logits.argmax(-1))
    expected = [float((t == g).float().mean()) for t, g in zip(out.token_maps, truth)]
    assert out.token_accuracy == expected and out.method == "teacher_forcing"


def test_autoregressive_keeps_the_prefix_and_generates_the_rest_greedily(pipe):
    images = (tiny_images(2) + 1) / 2
    truth = pipe.vqvae.tokenize(images * 2 - 1)
    out = pipe.reconstruct(images, [4, 5], prefix_scales=1, output_type="pt")
    assert torch.equal(out.token_maps[0], truth[0]) and out.token_accuracy[0] == 1.0
    again = pipe.reconstruct(images, [4, 5], prefix_scales=1, output_type="pt")  # greedy by default: deterministic
    assert all(torch.equal(a, b) for a, b in zip(out.token_maps, again.token_maps))
    # from nothing: its first scale is teacher forcing's (both see only the class token)
    scratch = pipe.reconstruct(images, [4, 5], output_type="pt")
    forced = pipe.reconstruct(images, [4, 5], method="teacher_forcing", output_type="pt")
    assert torch.equal(scratch.token_maps[0], forced.token_maps[0])
    sampled = pipe.reconstruct(images, [4, 5], top_k=0, generator=torch.Generator().manual_seed(0), output_type="np")
    assert sampled.images.shape == (2, 8, 8, 3)


def test_teacher_forcing_flatters_the_model_on_real_digits():
    """The point of the three names: on held-out digits, teacher forcing scores far better than the model does
    when it has to generate the image."""
    pipe = VARPipeline.from_pretrained("var-digits")
    pipe.set_progress_bar_config(disable=True)
    _, _, test_images, test_labels = load_digits_split()
    images = torch.from_numpy(test_images[:60]).permute(0, 3, 1, 2).float() / 255
    labels = test_labels[:60].tolist()
    forced = pipe.reconstruct(images, labels, method="teacher_forcing", output_type="pt")
    generated = pipe.reconstruct(images, labels, method="autoregressive", output_type="pt")
    tokenizer = pipe.reconstruct(images, labels, method="tokenizer", output_type="pt")
    assert forced.token_accuracy[-1] > generated.token_accuracy[-1] + 0.05
    assert tokenizer.psnr[-1] > forced.psnr[-1] > generated.psnr[-1] + 1.0


def test_bad_inputs_name_the_value_and_what_is_allowed(pipe):
    images = (tiny_images(2) + 1) / 2
    scales = len(pipe.vqvae.config.patch_nums)
    cases = [
        (dict(method="greedy"), "method must be one of ('tokenizer', 'teacher_forcing', 'autoregressive')"),
        (dict(prefix_scales=-1), f"an integer in [0, {scales}], got -1"),
        (dict(prefix_scales=scales + 1), f"got {scales + 1}"),
        (dict(prefix_scales=1.5), "got 1.5"),
        (dict(prefix_scales=True), "got True"),
        (dict(method="tokenizer", prefix_scales=1), "prefix_scales only apply to method='autoregressive'"),
        (dict(method="teacher_forcing", top_k=5), "top_k only apply to method='autoregressive'"),
        (dict(output_type="jpg"), "output_type must be one of"),
        (dict(image=torch.rand(2, 3, 16, 16)), "is 16×16 px, but this model works on 8×8"),
        (dict(image=torch.rand(2, 1, 8, 8)), "image must have 3 channels"),
        (dict(class_labels=[1, 2, 3]), "3 class labels for 2 images"),
    ]
    for kwargs, message in cases:
        kwargs = {"image": images, **kwargs}
        with pytest.raises(ValueError) as error:
            pipe.reconstruct(**kwargs)
        assert message in str(error.value), (message, str(error.value))


def test_teacher_forcing_refuses_non_finite_logits_and_unknown_knobs(pipe):
    from diffusers_var import NonFiniteError

    images = (tiny_images(2) + 1) / 2
    with pytest.raises(ValueError, match="takes the sampling arguments"):
        pipe.reconstruct(images, [1, 2], more_smooth=True)
    with torch.no_grad():
        next(pipe.transformer.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="teacher-forcing logits"):
        pipe.reconstruct(images, [1, 2], method="teacher_forcing")


def test_decoding_works_outside_no_grad(pipe):
    latents = pipe(class_labels=[1], output_type="latent").images
    assert pipe.decode_latents(latents, "np").shape == (1, 8, 8, 3)
