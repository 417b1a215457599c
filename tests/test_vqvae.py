"""MultiScaleVQVAE and its multi-scale residual quantizer."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_images, tiny_vqvae

from diffusers_var import MultiScaleVQVAE
from diffusers_var.models.quantizer import ScaleResidualConv, phi_index_per_scale


@pytest.mark.parametrize(
    "num_scales, num_phis, expected",
    [
        (10, 4, [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]),
        (3, 4, [0, 2, 3]),
        (3, 2, [0, 0, 1]),
        (5, 4, [0, 1, 2, 2, 3]),
        (4, 1, [0, 0, 0, 0]),
        (4, 4, [0, 1, 2, 3]),
    ],
)
def test_phi_index_per_scale(num_scales, num_phis, expected):
    assert phi_index_per_scale(num_scales, num_phis) == expected


@pytest.mark.parametrize("share, quant_resi, count", [(0, 0.5, 3), (1, 0.5, 1), (2, 0.5, 2), (4, 0.5, 4), (0, 0.0, 3)])
def test_phi_sharing_modes(share, quant_resi, count):
    quantizer = tiny_vqvae(share_quant_resi=share, quant_resi=quant_resi).quantizer
    assert len(quantizer.phis) == count
    expected_type = ScaleResidualConv if quant_resi else torch.nn.Identity
    assert all(isinstance(phi, expected_type) for phi in quantizer.phis)


def test_tokenize_detokenize_shapes_and_ranges():
    vqvae = tiny_vqvae()
    token_maps = vqvae.tokenize(tiny_images())
    assert [tuple(t.shape) for t in token_maps] == [(2, 1, 1), (2, 2, 2), (2, 4, 4)]
    assert all(t.dtype == torch.int64 and 0 <= t.min() and t.max() < 32 for t in token_maps)
    images = vqvae.detokenize(token_maps)
    assert images.shape == (2, 3, 8, 8) and images.min() >= -1 and images.max() <= 1
    assert torch.allclose(vqvae.reconstruct(tiny_images()), images, atol=1e-5)
    assert vqvae.next_scale_inputs(token_maps).shape == (2, 1 + 4 + 16 - 1, 8)  # (B, L - first_l, Cvae)


def test_tokens_are_nearest_codes_of_the_residual():
    """Scale 0 picks, for the area-pooled latent, the code at minimal Euclidean distance."""
    vqvae = tiny_vqvae()
    features = vqvae.encode(tiny_images())
    pooled = features.mean(dim=(2, 3))
    distances = torch.cdist(pooled, vqvae.quantizer.embedding.weight)
    assert torch.equal(vqvae.tokenize(tiny_images())[0].flatten(), distances.argmin(dim=1))


def test_znorm_picks_codes_by_cosine_similarity():
    vqvae = tiny_vqvae(use_znorm=True)
    pooled = vqvae.encode(tiny_images()).mean(dim=(2, 3))
    cosine = (
        torch.nn.functional.normalize(pooled, dim=1)
        @ torch.nn.functional.normalize(vqvae.quantizer.embedding.weight, dim=1).T
    )
    assert torch.equal(vqvae.tokenize(tiny_images())[0].flatten(), cosine.argmax(dim=1))


def test_training_forward_has_loss_usage_and_straight_through_gradients():
    vqvae = tiny_vqvae().train()
    images = tiny_images()
    out = vqvae(images)
    assert out.sample.shape == images.shape
    assert out.vq_loss.ndim == 0 and out.vq_loss > 0
    assert out.codebook_usage.shape == (3,) and ((out.codebook_usage > 0) & (out.codebook_usage <= 1)).all()
    (out.vq_loss + (out.sample - images).square().mean()).backward()
    for name in (
        "encoder.conv_in.weight",
        "quantizer.embedding.weight",
        "quantizer.phis.0.conv.weight",
        "decoder.conv_out.weight",
    ):
        grad = dict(vqvae.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reaches {name}"
    assert torch.equal(
        torch.cat([t.flatten(1) for t in out.token_maps], 1),
        torch.cat([t.flatten(1) for t in vqvae.tokenize(images)], 1),
    )


def test_return_dict_false_gives_a_tuple():
    out = tiny_vqvae()(tiny_images(), return_dict=False)
    assert isinstance(out, tuple) and len(out) == 4


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (2, 1, 8, 8), (3, 8, 8)])
def test_wrong_image_shape_is_refused(shape):
    with pytest.raises(ValueError, match=r"Expected images of shape \(B, 3, 8, 8\)"):
        tiny_vqvae().tokenize(torch.zeros(shape))


def test_token_maps_must_match_patch_nums():
    vqvae = tiny_vqvae()
    good = vqvae.tokenize(tiny_images())
    with pytest.raises(ValueError, match="list of 3 token maps"):
        vqvae.detokenize(good[:2])
    with pytest.raises(ValueError, match=r"Token map 1 .*shape \(2, 2, 2\)"):
        vqvae.detokenize([good[0], torch.zeros(2, 3, 3, dtype=torch.long), good[2]])
    with pytest.raises(ValueError, match=r"outside \[0, 32\)"):
        vqvae.next_scale_inputs([good[0], good[1], good[2] + 100])
    with pytest.raises(ValueError, match="integer tensor"):
        vqvae.detokenize([t.float() for t in good])


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="multiple of norm_num_groups"):
        MultiScaleVQVAE(ch=20, ch_mult=(1, 2), norm_num_groups=8, patch_nums=(1, 2))
    with pytest.raises(ValueError, match="strictly increasing"):
        MultiScaleVQVAE(ch=16, ch_mult=(1, 2), norm_num_groups=8, patch_nums=(2, 1))


def test_save_and_load_round_trip(tmp_path):
    vqvae = tiny_vqvae(share_quant_resi=0)
    vqvae.save_pretrained(tmp_path)
    loaded = MultiScaleVQVAE.from_pretrained(tmp_path).eval()
    assert loaded.config.share_quant_resi == 0 and tuple(loaded.config.patch_nums) == (1, 2, 4)
    assert torch.equal(
        loaded.detokenize(vqvae.tokenize(tiny_images())), vqvae.detokenize(vqvae.tokenize(tiny_images()))
    )


def test_gradient_checkpointing_gives_the_same_gradients():
    images = tiny_images(2, 8)
    grads = []
    for checkpointing in (False, True):
        vqvae = tiny_vqvae(mid_attention=True, lowest_level_attention=True).train()
        if checkpointing:
            vqvae.enable_gradient_checkpointing()
        output = vqvae(images)
        (output.sample.square().mean() + output.vq_loss).backward()
        grads.append({n: p.grad.clone() for n, p in vqvae.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)
    assert vqvae.encoder.gradient_checkpointing and vqvae.decoder.gradient_checkpointing


@pytest.mark.parametrize(
    "images, message",
    [
        (lambda x: ((x + 1) * 127.5).round().to(torch.uint8), r"float tensor in \[-1, 1\], got torch.uint8.*127.5 - 1"),
        (lambda x: (x + 1) * 127.5, r"range over \[.*\]. This looks like \[0, 255\] pixels: use images / 127.5 - 1"),
        (lambda x: (x - 0.45) / 0.225, r"looks like a mean/std normalisation"),
        (lambda x: x * 1.3, r"must lie in \[-1, 1\], but they range over"),
        (lambda x: x.index_put((torch.tensor(0),), torch.tensor(float("nan"))), r"hold \d+ NaN or inf values"),
        (lambda x: x.numpy(), r"must be a torch.Tensor \(B, 3, H, W\) in \[-1, 1\], got ndarray"),
    ],
    ids=["uint8", "0-255", "imagenet-normalised", "out-of-range", "nan", "numpy"],
)
def test_tokenize_refuses_images_outside_its_range_and_guesses_why(images, message):
    with pytest.raises(ValueError, match=message):
        tiny_vqvae().tokenize(images(tiny_images()))


def test_tokenize_casts_any_float_dtype_and_warns_about_0_1_images():
    vqvae, images = tiny_vqvae(), tiny_images()
    expected = vqvae.tokenize(images)
    for cast in (images.double(), images.half().float()):
        assert [t.shape for t in vqvae.tokenize(cast)] == [t.shape for t in expected]
    assert all(torch.equal(a, b) for a, b in zip(vqvae.tokenize(images.double()), expected))
    bf16 = tiny_vqvae().to(torch.bfloat16)
    assert len(bf16.tokenize(images)) == 3  # float32 images into a bfloat16 model
    assert len(vqvae.tokenize(images * 1.05)) == 3  # a small overshoot (e.g. bicubic resizing) is tolerated
    with pytest.warns(UserWarning, match=r"looks like images in \[0, 1\].*images \* 2 - 1"):
        vqvae.tokenize((images + 1) / 2)


def test_decode_raises_on_nan_pixels_outside_a_training_step():
    from diffusers_var import NonFiniteError

    vqvae = tiny_vqvae()
    with torch.no_grad():
        vqvae.post_quant_conv.bias[0] = float("inf")
    f_hat = torch.zeros(1, 8, 4, 4)
    with pytest.raises(NonFiniteError, match=r"decoder \(vqvae.decoder\) produced NaN or inf pixels in 1 of 1"):
        vqvae.decode(f_hat)
    vqvae.train()
    with pytest.raises(NonFiniteError), torch.no_grad():
        vqvae.decode(f_hat)  # a validation pass in training mode is checked too
    assert not torch.isfinite(vqvae.decode(f_hat)).all()  # a training step: the loss will show it
