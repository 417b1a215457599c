"""examples/train_var.py end to end, on a tiny pipeline and a tiny image folder built here.

Each run is a real subprocess (``python examples/train_var.py`` or ``accelerate launch``), as a user runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import launcher_without_upload, load_script, tiny_pipeline
from safetensors.torch import load_file
from test_training_data import make_imagefolder

from diffusers_var import VARPipeline

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_var.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_var")
    tiny_pipeline().save_pretrained(root / "pipe")
    make_imagefolder(root / "data", classes=("a", "b", "c"), per_class=4, size=(10, 8))
    return root


def run(workspace, output: str, *extra: str, launcher: list[str] | None = None, check: bool = True):
    args = [
        "--train_data_dir",
        str(workspace / "data"),
        "--output_dir",
        str(workspace / output),
        "--report_to",
        "none",
        "--no_scale_lr",
        "--learning_rate",
        "1e-3",
        "--validation_steps",
        "0",
        *extra,
    ]
    if not any(a.startswith("--pretrained_model_name_or_path") or a == "--model_config" for a in extra):
        args = ["--pretrained_model_name_or_path", str(workspace / "pipe"), *args]
    command = [*(launcher or [sys.executable]), str(SCRIPT), *args]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "transformer" / "model.safetensors")


def max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item() for k in a)


def test_finetune_writes_a_pipeline_checkpoints_and_logs(workspace):
    run(
        workspace,
        "finetune",
        "--train_batch_size",
        "4",
        "--max_train_steps",
        "3",
        "--checkpointing_steps",
        "2",
        "--validation_steps",
        "2",
        "--report_to",
        "tensorboard",
        "--random_flip",
        "--use_ema",
        "--ema_decay",
        "0.9",
    )
    out = workspace / "finetune"
    pipe = VARPipeline.from_pretrained(out)
    assert (out / "checkpoint-2").is_dir() and "base model" in (out / "README.md").read_text()
    assert max_relative_difference(weights(out), weights(workspace / "pipe")) > 1e-4, "training changed nothing"
    assert pipe(class_labels=[0], output_type="pt").images.shape == (1, 3, 8, 8)
    # the data's classes (folders a, b, c) rename ids 0-2; the base model's other classes keep their names
    assert pipe.config.id2label == {0: "a", 1: "b", 2: "c", **{i: f"digit {i}, number {i}" for i in range(3, 10)}}
    assert pipe.get_label_ids(["b", "digit 5"]) == [1, 5] and "digit 1" not in pipe.labels

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "train_var"), size_guidance={"images": 0}).Reload()
    scalars = events.Tags()["scalars"]
    for tag in (
        "train/loss",
        "train/mean_loss",
        "train/last_scale_loss",
        "train/accuracy",
        "train/last_scale_accuracy",
        "lr",
    ):
        assert tag in scalars, tag
    assert len(events.Scalars("train/loss")) == 3
    assert "validation" in events.Tags()["images"]


def test_finetune_with_a_new_class_count(workspace):
    run(workspace, "resized", "--train_batch_size", "4", "--max_train_steps", "2", "--num_classes", "3")
    pipe = VARPipeline.from_pretrained(workspace / "resized")
    assert pipe.transformer.config.num_classes == 3
    assert pipe.config.id2label == {0: "a", 1: "b", 2: "c"} and pipe.get_label_ids("b") == [1]
    assert pipe.transformer.class_embedding.weight.shape[0] == 4  # three classes and the null class


def test_train_from_scratch(workspace):
    config = workspace / "var_config.json"
    config.write_text(
        json.dumps(
            dict(
                num_classes=3,
                vocab_size=32,
                latent_channels=8,
                patch_nums=[1, 2, 4],
                depth=1,
                embed_dim=32,
                num_heads=2,
            )
        )
    )
    run(
        workspace,
        "scratch",
        "--model_config",
        str(config),
        "--vqvae_name_or_path",
        str(workspace / "pipe"),
        "--train_batch_size",
        "4",
        "--max_train_steps",
        "2",
    )
    pipe = VARPipeline.from_pretrained(workspace / "scratch")
    assert pipe.transformer.config.depth == 1 and pipe.transformer.config.num_classes == 3


def test_resume_is_exact(workspace):
    common = [
        "--train_batch_size",
        "2",
        "--checkpointing_steps",
        "3",
        "--random_flip",
        "--use_ema",
        "--class_dropout_prob",
        "0.3",
        "--lr_warmup_steps",
        "2",
    ]
    run(workspace, "straight", *common, "--max_train_steps", "6")
    run(workspace, "resumed", *common, "--max_train_steps", "3")
    assert not (workspace / "resumed" / "checkpoint-6").exists()
    run(workspace, "resumed", *common, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    difference = max_relative_difference(weights(workspace / "resumed"), weights(workspace / "straight"))
    assert difference <= 1e-6, f"resumed run differs by {difference:.2e}"


def test_two_processes_equal_one(workspace):
    common = ["--max_train_steps", "3", "--class_dropout_prob", "0", "--random_flip", "--checkpointing_steps", "100"]
    run(workspace, "one", *common, "--train_batch_size", "4")
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--cpu",
        "--mixed_precision",
        "no",
    ]
    # `latest` with no checkpoint yet: the main process looks, and tells the other there is none
    run(workspace, "two", *common, "--train_batch_size", "2", "--resume_from_checkpoint", "latest", launcher=launcher)
    difference = max_relative_difference(weights(workspace / "two"), weights(workspace / "one"))
    assert difference <= 1e-4, f"2 processes differ from 1 by {difference:.2e}"
    assert max_relative_difference(weights(workspace / "one"), weights(workspace / "pipe")) > 1e-3


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num_classes", "2"], r"4 label\(s\) outside \[0, 2\)"),
        (["--image_column", "img"], "--image_column 'img' is not a column"),
        (["--resolution", "16"], "--resolution 16 does not match the tokenizer's 8 px"),
    ],
)
def test_bad_data_stops_before_step_one(workspace, extra, message):
    result = run(workspace, "bad", "--max_train_steps", "1", *extra, check=False)
    assert result.returncode != 0 and message.replace("\\", "") in result.stderr.replace("\\", "")
    assert not (workspace / "bad" / "model_index.json").exists()


def test_push_to_hub_sends_the_pipeline_and_card(workspace, tmp_path):
    uploaded = tmp_path / "uploaded"
    launcher = launcher_without_upload(SCRIPT, uploaded)
    run(
        workspace,
        "pushed",
        "--max_train_steps",
        "1",
        "--train_batch_size",
        "4",
        "--push_to_hub",
        "--hub_model_id",
        "me/tiny-var",
        launcher=launcher,
    )
    files = sorted(str(p.relative_to(uploaded)) for p in uploaded.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "transformer/config.json",
        "transformer/model.safetensors",
        "vqvae/config.json",
        "vqvae/diffusion_pytorch_model.safetensors",
    ]
    card = (uploaded / "README.md").read_text()
    assert "me/tiny-var" in card and "training data" in card and "library_name: diffusers" in card


def test_bf16_mixed_precision(workspace):
    run(workspace, "bf16", "--train_batch_size", "4", "--max_train_steps", "2", "--mixed_precision", "bf16")
    trained, start = weights(workspace / "bf16"), weights(workspace / "pipe")
    assert all(torch.isfinite(t).all() and t.dtype == torch.float32 for t in trained.values())
    assert max_relative_difference(trained, start) > 1e-4


def emulate_kill_after(workspace, straight: str, killed: str, step: int) -> None:
    """The state a run killed after checkpoint ``step`` leaves behind: that checkpoint (and earlier ones), no later
    checkpoint and no final pipeline. Made from a straight run with the same flags, so nothing else differs."""
    source, target = workspace / straight, workspace / killed
    target.mkdir()
    for checkpoint in source.glob("checkpoint-*"):
        if int(checkpoint.name.split("-")[1]) <= step:
            shutil.copytree(checkpoint, target / checkpoint.name)


def test_resume_at_an_epoch_boundary_with_accumulation_and_ema_is_exact(workspace):
    # 12 images, batch 2, accumulation 2: 3 optimiser steps per epoch, so checkpoints 3 and 6 end epochs 0 and 1.
    # The run is killed after checkpoint-6, which is then damaged: `latest` must step back to checkpoint-3.
    common = [
        "--train_batch_size", "2", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "3",
        "--random_flip", "--use_ema", "--ema_decay", "0.9", "--class_dropout_prob", "0.3", "--lr_scheduler", "cosine",
        "--max_train_steps", "7",
    ]  # fmt: skip
    run(workspace, "boundary-straight", *common)
    emulate_kill_after(workspace, "boundary-straight", "boundary-killed", 6)
    damaged = workspace / "boundary-killed" / "checkpoint-6" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-64])

    result = run(workspace, "boundary-killed", *common, "--resume_from_checkpoint", "latest")
    assert "Skipping damaged checkpoint" in result.stderr and "checkpoint-6" in result.stderr
    assert "Resumed from" in result.stderr and "checkpoint-3" in result.stderr
    difference = max_relative_difference(
        weights(workspace / "boundary-killed"), weights(workspace / "boundary-straight")
    )
    assert difference <= 1e-6, f"resumed run differs by {difference:.2e}"


def test_lora_trains_only_the_adapter_resumes_exactly_and_loads_on_the_base(workspace):
    common = [
        "--train_batch_size", "2", "--checkpointing_steps", "2", "--lora_rank", "4", "--use_ema", "--ema_decay", "0.9",
        "--class_dropout_prob", "0.3", "--gradient_checkpointing", "--max_train_steps", "4", "--learning_rate", "5e-2",
    ]  # fmt: skip
    result = run(workspace, "lora-straight", *common)
    assert "LoRA rank 4: training" in result.stderr
    out = workspace / "lora-straight"
    assert (out / "adapter_model.safetensors").is_file() and not (out / "transformer").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(workspace / "pipe") and config["r"] == 4
    assert "pipe.load_lora_weights" in (out / "README.md").read_text()

    emulate_kill_after(workspace, "lora-straight", "lora-killed", 2)
    run(workspace, "lora-killed", *common, "--resume_from_checkpoint", "latest")
    a = load_file(out / "adapter_model.safetensors")
    b = load_file(workspace / "lora-killed" / "adapter_model.safetensors")
    assert max_relative_difference(b, a) <= 1e-6

    base = VARPipeline.from_pretrained(workspace / "pipe")
    pipe = VARPipeline.from_pretrained(workspace / "pipe")
    pipe.load_lora_weights(out)
    kwargs = dict(class_labels=[0, 1, 2], top_k=4, output_type="latent")
    before = base(generator=torch.Generator().manual_seed(0), **kwargs).token_maps
    after = pipe(generator=torch.Generator().manual_seed(0), **kwargs).token_maps
    assert not all(torch.equal(x, y) for x, y in zip(before, after)), "the trained adapter changes no sample"
    # the base weights were frozen: unloading the adapter gives the base model's samples back
    pipe.unload_lora_weights()
    again = pipe(generator=torch.Generator().manual_seed(0), **kwargs).token_maps
    assert all(torch.equal(x, y) for x, y in zip(before, again))


def test_lora_flags_are_checked(capsys):
    # (unknown --lora_target_modules: the library's error, tests/test_lora.py)
    module = load_script(SCRIPT, "train_var_script")
    with pytest.raises(SystemExit):  # refused when the arguments are read
        module.parse_args(["--pretrained_model_name_or_path", "pipe", "--lora_rank", "4", "--num_classes", "5"])
    assert "--num_classes with --lora_rank" in capsys.readouterr().err
