"""``diffusers-var generate``: grids, per-sample files, reproducibility."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
from conftest import tiny_pipeline

from diffusers_var.cli import main as cli_main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "pipe"
    tiny_pipeline().save_pretrained(path)
    return str(path)


def test_grid_has_one_row_per_class(model_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    cli_main(
        [
            "generate",
            "--model",
            model_dir,
            "--class-labels",
            "1",
            "digit 2",
            "--num-per-class",
            "3",
            "--output",
            str(out),
        ]
    )
    assert capsys.readouterr().out.strip() == str(out)
    grid = PIL.Image.open(out)
    assert grid.height == 2 * 8 and grid.width > 3 * 8
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary file left behind"


def test_output_dir_is_reproducible_and_independent_of_batching(model_dir, tmp_path):
    args = ["generate", "--model", model_dir, "--class-labels", "3", "5", "--num-per-class", "2", "--seed", "4"]
    cli_main([*args, "--output-dir", str(tmp_path / "a")])
    cli_main([*args, "--output-dir", str(tmp_path / "b"), "--batch-size", "1"])
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["3_0.png", "3_1.png", "5_0.png", "5_1.png"]
    for name in names:
        a, b = (np.asarray(PIL.Image.open(tmp_path / d / name)) for d in ("a", "b"))
        assert np.array_equal(a, b), name
    cli_main([*args[:-1], "5", "--output-dir", str(tmp_path / "c")])
    assert not np.array_equal(
        np.asarray(PIL.Image.open(tmp_path / "a" / "3_0.png")), np.asarray(PIL.Image.open(tmp_path / "c" / "3_0.png"))
    )


def test_bad_arguments_exit_with_a_message(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["generate", "--model", model_dir, "--class-labels", "42", "--output", str(tmp_path / "g.png")])
    assert exit_info.value.code == 2 and "out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["generate", "--model", model_dir, "--num-per-class", "0"])
    assert "--num-per-class must be ≥ 1" in capsys.readouterr().err
