"""VARScaleScheduler: guidance schedules, top-k/top-p filtering and the categorical draw."""

from __future__ import annotations

import pytest
import torch

from diffusers_var import VARScaleScheduler
from diffusers_var.schedulers.scale import sample_categorical, top_k_top_p_filter


def test_top_k_keeps_ties_and_top_p_keeps_the_largest():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 0.0]])
    kept = top_k_top_p_filter(logits, top_k=1).isfinite()
    assert kept.tolist() == [[False, True, True, False, False]]  # ties with the k-th largest survive
    assert top_k_top_p_filter(logits, top_k=5).isfinite().all()  # k ≥ V: no filtering
    peaked = torch.tensor([[10.0, 0.0, 0.0]])
    assert top_k_top_p_filter(peaked, top_p=0.01).isfinite().tolist() == [[True, False, False]]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert top_k_top_p_filter(probs, top_p=0.8).isfinite().tolist() == [[True, True, False, False]]
    assert top_k_top_p_filter(probs, top_p=1.0).isfinite().all()
    assert top_k_top_p_filter(probs, top_k=None, top_p=None).isfinite().all()


def test_guidance_schedules():
    linear = VARScaleScheduler(patch_nums=(1, 2, 3, 4, 5))
    assert [linear.guidance_weight(si, 3.0) for si in range(5)] == [0.0, 0.5, 1.0, 1.5, 2.0]
    constant = VARScaleScheduler(patch_nums=(1, 2, 3, 4, 5), guidance_schedule="constant")
    assert [constant.guidance_weight(si, 3.0) for si in range(5)] == [2.0] * 5


def test_step_applies_guidance_to_the_cond_uncond_halves():
    scheduler = VARScaleScheduler(patch_nums=(1, 2, 4), guidance_schedule="constant")
    cond, uncond = torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    out = scheduler.step(
        torch.cat((cond, uncond)), 1, guidance_scale=3.0, top_k=1, generator=torch.Generator().manual_seed(0)
    )
    expected = 3.0 * cond - 2.0 * uncond
    kept = out.logits.isfinite()
    assert kept.sum(-1).eq(1).all() and torch.equal(out.logits[kept], expected.amax(-1).flatten())
    assert torch.equal(out.token_map.flatten(1), expected.argmax(-1))
    unfiltered = scheduler.step(torch.cat((cond, uncond)), 1, guidance_scale=3.0, top_k=0)
    torch.testing.assert_close(unfiltered.logits, expected)
    model_output = torch.cat((cond, cond))
    scheduler.step(model_output, 1, guidance_scale=1.0, top_k=1)
    assert torch.equal(model_output, torch.cat((cond, cond))), "step must not modify its input"
    unguided = scheduler.step(cond, 1, guidance_scale=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unguided.token_map.flatten(1), cond.argmax(-1))


def test_draws_are_reproducible_and_follow_the_distribution():
    scheduler = VARScaleScheduler(patch_nums=(1, 2, 4))
    logits = torch.randn(2, 16, 8)
    first = scheduler.step(logits, 2, generator=torch.Generator().manual_seed(3)).token_map
    again = scheduler.step(logits, 2, generator=torch.Generator().manual_seed(3)).token_map
    other = scheduler.step(logits, 2, generator=torch.Generator().manual_seed(4)).token_map
    assert torch.equal(first, again) and not torch.equal(first, other)
    probs = torch.tensor([[0.7, 0.2, 0.1]]).expand(20000, 3)
    counts = torch.bincount(sample_categorical(probs, torch.Generator().manual_seed(0)), minlength=3) / 20000
    torch.testing.assert_close(counts, torch.tensor([0.7, 0.2, 0.1]), atol=0.015, rtol=0)


def test_exponential_race_equals_multinomial():
    """The cross-device path (used for a CPU generator with CUDA logits) draws the same tokens as multinomial."""
    probs = torch.softmax(torch.randn(64, 40), dim=-1)
    multinomial = sample_categorical(probs, torch.Generator().manual_seed(5))
    race = torch.empty(probs.shape).exponential_(generator=torch.Generator().manual_seed(5))
    assert torch.equal(multinomial, (probs / race).argmax(-1))


def test_one_generator_per_image_makes_images_independent_of_the_batch():
    scheduler = VARScaleScheduler(patch_nums=(1, 2, 4))
    logits = torch.randn(3, 16, 8)
    batch = scheduler.step(logits, 2, more_smooth=True, generator=[torch.Generator().manual_seed(i) for i in range(3)])
    for i in range(3):
        alone = scheduler.step(logits[i : i + 1], 2, more_smooth=True, generator=[torch.Generator().manual_seed(i)])
        assert torch.equal(alone.token_map, batch.token_map[i : i + 1])
        torch.testing.assert_close(alone.code_weights, batch.code_weights[i : i + 1])


def test_more_smooth_weights_are_a_distribution_over_kept_codes():
    scheduler = VARScaleScheduler(patch_nums=(1, 2, 4))
    out = scheduler.step(
        torch.randn(2, 4, 16), 1, top_k=3, more_smooth=True, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(out.code_weights.sum(-1), torch.ones(2, 4))
    assert ((out.code_weights > 0).sum(-1) <= 3).all()
    assert scheduler.step(torch.randn(2, 4, 16), 1).code_weights is None


def test_temperature_sharpens():
    scheduler = VARScaleScheduler(patch_nums=(1, 2, 4))
    logits = (torch.arange(8.0) / 4).expand(500, 16, 8)  # the top two codes are 0.25 apart
    warm = scheduler.step(logits, 2, temperature=1.0, generator=torch.Generator().manual_seed(0)).token_map
    cold = scheduler.step(logits, 2, temperature=0.01, generator=torch.Generator().manual_seed(0)).token_map
    assert (warm == 7).float().mean() < 0.5
    assert (cold == 7).float().mean() > 0.999


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"top_p": 0.0}, r"top_p must lie in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must lie in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be ≥ 0"),
        ({"guidance_scale": -0.5}, "guidance_scale must be ≥ 0"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be finite, got nan"),
        ({"guidance_scale": float("inf")}, "guidance_scale must be finite, got inf"),
        ({"temperature": float("nan")}, "temperature must be finite"),
        ({"temperature": float("inf")}, "temperature must be finite"),
        ({"top_p": float("nan")}, "top_p must be finite"),
        ({"top_k": 1.5}, "top_k must be an integer or None, got 1.5"),
        ({"top_k": 2.0}, "top_k must be an integer or None, got 2.0"),
        ({"top_k": True}, "top_k must be an integer or None, got True"),
        ({"guidance_scale": "2"}, "guidance_scale must be a number, got '2'"),
        ({"more_smooth": 1}, "more_smooth must be True or False"),
    ],
)
def test_bad_sampling_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VARScaleScheduler(patch_nums=(1, 2)).step(torch.randn(1, 4, 8), 1, **kwargs)


def test_non_finite_logits_are_flagged_and_never_reach_the_draw():
    scheduler = VARScaleScheduler(patch_nums=(1, 2))
    logits = torch.randn(2, 4, 8)
    assert scheduler.step(logits, 1, guidance_scale=2.0).finite.item() is True
    for bad in (float("nan"), float("inf")):  # (a lone -inf is a masked code: see the next test)
        broken = logits.clone()
        broken[1, 2, 3] = bad
        out = scheduler.step(broken, 1, guidance_scale=2.0, top_k=4, top_p=0.9)  # the draw itself must not fail
        assert out.finite.item() is False and out.token_map.shape == (1, 2, 2)


def test_masked_codes_stay_masked_under_guidance():
    """−inf marks a code that must not be drawn (e.g. constrained sampling); guidance must not turn −inf − −inf
    into a likely code, and such logits are not a non-finite failure."""
    scheduler = VARScaleScheduler(patch_nums=(1, 2))
    logits = torch.full((2, 4, 8), float("-inf"))
    logits[..., 5] = torch.randn(2, 4)
    out = scheduler.step(logits, 1, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert out.finite.item() is True and (out.token_map == 5).all()
    everything_masked = torch.full((2, 4, 8), float("-inf"))
    out = scheduler.step(everything_masked, 1, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert out.finite.item() is False  # nothing drawable: flagged, and drawn uniformly rather than crashing


def test_bad_configuration_and_steps():
    with pytest.raises(ValueError, match="guidance_schedule must be one of"):
        VARScaleScheduler(guidance_schedule="cosine")
    scheduler = VARScaleScheduler(patch_nums=(1, 2, 4))
    with pytest.raises(ValueError, match="exactly one step per scale"):
        scheduler.set_timesteps(5)
    scheduler.set_timesteps(3)
    assert scheduler.timesteps.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="Scale 1 has 4 positions"):
        scheduler.step(torch.randn(1, 9, 8), 1)


def test_config_round_trip(tmp_path):
    VARScaleScheduler(patch_nums=(1, 2, 4), guidance_schedule="constant").save_pretrained(tmp_path)
    loaded = VARScaleScheduler.from_pretrained(tmp_path)
    assert tuple(loaded.config.patch_nums) == (1, 2, 4) and loaded.config.guidance_schedule == "constant"
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    original = VARScaleScheduler(patch_nums=(1, 2, 4), guidance_schedule="constant")
    assert public(loaded.config) == public(original.config)  # equal, not tuple vs list
