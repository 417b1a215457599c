"""EMA and checkpoint bookkeeping of the training scripts."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from conftest import tiny_transformer

from diffusers_var.training.checkpoints import (
    MANIFEST,
    checkpoint_problem,
    list_checkpoints,
    resolve_resume_path,
    save_checkpoint,
)
from diffusers_var.training.ema import ParameterEMA


def test_ema_tracks_the_average_and_round_trips():
    model = tiny_transformer()
    ema = ParameterEMA(model, decay=0.5, warmup=False)
    start = model.head.bias.detach().clone()
    with torch.no_grad():
        model.head.bias.add_(2.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["head.bias"], start + 1.0)
    restored = ParameterEMA(tiny_transformer(seed=1), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    other = tiny_transformer(seed=1)
    restored.copy_to(other)
    torch.testing.assert_close(other.head.bias, start + 1.0)
    assert ParameterEMA(model, decay=0.999).current_decay() == pytest.approx(0.1)  # warm-up: 1/10 at first
    with pytest.raises(ValueError, match="EMA decay"):
        ParameterEMA(model, decay=1.0)


def test_checkpoints_are_atomic_rotated_and_resolved(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    for step in (2, 4, 6):
        save_checkpoint(accelerator, tmp_path, step, total_limit=2)
    (tmp_path / ".checkpoint-8.tmp").mkdir()  # an interrupted save is never resumed from
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    assert resolve_resume_path(tmp_path, "latest").name == "checkpoint-6"
    assert resolve_resume_path(tmp_path / "empty", "latest") is None and resolve_resume_path(tmp_path, None) is None
    with pytest.raises(ValueError, match="is not a checkpoint folder"):
        resolve_resume_path(tmp_path, str(tmp_path / "checkpoint-2"))
    with torch.no_grad():
        model.weight.add_(1.0)
    before = model.weight.detach().clone()
    accelerator.load_state(str(tmp_path / "checkpoint-6"))
    assert not torch.equal(model.weight, before)


def test_latest_skips_damaged_checkpoints_and_names_them(tmp_path, caplog):
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2), torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()))
    for step in (2, 4, 6):
        save_checkpoint(accelerator, tmp_path, step)
    (tmp_path / ".checkpoint-8.tmp").mkdir()  # left by a killed save: removed by the next one
    save_checkpoint(accelerator, tmp_path, 10)
    assert not (tmp_path / ".checkpoint-8.tmp").exists()
    assert all((p / MANIFEST).is_file() for p in list_checkpoints(tmp_path))

    weights = tmp_path / "checkpoint-10" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated
    (tmp_path / "checkpoint-6" / "optimizer.bin").unlink()  # missing
    random_state = next((tmp_path / "checkpoint-4").glob("random_states_*.pkl"))
    data = bytearray(random_state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, altered
    random_state.write_bytes(bytes(data))

    assert "model.safetensors has" in checkpoint_problem(tmp_path / "checkpoint-10")
    assert checkpoint_problem(tmp_path / "checkpoint-6") == "optimizer.bin is missing"
    assert "SHA-256 differs" in checkpoint_problem(tmp_path / "checkpoint-4")
    with caplog.at_level("WARNING"):
        assert resolve_resume_path(tmp_path, "latest").name == "checkpoint-2"
    skipped = [r.getMessage() for r in caplog.records if "Skipping damaged checkpoint" in r.getMessage()]
    assert [m.split(":")[0].rsplit("/", 1)[-1] for m in skipped] == ["checkpoint-10", "checkpoint-6", "checkpoint-4"]

    with pytest.raises(ValueError, match="checkpoint-10 is damaged: model.safetensors has"):
        resolve_resume_path(tmp_path, str(tmp_path / "checkpoint-10"))
    (tmp_path / "checkpoint-2" / MANIFEST).unlink()  # a checkpoint from before manifests: its files are read
    assert checkpoint_problem(tmp_path / "checkpoint-2") is None
    legacy = tmp_path / "checkpoint-2" / "model.safetensors"
    legacy.write_bytes(legacy.read_bytes()[:-10])
    assert "model.safetensors cannot be read" in checkpoint_problem(tmp_path / "checkpoint-2")
    with pytest.raises(ValueError, match="Every checkpoint in .* is damaged"):
        resolve_resume_path(tmp_path, "latest")


def test_rotation_never_removes_the_checkpoint_just_written(tmp_path):
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))
    for step in (500, 1000):
        save_checkpoint(accelerator, tmp_path, step, total_limit=2)
    weights = tmp_path / "checkpoint-1000" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # damaged: `latest` resumes from 500 ...
    assert resolve_resume_path(tmp_path, "latest").name == "checkpoint-500"
    save_checkpoint(accelerator, tmp_path, 600, total_limit=1)  # ... and the resumed run saves at 600
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-600", "checkpoint-1000"]
    assert resolve_resume_path(tmp_path, "latest").name == "checkpoint-600"
    save_checkpoint(accelerator, tmp_path, 1000, total_limit=1)  # reaching 1000 again replaces the damaged one
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1000"]
    assert checkpoint_problem(tmp_path / "checkpoint-1000") is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_requested_cpu_processes_are_read_from_the_accelerate_command_line():
    from diffusers_var.training.launch import requested_cpu_processes

    launch = ["/venv/bin/python", "/venv/bin/accelerate", "launch"]
    assert requested_cpu_processes([*launch, "--num_processes", "2", "--cpu", "train.py", "--x", "1"]) == 2
    assert requested_cpu_processes([*launch, "--cpu", "--num_processes=3", "train.py"]) == 3
    assert (
        requested_cpu_processes(["python", "-m", "accelerate.commands.launch", "--num-processes", "2", "--cpu", "t.py"])
        == 2
    )
    assert requested_cpu_processes([*launch, "--num_processes", "2", "train.py"]) == 1  # GPUs: accelerate's job
    module_launch = ["python", "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"]
    assert requested_cpu_processes([*module_launch, "-m", "diffusers_var.generate", "--num_processes", "5"]) == 2
    assert requested_cpu_processes([*launch, "--cpu", "train.py", "--num_processes", "4"]) == 1  # script's own arg
    assert requested_cpu_processes(["python", "train.py", "--cpu", "--num_processes", "2"]) == 1
