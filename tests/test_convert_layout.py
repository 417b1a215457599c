"""The converter maps the full-size official layouts onto ours, key for key and shape for shape.

``data/official_d16_keys.json`` records the state-dict names and shapes of the official VQVAE and VAR for the
var-d16 and var-d36 (shared AdaLN, 512 px) presets, as built by the official constructors (see its ``_about``).
Weights are never materialised: both sides live on the meta device, except the derived buffers the converter checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from transformers.initialization import no_init_weights

from diffusers_var.convert import (
    PRESETS,
    component_configs,
    convert_transformer_state_dict,
    convert_vqvae_state_dict,
)
from diffusers_var.models.transformer import VARConfig, VARTransformer, scale_level_ids
from diffusers_var.models.vqvae import MultiScaleVQVAE

OFFICIAL = json.loads((Path(__file__).parent / "data" / "official_d16_keys.json").read_text(encoding="utf-8"))
PRESET_NAMES = [name for name in OFFICIAL if not name.startswith("_")]


def official_state_dict(shapes: dict[str, list[int]], patch_nums: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Meta tensors of the recorded shapes; the buffers the converter inspects hold their real values."""
    levels = scale_level_ids(patch_nums)
    state_dict = {}
    for name, shape in shapes.items():
        if name == "lvl_1L":
            value = levels.view(1, -1)
        elif name == "attn_bias_for_masking":
            visible = levels[:, None] >= levels[None, :]
            value = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf")).view(1, 1, *visible.shape)
        elif name.endswith(".zero_k_bias"):
            value = torch.zeros(shape)
        else:
            value = torch.empty(shape, device="meta")
        assert list(value.shape) == shape, f"{name}: rebuilt {list(value.shape)}, recorded {shape}"
        state_dict[name] = value
    return state_dict


def shapes_of(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(value.shape) for name, value in state_dict.items()}


def assert_same_layout(converted: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> None:
    converted, ours = shapes_of(converted), shapes_of(ours)
    assert sorted(set(ours) - set(converted)) == [], "keys our model has but the conversion does not produce"
    assert sorted(set(converted) - set(ours)) == [], "keys the conversion produces but our model lacks"
    misshaped = {k: (converted[k], ours[k]) for k in ours if converted[k] != ours[k]}
    assert misshaped == {}, "converted vs ours shapes differ"


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_vqvae_layout(preset):
    vqvae_kwargs, _, _ = component_configs(**PRESETS[preset])
    patch_nums = vqvae_kwargs["patch_nums"]
    converted = convert_vqvae_state_dict(
        official_state_dict(OFFICIAL[preset]["vqvae"], patch_nums), len(vqvae_kwargs["ch_mult"])
    )
    with torch.device("meta"):
        ours = MultiScaleVQVAE(**vqvae_kwargs).state_dict()
    assert_same_layout(converted, ours)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_transformer_layout(preset):
    _, transformer_kwargs, _ = component_configs(**PRESETS[preset])
    config = VARConfig(**transformer_kwargs)
    official = official_state_dict(OFFICIAL[preset]["var"], tuple(config.patch_nums))
    converted = convert_transformer_state_dict(official, config)
    # not `with torch.device("meta")`: VARTransformer.__init__ calls .tolist() on a tensor, which meta cannot do
    with init_empty_weights(), no_init_weights():
        ours = VARTransformer(config).state_dict()
    assert_same_layout(converted, ours)
    assert config.shared_adaln == (preset == "var-d36")


def test_recorded_presets():
    # the data covers a per-block AdaLN preset and the shared-AdaLN 512 px one
    assert PRESET_NAMES == ["var-d16", "var-d36"]
    assert OFFICIAL["var-d36"]["var"]["pos_1LC"] == [
        1,
        sum(p * p for p in PRESETS["var-d36"]["var_kwargs"]["patch_nums"]),
        2304,
    ]
    assert "shared_ada_lin.1.weight" in OFFICIAL["var-d36"]["var"]
    assert "blocks.0.ada_lin.1.weight" in OFFICIAL["var-d16"]["var"]
