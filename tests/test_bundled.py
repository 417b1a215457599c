"""Bundled models: the registry's errors, and loading by name through from_pretrained and the command line.

The registry is pointed at a tiny pipeline saved under tmp_path (absolute entries are allowed), never at src/.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_pipeline

import diffusers_var.pretrained
from diffusers_var import BUNDLED_MODELS, VARPipeline, bundled_model_path
from diffusers_var.cli import main as cli_main


def sample(pipe: VARPipeline) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe([1, 3], generator=torch.Generator().manual_seed(0), output_type="pt").images


@pytest.fixture
def bundled(tmp_path, monkeypatch):
    """A tiny pipeline registered as "var-digits"; returns the pipeline."""
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "bundle")
    monkeypatch.setitem(BUNDLED_MODELS, "var-digits", str(tmp_path / "bundle"))
    monkeypatch.chdir(tmp_path)  # no local folder named var-digits
    return pipe


def test_registry_is_the_one_the_package_exports():
    assert diffusers_var.pretrained.BUNDLED_MODELS is BUNDLED_MODELS
    assert BUNDLED_MODELS["var-digits"] == "pretrained/var-digits"


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"'var-nope' is not a bundled model.*\['digits-classifier', 'var-digits'\]"):
        bundled_model_path("var-nope")


def test_missing_folder_says_the_installation_lacks_it(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setitem(BUNDLED_MODELS, "var-digits", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="'var-digits' is missing from this installation"):
        bundled_model_path("var-digits")


def test_from_pretrained_loads_a_bundled_name(bundled, tmp_path):
    assert bundled_model_path("var-digits") == tmp_path / "bundle"
    loaded = VARPipeline.from_pretrained("var-digits")
    assert torch.equal(sample(loaded), sample(bundled))


def test_a_local_folder_of_the_same_name_wins(bundled, tmp_path):
    tiny_pipeline(seed=1).save_pretrained(tmp_path / "var-digits")
    local = VARPipeline.from_pretrained("var-digits")
    assert not torch.equal(local.transformer.head.weight, bundled.transformer.head.weight)


def test_generate_accepts_a_bundled_name(bundled, tmp_path):
    cli_main(
        [
            "generate",
            "--model",
            "var-digits",
            "--class-labels",
            "1",
            "--num-per-class",
            "1",
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["1_0.png"]
