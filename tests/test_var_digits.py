"""The bundled var-digits model: it ships, loads by name, runs the main job, and its samples read as the right digit.

The quality floor (85 % class agreement, 20 samples per class at the default settings, judged by a classifier
trained on the real digits only) makes a regression in the model, the pipeline or the sampler fail CI.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffusers_var import VARPipeline, bundled_model_path
from diffusers_var.generate import DEFAULT_MODEL, add_arguments, generate

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"
sys.path.insert(0, str(DIGITS))
_spec = importlib.util.spec_from_file_location("digits_evaluate", DIGITS / "evaluate.py")
evaluate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate)


def test_bundled_files_are_small_safetensors():
    folder = bundled_model_path("var-digits")
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 10_000_000
    weights = sorted(p.relative_to(folder).as_posix() for p in files if p.suffix == ".safetensors")
    assert weights == ["transformer/model.safetensors", "vqvae/diffusion_pytorch_model.safetensors"]
    card = Path(__file__).resolve().parents[1] / "model_cards" / "var-digits.md"
    assert (folder / "README.md").read_text() == card.read_text()


def test_loads_by_name_and_is_the_cli_default():
    assert DEFAULT_MODEL == "var-digits"
    pipe = VARPipeline.from_pretrained("var-digits")
    assert pipe.transformer.config.num_classes == 10 and pipe.vqvae.image_size == 32
    assert pipe.get_label_ids(["3"]) == [3]


def test_main_job_with_defaults_writes_a_grid(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "diffusers_var.cli", "generate"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("grid.png") and (tmp_path / "grid.png").stat().st_size > 0


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    import argparse

    folder = tmp_path_factory.mktemp("samples")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    generate(parser.parse_args(["--num-per-class", "20", "--seed", "1", "--output-dir", str(folder)]))
    return folder


def test_samples_read_as_the_requested_digit(samples):
    images, labels, _ = evaluate.load_samples(samples)
    assert len(images) == 200 and sorted(set(labels.tolist())) == list(range(10))
    agreement = evaluate.class_agreement(images, labels)
    assert agreement >= 0.85, f"class agreement {agreement:.3f} fell below the 85 % floor"


def test_samples_are_not_copies_of_the_training_set(samples):
    images, _, _ = evaluate.load_samples(samples)
    reference = evaluate.default_reference()
    to_samples = np.median(evaluate.nearest_neighbour_distances(images, reference.train_grey))
    to_test = np.median(evaluate.nearest_neighbour_distances(reference.test_grey, reference.train_grey))
    # copies would sit near 0; new handwriting sits about as far from the training set as real held-out digits
    assert to_samples > 0.5 * to_test, (to_samples, to_test)


def test_the_recipe_commands_parse(tmp_path):
    """run_recipe.py's commands stay valid as the training scripts' flags evolve (parsed, not run)."""
    _recipe = importlib.util.spec_from_file_location("digits_recipe", DIGITS / "run_recipe.py")
    recipe = importlib.util.module_from_spec(_recipe)
    _recipe.loader.exec_module(recipe)
    examples = DIGITS.parent
    parsers = {}
    for name in ("train_vqvae", "train_var"):
        spec = importlib.util.spec_from_file_location(name, examples / f"{name}.py")
        parsers[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(parsers[name])
    steps = recipe.steps(tmp_path, threads=2)
    assert [name for name, _, _ in steps] == [
        "prepare data", "train tokenizer", "train transformer", "sample 50 per class", "evaluate"
    ]  # fmt: skip
    for _, _, command in steps:
        script = Path(command[1]) if command[1].endswith(".py") else None
        if script is not None:
            assert script.is_file(), script
        if script is not None and script.stem in parsers:
            parsers[script.stem].parse_args(command[2:])  # exits (SystemExit) on an unknown or bad flag
