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
