"""VARPipeline: labels, outputs, batching, callbacks, dtypes and component checks."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import tiny_pipeline, tiny_transformer, tiny_vqvae

from diffusers_var import VARPipeline, VARScaleScheduler


def _seed(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_class_labels_as_int_list_names_and_tensor(pipe):
    assert pipe(class_labels=4, output_type="latent", generator=_seed()).class_labels.tolist() == [4]
    out = pipe(class_labels=[1, "digit 2", "number 3"], output_type="latent", generator=_seed())
    assert out.class_labels.tolist() == [1, 2, 3]
    assert pipe(class_labels=torch.tensor([5, 6]), output_type="latent").class_labels.tolist() == [5, 6]
    assert pipe.get_label_ids(["number 9", "digit 0"]) == [9, 0]


def test_integer_labels_of_any_integer_type_and_unconditional_entries(pipe):
    for labels in (np.int64(4), [np.int32(4)], torch.tensor(4), np.array([4]), torch.tensor([4], dtype=torch.int32)):
        assert pipe(class_labels=labels, output_type="latent", generator=_seed()).class_labels.tolist() == [4]
    out = pipe(class_labels=[None, 3], output_type="latent", generator=_seed())  # None: an unconditional image
    assert out.class_labels.tolist() == [10, 3]  # the null class


def test_random_labels_come_from_the_generator(pipe):
    a = pipe(num_images_per_prompt=6, output_type="latent", generator=_seed(1)).class_labels
    b = pipe(num_images_per_prompt=6, output_type="latent", generator=_seed(1)).class_labels
    assert torch.equal(a, b) and a.shape == (6,) and ((a >= 0) & (a < 10)).all()


@pytest.mark.parametrize(
    "labels, message",
    [
        ([3, 10], r"Class id\(s\) \[10\] out of range"),
        (-1, r"out of range: this model has classes 0 to 9"),
        ("seven", r"Unknown class name\(s\) \['seven'\]"),
        ([1.5], r"class_labels\[0\] is 1.5; each entry must be one of class ids \(ints\) or names"),
        ([2.0], r"class_labels\[0\] is 2.0"),
        (np.float64(1.5), r"class_labels must be class ids \(ints\) or names.*got np.float64\(1.5\)"),
        (torch.tensor([1.7]), r"0-D or 1-D integer tensor of class ids, got \(1,\) of torch.float32"),
        (torch.tensor([[1], [2]]), r"0-D or 1-D integer tensor of class ids, got \(2, 1\)"),
        (np.array([1.0]), r"integer tensor of class ids, got \(1,\) of float64"),
        (True, r"class_labels must be class ids .* got True"),
        ([1, False], r"class_labels\[1\] is False"),
        (torch.tensor([True]), r"integer tensor of class ids, got \(1,\) of torch.bool"),
        ([[1], [1]], r"class_labels\[0\] is \[1\]"),
        ([], r"class_labels is empty"),
        (torch.tensor([], dtype=torch.long), r"class_labels is empty"),
        ({1, 2}, r"class_labels must be class ids"),
    ],
)
def test_bad_class_labels(pipe, labels, message):
    with pytest.raises(ValueError, match=message):
        pipe(class_labels=labels)


def test_output_types(pipe):
    kwargs = dict(class_labels=[1, 2], generator=_seed())
    pt = pipe(output_type="pt", **kwargs).images
    assert pt.shape == (2, 3, 8, 8) and pt.min() >= 0 and pt.max() <= 1
    np_images = pipe(output_type="np", **{**kwargs, "generator": _seed()}).images
    assert isinstance(np_images, np.ndarray) and np_images.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(np_images, pt.permute(0, 2, 3, 1).numpy())
    pil = pipe(**{**kwargs, "generator": _seed()}).images
    assert len(pil) == 2 and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (8, 8)
    latent = pipe(output_type="latent", **{**kwargs, "generator": _seed()}).images
    assert [tuple(t.shape) for t in latent] == [(2, 1, 1), (2, 2, 2), (2, 4, 4)]
    torch.testing.assert_close((pipe.vqvae.detokenize(latent) + 1) / 2, pt)
    images, labels = pipe(output_type="pt", return_dict=False, **{**kwargs, "generator": _seed()})
    assert torch.equal(images, pt) and labels.tolist() == [1, 2]
    with pytest.raises(ValueError, match="output_type must be one of"):
        pipe(output_type="tensor", **kwargs)


def test_seeded_sampling_is_deterministic(pipe):
    a = pipe(class_labels=[1, 2], output_type="pt", generator=_seed(7)).images
    b = pipe(class_labels=[1, 2], output_type="pt", generator=_seed(7)).images
    c = pipe(class_labels=[1, 2], output_type="pt", generator=_seed(8)).images
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_num_images_per_prompt_repeats_each_label(pipe):
    out = pipe(class_labels=[1, 2], num_images_per_prompt=3, output_type="pt", generator=_seed())
    assert out.class_labels.tolist() == [1, 1, 1, 2, 2, 2] and out.images.shape[0] == 6
    with pytest.raises(ValueError, match="num_images_per_prompt must be ≥ 1"):
        pipe(class_labels=1, num_images_per_prompt=0)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_an_image_does_not_depend_on_its_batch_with_per_image_generators(pipe, guidance_scale):
    labels = [1, 5, 9]
    batch = pipe(
        class_labels=labels,
        guidance_scale=guidance_scale,
        top_k=5,
        output_type="pt",
        generator=[_seed(10 + i) for i in range(3)],
    ).images
    for i, label in enumerate(labels):
        alone = pipe(
            class_labels=label, guidance_scale=guidance_scale, top_k=5, output_type="pt", generator=[_seed(10 + i)]
        ).images
        torch.testing.assert_close(alone[0], batch[i], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="Got 2 generators for 3 images"):
        pipe(class_labels=labels, generator=[_seed(), _seed()])


def test_guidance_changes_samples_and_unguided_runs_one_batch(pipe):
    calls = []
    forward_scale = pipe.transformer.forward_scale

    def spy(class_labels, *args):
        calls.append(class_labels.shape[0])
        return forward_scale(class_labels, *args)

    pipe.transformer.forward_scale = spy
    unguided = pipe(class_labels=[1, 2], guidance_scale=1.0, top_k=1, output_type="latent", generator=_seed())
    assert calls == [2, 2, 2]
    calls.clear()
    guided = pipe(class_labels=[1, 2], guidance_scale=8.0, top_k=1, output_type="latent", generator=_seed())
    assert calls == [4, 4, 4]
    assert torch.equal(guided.images[0], unguided.images[0])  # the linear ramp leaves the first scale unguided
    assert not all(torch.equal(a, b) for a, b in zip(guided.images, unguided.images))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be finite"),
        ({"temperature": float("inf")}, "temperature must be finite"),
        ({"top_k": 1.5}, "top_k must be an integer"),
        ({"num_images_per_prompt": 2.5}, "num_images_per_prompt must be an integer, got 2.5"),
        ({"num_images_per_prompt": True}, "num_images_per_prompt must be an integer, got True"),
        ({"generator": 0}, r"generator must be a torch.Generator or a list of them, got 0. For a seed"),
        ({"generator": [torch.Generator(), 1]}, "generator must be a torch.Generator or a list of them"),
    ],
)
def test_bad_sampling_arguments(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(class_labels=1, **kwargs)


def test_callback_sees_and_can_replace_f_hat(pipe):
    seen = []

    def record(p, step, timestep, kwargs):
        seen.append((step, tuple(kwargs["f_hat"].shape)))
        return kwargs

    pipe(class_labels=[1, 2], callback_on_step_end=record, callback_on_step_end_tensor_inputs=["f_hat"])
    assert seen == [(0, (2, 8, 4, 4)), (1, (2, 8, 4, 4)), (2, (2, 8, 4, 4))]

    def zero_last(p, step, timestep, kwargs):
        return {"f_hat": torch.zeros_like(kwargs["f_hat"])} if step == 2 else kwargs

    zeroed = pipe(
        class_labels=[1], output_type="pt", callback_on_step_end=zero_last, callback_on_step_end_tensor_inputs=["f_hat"]
    ).images
    expected = (pipe.vqvae.decode(torch.zeros(1, 8, 4, 4)).clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(zeroed, expected)
    with pytest.raises(ValueError, match="may only name"):
        pipe(class_labels=1, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["logits"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sampling(dtype):
    pipe = tiny_pipeline().to(dtype)
    assert pipe.transformer.dtype == dtype and pipe.vqvae.dtype == dtype
    images = pipe(class_labels=[1, 2], output_type="pt", generator=_seed()).images
    assert images.dtype == dtype and torch.isfinite(images.float()).all()


def test_components_must_agree():
    vqvae, transformer = tiny_vqvae(), tiny_transformer()
    scheduler = VARScaleScheduler(patch_nums=(1, 2, 4))
    with pytest.raises(ValueError, match="disagree on patch_nums"):
        VARPipeline(vqvae, transformer, VARScaleScheduler(patch_nums=(1, 2, 3, 4)))
    with pytest.raises(ValueError, match="disagree on patch_nums"):
        VARPipeline(tiny_vqvae(patch_nums=(1, 4)), transformer, scheduler)
    with pytest.raises(ValueError, match="predicts 32 codes but the vqvae has vocab_size=64"):
        VARPipeline(tiny_vqvae(vocab_size=64), transformer, scheduler)
    with pytest.raises(ValueError, match="latent_channels=8 but the vqvae has z_channels=16"):
        VARPipeline(tiny_vqvae(z_channels=16), transformer, scheduler)


def test_progress_bar_runs_over_scales(pipe, capsys):
    pipe.set_progress_bar_config(disable=False)
    pipe(class_labels=1)
    assert "3/3" in capsys.readouterr().err


# -- non-finite values never reach an image ---------------------------------------------------------------------------


@pytest.mark.parametrize("output_type", ["pil", "np", "pt"])
def test_nan_in_the_decoder_raises_naming_it(output_type):
    from diffusers_var.validation import NonFiniteError

    pipe = tiny_pipeline()
    with torch.no_grad():
        pipe.vqvae.decoder.conv_out.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"decoder \(vqvae.decoder\) produced NaN or inf pixels in 2 of 2"):
        pipe(class_labels=[1, 2], output_type=output_type, generator=_seed())
    token_maps = pipe(class_labels=[1], output_type="latent", generator=_seed()).images  # no decode, no error
    with pytest.raises(NonFiniteError, match="decoder"):
        pipe.vqvae.detokenize(token_maps)


@pytest.mark.parametrize(
    "parameter, scale",
    [("head.weight", 0), ("input_proj.weight", 1)],  # every scale's logits, or only those after the class token
)
def test_nan_in_the_transformer_raises_naming_the_scale(parameter, scale):
    from diffusers_var.validation import NonFiniteError

    pipe = tiny_pipeline()
    with torch.no_grad():
        pipe.transformer.get_parameter(parameter).view(-1)[0] = float("nan")
    side = (1, 2, 4)[scale]
    with pytest.raises(NonFiniteError, match=f"logits at scale {scale} \\({side}×{side} tokens\\) hold NaN or inf"):
        pipe(class_labels=[1, 2], top_k=4, top_p=0.9, output_type="pt", generator=_seed())
