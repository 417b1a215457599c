"""The benchmark scripts run and print the figures they promise (smoke test on a tiny model; no timing asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_speed_prints_json(capsys):
    result = _load("sample_speed").main(["--tiny", "--repeats", "1", "--warmup", "0", "--threads", "1"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == result
    assert result["images_per_s"] > 0 and result["peak_memory_mib"] > 0 and result["memory_method"]
    assert result["batch_size"] == 2 and result["model"] == "tiny"


def test_train_speed_prints_json(capsys):
    module = _load("train_speed")
    result = module.main(["--tiny", "--repeats", "1", "--warmup", "0", "--threads", "1"])
    assert json.loads(capsys.readouterr().out) == result
    assert result["tokens_per_s"] > 0 and result["peak_memory_mib"] > 0
    assert result["tokens_per_image"] == 1 + 4 + 16 and result["target"] == "transformer"
    result = module.main(["--tiny", "--target", "vqvae", "--precision", "bf16", "--repeats", "1", "--warmup", "0"])
    assert result["tokens_per_s"] > 0 and result["precision"] == "bf16"


def test_train_speed_times_the_post_training_objectives_against_ce(capsys, monkeypatch):
    module = _load("train_speed")
    common = ["--tiny", "--repeats", "1", "--warmup", "0", "--threads", "1"]
    for objective in ("cca", "ddo"):
        result = module.main([*common, "--objective", objective])
        assert result["objective"] == objective and result["tokens_per_s"] > 0
    offloaded = module.main([*common, "--objective", "cca", "--offload-reference"])
    assert offloaded["offload_reference"] and offloaded["tokens_per_s"] > 0
    capsys.readouterr()

    def in_process(command, **kwargs):  # each objective's run, without paying a new interpreter per objective
        import contextlib
        import io
        import subprocess

        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            module.main(command[2:])
        return subprocess.CompletedProcess(command, 0, stdout=output.getvalue())

    monkeypatch.setattr(module.subprocess, "run", in_process)
    summary = module.main([*common, "--objective", "all"])
    assert json.loads(capsys.readouterr().out) == summary
    assert set(summary["objectives"]) == {"ce", "cca", "ddo"} and summary["relative_to_ce"]["ce"]["tokens_per_s"] == 1
    assert all(summary["relative_to_ce"][name]["peak_memory"] > 0 for name in ("cca", "ddo"))
    with pytest.raises(ValueError, match="whole transformer"):
        module.main([*common, "--objective", "ddo", "--lora-rank", "2"])


def test_roofline_prints_the_bound_of_every_scale(capsys):
    module = _load("roofline")
    result = module.main(["--tiny", "--repeats", "1", "--threads", "1"])
    assert json.loads(capsys.readouterr().out) == result
    assert [s["tokens"] for s in result["per_scale"]] == [1, 4, 16]
    assert result["gemm_roof_gflops"] > 0 and result["memory_gb_per_s"] > 0 and result["decoder_gflop_per_image"] > 0
    assert 0 < result["fraction_of_bound"] and result["transformer_linear_bound_s"] > 0
    every_scale = module.main(["--tiny", "--repeats", "1", "--threads", "1", "--adaln-every-scale"])
    adaln_gflop = 2 * 2 * 64 * (6 * 64 * 2 + 2 * 64) / 1e9  # two rows: two blocks' 6C and the head's 2C outputs
    extra = every_scale["transformer_linear_gflop"] - result["transformer_linear_gflop"]
    assert extra == pytest.approx(2 * adaln_gflop, rel=1e-3)  # recomputed at the two later scales


@pytest.mark.parametrize("script", ["roofline", "compare_official"])
def test_benchmarks_asked_for_cuda_without_it_say_so_in_one_line(script, monkeypatch, capsys):
    module = _load(script)
    monkeypatch.setattr(module.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--device", "cuda"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and err.count("\n") == 1


def test_train_speed_compares_with_the_official_code_at_an_official_size_only():
    module = _load("train_speed")
    with pytest.raises(ValueError, match="give --preset"):
        module.main(["--tiny", "--official-repo", "/nonexistent"])
    with pytest.raises(ValueError, match="plain transformer step"):
        module.main(["--preset", "var-d16", "--official-repo", "/nonexistent", "--objective", "cca"])
