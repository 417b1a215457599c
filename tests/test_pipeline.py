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


def test_an_ambiguous_class_name_asks_for_the_id():
    pipe = tiny_pipeline(id2label={0: "crane, bird", 1: "crane, machine", 2: "digit 2"})
    assert pipe.get_label_ids(["bird", "machine"]) == [0, 1]
    with pytest.raises(ValueError, match=r"'crane' names classes \[0, 1\]; pass the id instead"):
        pipe(class_labels=["crane"])


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
    latent = pipe(output_type="latent", **{**kwargs, "generator": _seed()})
    assert latent.images.shape == (2, 8, 4, 4)  # f̂ (B, Cvae, h, w): what the decoder consumes
    torch.testing.assert_close((pipe.vqvae.decode(latent.images).clamp(-1, 1) + 1) / 2, pt)
    assert [tuple(t.shape) for t in latent.token_maps] == [(2, 1, 1), (2, 2, 2), (2, 4, 4)]
    torch.testing.assert_close((pipe.vqvae.detokenize(latent.token_maps) + 1) / 2, pt)
    images, labels, token_maps = pipe(output_type="pt", return_dict=False, **{**kwargs, "generator": _seed()})
    assert torch.equal(images, pt) and labels.tolist() == [1, 2]
    assert all(torch.equal(a, b) for a, b in zip(token_maps, latent.token_maps))
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
    calls = []  # the transformer's forward sees every scale: hooks (offload, casting) fire
    pipe.transformer.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    unguided = pipe(class_labels=[1, 2], guidance_scale=1.0, top_k=1, output_type="latent", generator=_seed())
    assert calls == [2, 2, 2]
    calls.clear()
    guided = pipe(class_labels=[1, 2], guidance_scale=8.0, top_k=1, output_type="latent", generator=_seed())
    assert calls == [4, 4, 4]
    assert torch.equal(guided.token_maps[0], unguided.token_maps[0])  # the linear ramp leaves scale 0 unguided
    assert not all(torch.equal(a, b) for a, b in zip(guided.token_maps, unguided.token_maps))


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


def test_callback_sees_and_can_replace_the_latents(pipe):
    seen = []

    def record(p, step, timestep, kwargs):
        seen.append((step, timestep, tuple(kwargs["latents"].shape), len(kwargs["token_maps"])))
        return kwargs

    pipe(class_labels=[1, 2], callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents", "token_maps"])
    assert seen == [(0, 0, (2, 8, 4, 4), 1), (1, 1, (2, 8, 4, 4), 2), (2, 2, (2, 8, 4, 4), 3)]
    assert pipe.num_timesteps == 3

    def zero_last(p, step, timestep, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])} if step == 2 else kwargs

    zeroed = pipe(
        class_labels=[1],
        output_type="pt",
        callback_on_step_end=zero_last,
        callback_on_step_end_tensor_inputs=["latents"],
    ).images
    expected = (pipe.vqvae.decode(torch.zeros(1, 8, 4, 4)).clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(zeroed, expected)
    with pytest.raises(ValueError, match="may only name"):
        pipe(class_labels=1, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["logits"])


def test_a_callback_can_change_guidance_for_the_remaining_scales(pipe):
    def guidance_off_after_scale_0(p, step, timestep, kwargs):
        p._guidance_scale = 1.0
        return kwargs

    switched = pipe(class_labels=[1, 2], guidance_scale=8.0, top_k=1, output_type="latent", generator=_seed(),
                    callback_on_step_end=guidance_off_after_scale_0)  # fmt: skip
    unguided = pipe(class_labels=[1, 2], guidance_scale=1.0, top_k=1, output_type="latent", generator=_seed())
    assert pipe.guidance_scale == 1.0
    # greedy: scale 0 is unguided under the linear ramp, and the rest ran without guidance, so all scales agree
    assert all(torch.equal(a, b) for a, b in zip(switched.token_maps, unguided.token_maps))

    def raise_guidance(p, step, timestep, kwargs):
        p._guidance_scale += 1.0
        return kwargs

    pipe(class_labels=1, guidance_scale=2.0, callback_on_step_end=raise_guidance, generator=_seed())
    assert pipe.guidance_scale == 2.0 + pipe.num_timesteps  # what diffusers' test_callback_cfg checks
    with pytest.raises(ValueError, match="must stay 1.0 in a call that started without guidance"):
        pipe(class_labels=1, guidance_scale=1.0, callback_on_step_end=raise_guidance)


def test_interrupt_decodes_the_coarser_image_it_has(pipe):
    def stop_after_scale_1(p, step, timestep, kwargs):
        p._interrupt = step == 1
        return kwargs

    out = pipe(class_labels=[3], output_type="pt", generator=_seed(), callback_on_step_end=stop_after_scale_1)
    assert [tuple(t.shape) for t in out.token_maps] == [(1, 1, 1), (1, 2, 2)]
    f_hat = sum(  # the two finished scales' contributions alone
        pipe.vqvae.quantizer.scale_contribution(pipe.vqvae.quantizer.embed(t), si)
        for si, t in enumerate(out.token_maps)
    )
    torch.testing.assert_close(out.images, (pipe.vqvae.decode(f_hat).clamp(-1, 1) + 1) / 2)


def test_diffusers_pipeline_callbacks_work(pipe):
    from diffusers.callbacks import PipelineCallback

    class GuidanceCutoff(PipelineCallback):
        """Switch guidance off after a fraction of the scales, as diffusers' CFG cut-off callbacks do."""

        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            if step_index == int(pipeline.num_timesteps * self.config.cutoff_step_ratio):
                pipeline._guidance_scale = 1.0
            return callback_kwargs

    cutoff = pipe(class_labels=[1, 2], guidance_scale=8.0, top_k=1, output_type="latent", generator=_seed(),
                  callback_on_step_end=GuidanceCutoff(cutoff_step_ratio=0.0))  # fmt: skip
    unguided = pipe(class_labels=[1, 2], guidance_scale=1.0, top_k=1, output_type="latent", generator=_seed())
    assert all(torch.equal(a, b) for a, b in zip(cutoff.token_maps, unguided.token_maps))


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
    token_maps = pipe(class_labels=[1], output_type="latent", generator=_seed()).token_maps  # no decode, no error
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


# -- the stepping API and callbacks, used directly -----------------------------------------------------------------


def test_stepping_by_hand_is_the_call_and_checks_the_logits():
    from diffusers_var import NonFiniteError

    pipe = tiny_pipeline()
    expected = pipe(class_labels=[1, 2], top_k=5, output_type="pt", generator=_seed())
    state = pipe.prepare_sampling_state(torch.tensor([1, 2]), guided=True)
    generator = _seed()
    for _ in range(3):
        pipe.sample_next_scale(state, 2.5, 5, 0.96, generator=generator)
    assert all(torch.equal(a, b) for a, b in zip(state.token_maps, expected.token_maps))
    torch.testing.assert_close(pipe.decode_state(state, "pt"), expected.images)
    with torch.no_grad():
        pipe.transformer.head.weight[0, 0] = float("nan")
    broken = pipe.prepare_sampling_state(torch.tensor([1]), guided=False)
    for _ in range(3):
        pipe.sample_next_scale(broken, 1.0, 5, 0.96, generator=_seed())
    with pytest.raises(NonFiniteError, match="logits at scale 0"):
        pipe.decode_state(broken, "pt")
    with pytest.raises(ValueError, match=r"ids in \[0, 10\] \(10 is unconditional\), got \[11\]"):
        pipe.prepare_sampling_state(torch.tensor([11]), guided=False)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        pipe.prepare_sampling_state(torch.tensor([1.0]), guided=False)


def test_a_transformer_config_asking_for_tuples_does_not_break_sampling():
    pipe = tiny_pipeline()
    expected = pipe(class_labels=[3], output_type="latent", generator=_seed()).token_maps
    pipe.transformer.config.return_dict = False
    got = pipe(class_labels=[3], output_type="latent", generator=_seed()).token_maps
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_random_classes_with_generators_need_one_per_image(pipe):
    with pytest.raises(ValueError, match="Got 2 generators for num_images_per_prompt=4"):
        pipe(num_images_per_prompt=4, generator=[_seed(), _seed()])


def test_a_callback_must_return_its_dict_and_keep_the_latents_shape(pipe):
    def forgetful(p, i, t, kwargs):
        """Forgets to return its kwargs."""

    with pytest.raises(ValueError, match=r"callback_on_step_end \(forgetful\) must return the dict"):
        pipe(class_labels=1, callback_on_step_end=forgetful, generator=_seed())
    with pytest.raises(ValueError, match=r"must keep \(1, 8, 4, 4\)"):
        pipe(class_labels=1, callback_on_step_end=lambda p, i, t, kw: {"latents": torch.zeros(2, 8)},
             callback_on_step_end_tensor_inputs=["latents"], generator=_seed())  # fmt: skip


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that make the host wait for a device's result: reading a value (``item``, ``bool``, ``int``,
    ``torch.equal``) or a result whose shape depends on values (``nonzero``, ``masked_select``, boolean indexing).
    Copies to the host (``.cpu()``, ``.tolist()``, ``.numpy()``) do not reach a dispatch mode on a CPU tensor and go
    unseen here."""

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)
    READS += (torch.ops.aten.masked_select.default, torch.ops.aten.equal.default, torch.ops.aten.is_nonzero.default)

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = func is torch.ops.aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1]
        )
        self.count += func in self.READS or boolean_index
        return func(*args, **kwargs or {})


@pytest.mark.parametrize("options", [{}, {"top_k": 3, "top_p": 0.9}, {"guidance_scale": 1.0}])
def test_the_scale_loop_never_waits_for_the_device(options):
    """On a GPU the host queues every scale without waiting: the number of host reads of a call does not grow with
    the number of scales. They are four: the labels' range (min and max) before the loop, the logits' finiteness
    read once after it, and the decoded images' finiteness."""
    reads = []
    for patch_nums in ((1, 2), (1, 2, 3, 4, 5)):
        pipe = tiny_pipeline(patch_nums=patch_nums)
        with _HostReads() as mode:
            pipe(class_labels=[1, 3], output_type="pt", generator=torch.Generator().manual_seed(0), **options)
        reads.append(mode.count)
    assert reads == [4, 4], reads
