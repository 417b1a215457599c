"""Rejection sampling (best of M by a classifier, at the end or at an early scale) and the loop's state hook it
is built on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_pipeline

from diffusers_var.cli import main as cli_main
from diffusers_var.evaluation.samples import to_uint8
from diffusers_var.search import ClassifierVerifier, RejectionSampler, default_rejection_scale


def generators(count: int, m: int, offset: int = 0) -> list[list[torch.Generator]]:
    return [[torch.Generator().manual_seed(offset + 100 * i + j) for j in range(m)] for i in range(count)]


def brightness_log_probs(images: np.ndarray) -> torch.Tensor:
    """A stand-in classifier of 10 classes that likes bright images: log p(y|x) grows with the mean pixel for
    every y (the rest of the mass on an 11th class)."""
    p = torch.as_tensor(images.reshape(len(images), -1).mean(axis=1) / 255 * 0.09 + 0.001)
    return torch.cat([p[:, None].repeat(1, 10), 1 - 10 * p[:, None]], dim=1).log()


UNGUIDED = {"guidance_scale": 1.0, "top_k": 0, "top_p": 1.0}


# -- the loop's state hook -------------------------------------------------------------------------------------


def test_a_state_callback_can_keep_some_rows_and_they_finish_as_if_sampled_alone():
    pipe = tiny_pipeline()
    seeds = [11, 12, 13, 14]

    def keep_2_and_0(pipe, scale_index, state):
        return state.select(torch.tensor([2, 0])) if scale_index == 1 else None

    out = pipe(
        class_labels=[1, 2, 3, 4],
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="np",
        state_callback=keep_2_and_0,
        **UNGUIDED,
    )
    alone = pipe(
        class_labels=[3, 1],
        generator=[torch.Generator().manual_seed(s) for s in (13, 11)],
        output_type="np",
        **UNGUIDED,
    )
    assert out.class_labels.tolist() == [3, 1] and out.images.shape[0] == 2
    for mine, theirs in zip(out.token_maps, alone.token_maps):
        assert torch.equal(mine, theirs)
    np.testing.assert_allclose(out.images, alone.images, atol=1e-5)


def test_a_state_callback_works_with_guidance_and_one_generator():
    pipe = tiny_pipeline()
    out = pipe(
        class_labels=[1, 2, 3],
        generator=torch.Generator().manual_seed(0),
        state_callback=lambda p, si, s: s.select(torch.tensor([1])) if si == 0 else None,
        output_type="np",
    )
    assert out.class_labels.tolist() == [2] and [t.shape[0] for t in out.token_maps] == [1, 1, 1]


@pytest.mark.parametrize(
    "returned, message",
    [
        (lambda s: "state", "must return a VARSamplingState or None, got <class 'str'>"),
        (lambda s: s.select(torch.tensor([0])).__class__(**{**vars(s), "token_maps": s.token_maps[:-1]}), "scale 0"),
        (lambda s: s.__class__(**{**vars(s), "generators": s.generators[:1]}), "1 generators for 2 samples"),
    ],
)
def test_a_state_callback_that_returns_something_unusable_is_named(returned, message):
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match=message):
        pipe(
            class_labels=[1, 2],
            generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)],
            state_callback=lambda p, si, s: returned(s),
            **UNGUIDED,
        )


def test_select_refuses_rows_outside_the_batch():
    pipe = tiny_pipeline()
    state = pipe.prepare_sampling_state(torch.tensor([1, 2]), guided=True)
    with pytest.raises(ValueError, match=r"indices in \[0, 2\), got \[2\]"):
        state.select(torch.tensor([2]))
    assert state.select(torch.tensor([1, 1])).model_labels.tolist() == [2, 2, 10, 10]


# -- the sampler -------------------------------------------------------------------------------------------------


def test_the_default_rejection_scale_is_the_first_at_least_half_the_final_side():
    assert default_rejection_scale((1, 2, 3, 4, 5, 6, 8, 10, 13, 16)) == 6  # 8×8 of VAR's 256 px models
    assert default_rejection_scale((1, 2, 3, 4, 6, 8)) == 3  # var-digits: 4×4
    assert default_rejection_scale((1, 2, 4)) == 1


def test_one_candidate_is_plain_sampling():
    pipe = tiny_pipeline()
    sampler = RejectionSampler(pipe, ClassifierVerifier(brightness_log_probs), oversample=1)
    out = sampler([1, 5, 5], generators(3, 1), **UNGUIDED)
    plain = pipe(class_labels=[1, 5, 5], generator=[g[0] for g in generators(3, 1)], output_type="np", **UNGUIDED)
    assert np.array_equal(out.images, to_uint8(plain.images))
    assert (out.candidates, out.accepted, out.relative_compute, out.acceptance_rate) == (3, 3, 1.0, 1.0)


def test_final_mode_keeps_each_images_best_candidate_by_the_classifier():
    pipe = tiny_pipeline()
    verifier = ClassifierVerifier(brightness_log_probs)
    out = RejectionSampler(pipe, verifier, oversample=3)([2, 7], generators(2, 3), **UNGUIDED)
    candidates = [
        to_uint8(
            pipe(class_labels=[2, 7], generator=[g[m] for g in generators(2, 3)], output_type="np", **UNGUIDED).images
        )
        for m in range(3)
    ]
    brightness = np.array([[c[i].mean() for c in candidates] for i in range(2)])
    for i in range(2):
        assert np.array_equal(out.images[i], candidates[int(brightness[i].argmax())][i])
    assert out.candidates == 6 and out.relative_compute == 3.0 and out.acceptance_rate == pytest.approx(1 / 3)
    assert torch.allclose(out.scores, verifier(out.images, torch.tensor([2, 7])))


def test_early_mode_finishes_the_best_preview_and_counts_its_cost():
    pipe = tiny_pipeline()
    seen = []

    def previews_then_images(images):
        seen.append(images.shape[0])
        return brightness_log_probs(images)

    sampler = RejectionSampler(pipe, ClassifierVerifier(previews_then_images), oversample=4, mode="early")
    assert sampler.rejection_scale == 1
    out = sampler([3, 4, 8], generators(3, 4), **UNGUIDED)
    assert seen == [3, 3, 3, 3, 3]  # 3 × 4 previews scored at scale 1, 3 at a time, then the 3 kept images
    assert out.images.shape == (3, 8, 8, 3) and out.class_labels.tolist() == [3, 4, 8]
    # sizes 1, 4, 16: 4 candidates to scale 1 (5 tokens each), then 16 for the kept one, against 21 per image
    assert out.transformer_tokens == 3 * (4 * 5 + 16) and out.relative_compute == pytest.approx(36 / 21)
    assert out.previews_decoded == 12 and out.candidates == 12
    # the kept sample is exactly the candidate whose preview was brightest, finished alone
    flat = [g for per_image in generators(3, 4) for g in per_image]
    previews = {}

    def record_previews(pipe, scale_index, state):
        previews[scale_index] = pipe.decode_latents(state.latents, "np")

    pipe(class_labels=[c for c in (3, 4, 8) for _ in range(4)], generator=flat, output_type="np", **UNGUIDED,
         state_callback=record_previews)  # fmt: skip
    best = [int(to_uint8(previews[1][4 * i : 4 * i + 4]).reshape(4, -1).mean(1).argmax()) for i in range(3)]
    alone = pipe(class_labels=[3, 4, 8], generator=[generators(3, 4)[i][best[i]] for i in range(3)], **UNGUIDED,
                 output_type="np")  # fmt: skip
    assert np.abs(out.images.astype(int) - to_uint8(alone.images).astype(int)).max() <= 1


def test_an_accept_threshold_draws_only_what_each_class_still_needs():
    pipe = tiny_pipeline()
    verifier = ClassifierVerifier(brightness_log_probs)
    scores = verifier(
        to_uint8(pipe(class_labels=[1] * 8, generator=[g for g in generators(1, 8)[0]], output_type="np").images),
        torch.ones(8, dtype=torch.long),
    ).exp()
    never = RejectionSampler(pipe, verifier, oversample=3, accept_threshold=1.0)([1, 1, 6], generators(3, 3))
    assert (never.candidates, never.accepted, never.acceptance_rate) == (9, 0, 0.0)
    always = RejectionSampler(pipe, verifier, oversample=3, accept_threshold=float(scores.min()) / 2)
    out = always([1, 1, 6], generators(3, 3))
    assert (out.candidates, out.accepted, out.relative_compute) == (3, 3, 1.0)
    # a class that falls short keeps its best candidates: at least as good as the best of each image's own three
    best_of = RejectionSampler(pipe, verifier, oversample=3)([1, 1, 6], generators(3, 3))
    assert never.scores.sum() >= best_of.scores.sum() - 1e-6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "late"}, r"mode must be one of \('final', 'early'\), got 'late'"),
        ({"oversample": 0}, "must be an integer ≥ 1, got 0"),
        ({"mode": "early", "rejection_scale": 2}, r"before the last, in \[0, 1\], got 2"),
        ({"rejection_scale": 1}, "it needs mode='early'"),
        ({"mode": "early", "accept_threshold": 0.5}, "it needs mode='final'"),
        ({"accept_threshold": 1.5}, r"p\(y\|x\) in \(0, 1\], got 1.5"),
    ],
)
def test_bad_sampler_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RejectionSampler(tiny_pipeline(), ClassifierVerifier(brightness_log_probs), **kwargs)


def test_bad_calls_are_named():
    sampler = RejectionSampler(tiny_pipeline(), ClassifierVerifier(brightness_log_probs), oversample=2)
    with pytest.raises(ValueError, match="one list of 2 generators"):
        sampler([1, 2], generators(2, 3))
    with pytest.raises(ValueError, match="not \\['guidance'\\]"):
        sampler([1], generators(1, 2), guidance=2.0)
    with pytest.raises(ValueError, match="knows 11 classes, but class 12 was asked for"):
        ClassifierVerifier(brightness_log_probs)(np.zeros((1, 8, 8, 3), np.uint8), torch.tensor([12]))
    with pytest.raises(ValueError, match="returned \\(1, 2, 3\\), not \\(N, classes\\)"):
        ClassifierVerifier(lambda images: torch.zeros(1, 2, 3))(np.zeros((1, 8, 8, 3), np.uint8), torch.tensor([0]))
    with pytest.raises(ValueError, match="a model spec or a callable, got int"):
        ClassifierVerifier(3)


# -- on var-digits, with the bundled classifier -------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    from diffusers_var import VARPipeline

    pipe = VARPipeline.from_pretrained("var-digits")
    pipe.set_progress_bar_config(disable=True)
    return pipe, ClassifierVerifier("digits-classifier")


@pytest.mark.parametrize("mode", ["final", "early"])
def test_rejection_at_m4_raises_the_digits_classifiers_confidence(digits, mode):
    pipe, verifier = digits
    labels = [c for c in range(10) for _ in range(6)]
    plain = RejectionSampler(pipe, verifier, oversample=1)(labels, generators(60, 1, offset=5), **UNGUIDED)
    kept = RejectionSampler(pipe, verifier, oversample=4, mode=mode)(labels, generators(60, 4, offset=5), **UNGUIDED)
    plain_p, kept_p = plain.scores.exp(), kept.scores.exp()
    assert kept_p.mean() > plain_p.mean() + 0.01, (plain_p.mean(), kept_p.mean())
    assert kept_p.min() > plain_p.min() and (kept_p < 0.5).sum() < max((plain_p < 0.5).sum(), 1)
    if mode == "final":  # candidate 0 is the plain sample, so no image gets worse
        assert bool((kept.scores >= plain.scores - 1e-6).all())
    else:
        assert kept.relative_compute == pytest.approx((4 * 30 + 100) / 130)


def test_a_classifier_of_other_classes_is_refused(tmp_path):
    from transformers import ConvNextConfig, ConvNextForImageClassification

    config = ConvNextConfig(num_stages=1, hidden_sizes=[8], depths=[1], num_labels=3)
    ConvNextForImageClassification(config).save_pretrained(tmp_path / "three")
    verifier = ClassifierVerifier(str(tmp_path / "three"))
    with pytest.raises(ValueError, match="knows 3 classes but the generator has 10"):
        verifier.check_classes(10)


# -- generate --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "pipe"
    tiny_pipeline().save_pretrained(path)
    return str(path)


def generate_args(model_dir, *extra):
    return ["generate", "--model", model_dir, "--class-labels", "1", "3", "--num-per-class", "3", "--batch-size", "2",
            "--guidance-scale", "1", "--top-k", "0", "--top-p", "1", *extra]  # fmt: skip


def test_generate_with_one_candidate_writes_plain_generations_bytes(model_dir, tmp_path, capsys):
    cli_main(generate_args(model_dir, "--output-npz", str(tmp_path / "plain.npz")))
    cli_main(generate_args(model_dir, "--output-npz", str(tmp_path / "m1.npz"), "--rejection-classifier",
                           "digits-classifier", "--oversample", "1"))  # fmt: skip
    assert "6 images kept from 6 candidates" in capsys.readouterr().out
    with np.load(tmp_path / "plain.npz") as plain, np.load(tmp_path / "m1.npz") as m1:
        assert np.array_equal(plain["arr_0"], m1["arr_0"]) and np.array_equal(plain["arr_1"], m1["arr_1"])


@pytest.mark.parametrize("mode", ["final", "early"])
def test_generate_rejects_and_reports_acceptance_and_compute(model_dir, tmp_path, mode, capsys):
    cli_main(generate_args(model_dir, "--output-dir", str(tmp_path / "pngs"), "--output-npz", str(tmp_path / "s.npz"),
                           "--rejection-classifier", "digits-classifier", "--rejection-mode", mode))  # fmt: skip
    out = capsys.readouterr().out
    compute = "1.71×" if mode == "early" else "4.00×"  # early: 4 × 5 + 16 tokens of 21
    assert f"6 images kept from 24 candidates, 6 accepted (acceptance rate 25.0%); transformer compute {compute}" in out
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == [f"{c}_{i}.png" for c in (1, 3) for i in range(3)]
    with np.load(tmp_path / "s.npz") as npz:
        settings = json.loads(str(npz["diffusers_var_settings"]))
        assert npz["arr_1"].tolist() == [1, 1, 1, 3, 3, 3]
    rejection = settings["rejection"]
    assert rejection["mode"] == mode and rejection["oversample"] == 4
    assert rejection["classifier"]["extractor"] == "digits-classifier" and rejection["totals"]["candidates"] == 24
    assert rejection["rejection_scale"] == (1 if mode == "early" else None)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--oversample", "4"], "--oversample configure rejection sampling; add --rejection-classifier SPEC"),
        (["--rejection-classifier", "no/such-classifier"], "Cannot load the image model 'no/such-classifier'"),
        (["--rejection-classifier", "digits-classifier", "--rejection-scale", "5", "--rejection-mode", "early"],
         r"--rejection-scale must be an index into patch_nums=(1, 2, 4) before the last"),
        (["--rejection-classifier", "digits-classifier", "--accept-threshold", "0.5", "--rejection-mode", "early"],
         "accept_threshold applies to final images"),
        (["--rejection-classifier", "digits-classifier", "--oversample", "0"], "argument --oversample: must be ≥ 1"),
    ],
)  # fmt: skip
def test_bad_rejection_flags_are_one_line_errors(model_dir, tmp_path, extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(generate_args(model_dir, "--output", str(tmp_path / "g.png"), *extra))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert exit_info.value.code == 2 and len(errors) == 1, err
    assert message.replace("accept_threshold", "--accept-threshold") in errors[0], err
