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
    cell = 8 * 16  # 8 px samples scaled up 16x (nearest) to the 128 px minimum cell, with a 4 px gutter
    assert grid.height == 4 + 2 * (cell + 4) and grid.width > 3 * (cell + 4)
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
    assert "argument --num-per-class: must be ≥ 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch-size", "0"], "argument --batch-size: must be ≥ 1, got 0"),
        (["--batch-size", "-1"], "argument --batch-size: must be ≥ 1, got -1"),
        (["--num-per-class", "2.5"], "argument --num-per-class: must be a whole number, got '2.5'"),
        (["--device", "foo"], "--device 'foo' is not a device name"),
        (["--device", "cuda"], "CUDA is not available on this machine"),
        (["--output", "grid.bmpx"], "unsupported extension '.bmpx'"),
        (["--output", "grid"], "unsupported extension '(none)'"),
        (["--class-labels", "3", "digit 3"], "names class 3 twice ('3' and 'digit 3')"),
        (["--guidance-scale", "nan"], "guidance_scale must be finite"),
    ],
)
def test_errors_are_one_line_without_a_traceback(model_dir, tmp_path, extra, message, capsys):
    if extra == ["--device", "cuda"] and __import__("torch").cuda.is_available():
        extra = ["--device", "cuda:99"]
        message = "CUDA device"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["generate", "--model", model_dir, "--output", str(tmp_path / "g.png"), *extra])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]  # besides loading progress bars
    assert exit_info.value.code == 2 and len(errors) == 1 and err.strip().endswith(errors[0]), err
    assert message in errors[0], err


def test_python_m_generate_is_the_same_command(model_dir):
    import subprocess
    import sys

    # the same parser and main as the console script (whose sampling the other tests run): its one-line error
    command = [sys.executable, "-m", "diffusers_var.generate", "--model", model_dir, "--class-labels", "1"]
    result = subprocess.run([*command, "--batch-size", "0"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "diffusers-var generate: error: argument --batch-size: must be ≥ 1, got 0 (see --help)"
    ]


def test_bad_output_paths_fail_before_sampling(model_dir, tmp_path, monkeypatch):
    from diffusers_var import VARPipeline

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before checking the output path")

    monkeypatch.setattr(VARPipeline, "__call__", no_sampling)
    (tmp_path / "a-file").write_text("precious")
    (tmp_path / "folder").mkdir()
    (tmp_path / "theirs.png").write_bytes((tmp_path / "a-file").read_bytes())
    PIL.Image.new("RGB", (4, 4)).save(tmp_path / "photo.png")  # a real image, not written by us
    cases = [
        (["--output-dir", str(tmp_path / "a-file")], "is a file; give a folder"),
        (["--output-dir", str(tmp_path / "a-file" / "sub")], "cannot be created: " + str(tmp_path / "a-file")),
        (["--output", str(tmp_path / "a-file" / "grid.png")], "cannot be created"),
        (["--output", str(tmp_path / "folder")], "is a folder; give a file name"),
        (["--output", str(tmp_path / "photo.png")], "exists and was not written by diffusers-var"),
        (["--output", str(tmp_path / "theirs.png")], "exists and was not written by diffusers-var"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", "\\(")):
            from diffusers_var.generate import add_arguments, generate

            parser = __import__("argparse").ArgumentParser()
            add_arguments(parser)
            generate(parser.parse_args(["--model", model_dir, *extra]))
    assert (tmp_path / "a-file").read_text() == "precious"


def test_outputs_follow_the_extension_are_tagged_and_only_ours_are_replaced(model_dir, tmp_path):
    from diffusers_var.generate import written_by_us

    for name, fmt in (("grid.jpg", "JPEG"), ("grid.webp", "WEBP"), ("grid.png", "PNG")):
        cli_main(["generate", "--model", model_dir, "--class-labels", "1", "--num-per-class", "2",
                  "--output", str(tmp_path / name)])  # fmt: skip
        with PIL.Image.open(tmp_path / name) as image:
            assert image.format == fmt and written_by_us(tmp_path / name)
    # a rerun replaces our own grid; a photo of the user's needs --overwrite
    cli_main(["generate", "--model", model_dir, "--class-labels", "1", "--output", str(tmp_path / "grid.png")])
    PIL.Image.new("RGB", (4, 4)).save(tmp_path / "photo.png")
    args = ["generate", "--model", model_dir, "--class-labels", "1", "--output", str(tmp_path / "photo.png")]
    with pytest.raises(SystemExit):
        cli_main(args)
    assert PIL.Image.open(tmp_path / "photo.png").size == (4, 4)
    cli_main([*args, "--overwrite"])
    assert written_by_us(tmp_path / "photo.png")


def test_output_dir_streams_each_batch_to_disk(model_dir, tmp_path, monkeypatch):
    """Files appear as each batch finishes: when the third batch is sampled, the first two batches are on disk."""
    from diffusers_var import VARPipeline

    out = tmp_path / "samples"
    seen_on_disk = []
    call = VARPipeline.__call__

    def spy(self, *args, **kwargs):
        seen_on_disk.append(len(list(out.glob("*.png"))) if out.is_dir() else 0)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(VARPipeline, "__call__", spy)
    cli_main(["generate", "--model", model_dir, "--class-labels", "1", "2", "--num-per-class", "3",
              "--batch-size", "2", "--output-dir", str(out)])  # fmt: skip
    assert seen_on_disk == [0, 2, 4] and len(list(out.glob("*.png"))) == 6


def test_grid_rows_are_labelled_once():
    from diffusers_var.generate import class_name

    pipe = tiny_pipeline(id2label={0: "0", 1: "golden retriever, golden", 2: "a" * 40})
    assert class_name(pipe, 0) == "0"  # not "0: 0"
    assert class_name(pipe, 1) == "1: golden retriever"
    assert class_name(pipe, 2).endswith("…") and len(class_name(pipe, 2)) == 28
    assert class_name(pipe, 3) == "3"


def test_every_flag_says_its_default():
    import argparse

    from diffusers_var import convert, generate

    for add_arguments in (generate.add_arguments, convert.add_arguments):
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        for action in parser._actions:
            if action.dest == "help":
                continue
            assert action.help and ("default" in action.help or "required" in action.help), action.option_strings


def test_temperature_and_more_smooth_reach_the_pipeline(model_dir, tmp_path, monkeypatch):
    from diffusers_var import VARPipeline

    seen = {}
    call = VARPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(VARPipeline, "__call__", spy)
    cli_main(["generate", "--model", model_dir, "--class-labels", "1", "--num-per-class", "1", "--temperature", "0.5",
              "--more-smooth", "--output", str(tmp_path / "g.png")])  # fmt: skip
    assert seen["temperature"] == 0.5 and seen["more_smooth"] is True


def test_a_grid_too_large_for_its_format_is_refused_before_sampling():
    from pathlib import Path

    from diffusers_var.generate import check_grid_size

    check_grid_size(Path("grid.webp"), 10, 8, 32)
    with pytest.raises(ValueError, match="more than a WEBP image can hold. Use --output-dir"):
        check_grid_size(Path("grid.webp"), 64, 8, 256)
    with pytest.raises(ValueError, match="more than fits in memory"):
        check_grid_size(Path("grid.png"), 1000, 8, 256)


# -- sampling at scale: npz, resume, several processes -----------------------------------------------------------------


def base_args(model_dir, *extra):
    return ["generate", "--model", model_dir, "--class-labels", "1", "3", "5", "--num-per-class", "3",
            "--batch-size", "2", "--seed", "7", *extra]  # fmt: skip


def test_output_npz_alone_writes_the_adm_layout_and_no_grid(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli_main(base_args(model_dir, "--output-npz", "s.npz"))
    assert not (tmp_path / "grid.png").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with np.load(tmp_path / "s.npz") as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (9, 8, 8, 3)
    assert labels.dtype == np.int64 and labels.tolist() == [1, 1, 1, 3, 3, 3, 5, 5, 5]
    cli_main(base_args(model_dir, "--output-dir", "pngs", "--output-npz", "t.npz"))
    order = [f"{c}_{i}.png" for c in (1, 3, 5) for i in range(3)]
    pngs = np.stack([np.asarray(PIL.Image.open(tmp_path / "pngs" / name)) for name in order])
    assert np.array_equal(pngs, images)  # the same pixels, in (class, index) order
    with np.load(tmp_path / "t.npz") as data:
        assert np.array_equal(data["arr_0"], images)
    cli_main(base_args(model_dir, "--output-npz", "s.npz", "--seed", "8"))  # our own npz: replaced
    np.savez(tmp_path / "theirs.npz", arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit):
        cli_main(base_args(model_dir, "--output-npz", "theirs.npz"))


def test_a_killed_run_resumes_without_redoing_finished_batches(model_dir, tmp_path, monkeypatch):
    from diffusers_var import VARPipeline

    cli_main(base_args(model_dir, "--output-npz", str(tmp_path / "straight.npz")))
    call, calls = VARPipeline.__call__, []

    def killed_after_two_batches(self, *args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill would stop it, mid-run
        calls.append(kwargs["class_labels"])
        return call(self, *args, **kwargs)

    monkeypatch.setattr(VARPipeline, "__call__", killed_after_two_batches)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(base_args(model_dir, "--output-npz", str(tmp_path / "resumed.npz")))
    assert exit_info.value.code == 130 and not (tmp_path / "resumed.npz").exists()
    resumed_calls = []

    def counting(self, *args, **kwargs):
        resumed_calls.append(kwargs["class_labels"])
        return call(self, *args, **kwargs)

    monkeypatch.setattr(VARPipeline, "__call__", counting)
    cli_main(base_args(model_dir, "--output-npz", str(tmp_path / "resumed.npz")))
    assert resumed_calls == [[3, 3], [5, 5], [5]]  # batches 0 and 1 ([1, 1], [1, 3]) were not redone
    with np.load(tmp_path / "straight.npz") as a, np.load(tmp_path / "resumed.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_resumed_run_must_be_the_same_run(model_dir, tmp_path, monkeypatch, capsys):
    from diffusers_var import VARPipeline

    call = VARPipeline.__call__

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(VARPipeline, "__call__", killed)
    with pytest.raises(SystemExit):
        cli_main(base_args(model_dir, "--output-dir", str(tmp_path / "out")))
    monkeypatch.setattr(VARPipeline, "__call__", call)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(base_args(model_dir, "--output-dir", str(tmp_path / "out"), "--top-k", "3"))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        "records an unfinished run with other settings (sampling.top_k differ)" in error and "--overwrite" in error
    ), error
    cli_main(base_args(model_dir, "--output-dir", str(tmp_path / "out"), "--top-k", "3", "--overwrite"))
    assert len(list((tmp_path / "out").glob("*.png"))) == 9


def test_two_processes_write_the_bytes_of_one(model_dir, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    one = [sys.executable, "-m", "diffusers_var.cli", *base_args(model_dir)]
    subprocess.run([*one, "--output-dir", str(tmp_path / "one"), "--output-npz", str(tmp_path / "one.npz")],
                   env=env, check=True, capture_output=True)  # fmt: skip
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "-m"]
    two = [*launch, "diffusers_var.cli", *base_args(model_dir)]
    result = subprocess.run([*two, "--output-dir", str(tmp_path / "two"), "--output-npz", str(tmp_path / "two.npz")],
                            env=env, capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "one.npz").read_bytes() == (tmp_path / "two.npz").read_bytes()
    for png in sorted((tmp_path / "one").glob("*.png")):
        assert png.read_bytes() == (tmp_path / "two" / png.name).read_bytes(), png.name


def test_progressive_draws_a_row_per_sample_and_a_column_per_scale(model_dir, tmp_path, capsys):
    from diffusers_var.generate import GUTTER, MIN_CELL

    cli_main(base_args(model_dir, "--progressive", "--output", str(tmp_path / "scales.png")))
    cli_main(base_args(model_dir, "--output-dir", str(tmp_path / "plain")))
    grid = np.asarray(PIL.Image.open(tmp_path / "scales.png").convert("RGB"))
    cell = 8 * (MIN_CELL // 8)  # the tiny model's 8 px samples, scaled up
    columns, rows = 3, 9  # the tiny model's 3 scales; 3 classes × 3 samples
    left = grid.shape[1] - columns * (cell + GUTTER)  # after the row labels
    top = grid.shape[0] - rows * (cell + GUTTER)  # after the scale titles
    assert top > GUTTER  # there is a title band
    # the last column is each sample as plain generate draws it (same seed, class, index and batches)
    for row, (class_id, index) in enumerate([(c, i) for c in (1, 3, 5) for i in range(3)]):
        y, x = top + row * (cell + GUTTER), left + (columns - 1) * (cell + GUTTER)
        plain = np.asarray(PIL.Image.open(tmp_path / "plain" / f"{class_id}_{index}.png").convert("RGB"))
        assert np.array_equal(grid[y : y + cell : cell // 8, x : x + cell : cell // 8], plain), (class_id, index)
    with pytest.raises(SystemExit):
        cli_main(base_args(model_dir, "--progressive", "--output-npz", str(tmp_path / "x.npz")))
    assert "--progressive draws one picture" in capsys.readouterr().err
