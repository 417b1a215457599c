"""examples/train_vqvae.py end to end on a tiny tokenizer config and a small image folder of simple shapes.

Each run is a real subprocess, as a user runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import load_script
from safetensors.torch import load_file
from test_tokenizer_training_parts import save_random_lpips, save_tiny_dinov2

from diffusers_var import MultiScaleVQVAE
from diffusers_var.training.data import preprocess_image

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_vqvae.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
CONFIG = dict(
    ch=16, ch_mult=[1, 2], num_res_blocks=1, norm_num_groups=8, z_channels=8, vocab_size=32, patch_nums=[1, 2, 4, 8]
)


def make_shapes_folder(root: Path, count: int = 24, size: int = 16) -> Path:
    """Flat-coloured rectangles on a flat background: images a tokenizer can learn in a few steps."""
    rng = np.random.default_rng(0)
    (root / "shapes").mkdir(parents=True)
    for i in range(count):
        pixels = np.empty((size, size, 3), dtype=np.uint8)
        pixels[:] = rng.integers(0, 256, 3)
        top, left = rng.integers(0, size // 2, 2)
        height, width = rng.integers(3, size // 2 + 1, 2)
        pixels[top : top + height, left : left + width] = rng.integers(0, 256, 3)
        PIL.Image.fromarray(pixels).save(root / "shapes" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_vqvae")
    make_shapes_folder(root / "data")
    (root / "vqvae.json").write_text(json.dumps(CONFIG))
    return root


def run(workspace, output: str, *extra: str, check: bool = True, launcher: list[str] | None = None):
    command = [
        *(launcher or [sys.executable]),
        str(SCRIPT),
        "--train_data_dir",
        str(workspace / "data"),
        "--output_dir",
        str(workspace / output),
        "--report_to",
        "none",
        "--no_scale_lr",
        "--validation_steps",
        "0",
        *extra,
    ]
    if "--pretrained_vqvae_name_or_path" not in extra and "--vqvae_config" not in extra:
        command += ["--vqvae_config", str(workspace / "vqvae.json")]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def training_mse(vqvae: MultiScaleVQVAE, folder: Path) -> float:
    images = torch.stack([preprocess_image(PIL.Image.open(p), 16) for p in sorted(folder.glob("*/*.png"))])
    with torch.no_grad():
        return (vqvae.eval().reconstruct(images) - images).square().mean().item()


def test_thirty_steps_lower_the_reconstruction_mse(workspace):
    run(
        workspace,
        "trained",
        "--max_train_steps",
        "30",
        "--train_batch_size",
        "8",
        "--learning_rate",
        "2e-3",
        "--validation_split_percentage",
        "0",
        "--restart_dead_codes_steps",
        "10",
        "--checkpointing_steps",
        "100",
    )
    torch.manual_seed(0)
    untrained = MultiScaleVQVAE(**CONFIG)
    trained = MultiScaleVQVAE.from_pretrained(workspace / "trained")
    before, after = training_mse(untrained, workspace / "data"), training_mse(trained, workspace / "data")
    assert after < 0.75 * before, (before, after)  # measured: 0.43 → 0.27
    card = (workspace / "trained" / "README.md").read_text()
    assert "L1 reconstruction + 1 × VQ" in card and "no held-out split" in card


def test_resume_is_exact_with_gan_ema_and_restarts(workspace):
    common = [
        "--train_batch_size", "4", "--learning_rate", "1e-3", "--checkpointing_steps", "3", "--use_ema",
        "--ema_decay", "0.9", "--discriminator", "patchgan", "--disc_start_step", "2", "--random_flip",
        "--restart_dead_codes_steps", "2", "--validation_split_percentage", "10",
    ]  # fmt: skip
    run(workspace, "straight", *common, "--max_train_steps", "6")
    run(workspace, "resumed", *common, "--max_train_steps", "3")
    assert (workspace / "resumed" / "checkpoint-3").is_dir()
    run(workspace, "resumed", *common, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    a = load_file(workspace / "straight" / "diffusion_pytorch_model.safetensors")
    b = load_file(workspace / "resumed" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    worst = max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)).item() for k in a)
    assert worst <= 1e-6
    assert "psnr" in (workspace / "straight" / "README.md").read_text()


def test_lpips_dino_and_rfid_from_weights_on_disk(workspace):
    save_random_lpips(workspace / "lpips.pth")
    save_tiny_dinov2(workspace / "dino")
    run(
        workspace,
        "perceptual",
        "--max_train_steps",
        "2",
        "--train_batch_size",
        "4",
        "--lpips_weight",
        "0.5",
        "--lpips_weights",
        str(workspace / "lpips.pth"),
        "--discriminator",
        "dino",
        "--dino_model",
        str(workspace / "dino"),
        "--fid_feature_model",
        str(workspace / "dino"),
        "--validation_split_percentage",
        "25",
    )
    card = (workspace / "perceptual" / "README.md").read_text()
    assert "0.5 × LPIPS" in card and "DinoDiscriminator" in card and "rfid" in card


def test_finetune_from_a_pipeline_folder(workspace):
    from conftest import tiny_pipeline

    tiny_pipeline(patch_nums=(1, 2, 4, 8)).save_pretrained(workspace / "pipe")
    run(
        workspace,
        "finetuned",
        "--pretrained_vqvae_name_or_path",
        str(workspace / "pipe"),
        "--max_train_steps",
        "1",
        "--train_batch_size",
        "4",
    )
    assert MultiScaleVQVAE.from_pretrained(workspace / "finetuned").config.vocab_size == 32


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lpips_weight", "1"], "needs --lpips_weights PATH"),
        (["--discriminator", "dino"], "needs --dino_model PATH"),
    ],
)
def test_missing_weight_paths_are_refused_when_the_arguments_are_read(extra, message, capsys):
    module = load_script(SCRIPT, "train_vqvae_script")
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--pretrained_vqvae_name_or_path", "pipe", "--train_data_dir", "data", *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lpips_weight", "1", "--lpips_weights", "/nonexistent.pth"], "does not exist"),
        (["--resolution", "24"], "does not fit the tokenizer"),
    ],
)
def test_missing_weights_and_bad_settings_are_clear_errors(workspace, extra, message):
    result = run(workspace, "bad", "--max_train_steps", "1", *extra, check=False)
    assert result.returncode != 0 and message in result.stderr
    assert not (workspace / "bad" / "diffusion_pytorch_model.safetensors").exists()


def test_bf16_mixed_precision_with_gradient_checkpointing(workspace):
    precision = ["--mixed_precision", "bf16", "--gradient_checkpointing"]
    run(workspace, "bf16", "--max_train_steps", "2", "--train_batch_size", "4", *precision)
    trained = load_file(workspace / "bf16" / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(t).all() and t.dtype == torch.float32 for t in trained.values())


def test_two_processes_equal_one_with_dead_code_restarts(workspace):
    # the restart reduces usage counts and gathers encoder outputs over processes: both must match one process
    common = ["--max_train_steps", "3", "--learning_rate", "1e-3", "--restart_dead_codes_steps", "2"]
    common += ["--validation_split_percentage", "0", "--checkpointing_steps", "100"]
    run(workspace, "vq-one", *common, "--train_batch_size", "4")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu"]
    run(workspace, "vq-two", *common, "--train_batch_size", "2", launcher=[*launch, "--mixed_precision", "no"])
    a = load_file(workspace / "vq-two" / "diffusion_pytorch_model.safetensors")
    b = load_file(workspace / "vq-one" / "diffusion_pytorch_model.safetensors")
    for weights in (a, b):
        # Attention key biases get an analytically zero gradient (softmax ignores a shift shared by all keys), so
        # Adam turns round-off into ±lr steps there (measured 1.4e-4 with or without restarts): left out.
        for name in [k for k in weights if k.endswith("qkv.bias")]:
            weights[name] = torch.cat([weights[name].chunk(3)[0], weights[name].chunk(3)[2]])
    worst = max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item() for k in a)
    assert worst <= 1e-4, f"2 processes differ from 1 by {worst:.2e}"


def test_push_to_hub_sends_the_tokenizer_and_card(workspace, tmp_path):
    from conftest import launcher_without_upload

    uploaded = tmp_path / "uploaded"
    pushed = ["--push_to_hub", "--hub_model_id", "me/tiny-vqvae", "--validation_split_percentage", "10"]
    run(workspace, "pushed", "--max_train_steps", "1", "--train_batch_size", "4", *pushed,
        launcher=launcher_without_upload(SCRIPT, uploaded))  # fmt: skip
    files = sorted(p.name for p in uploaded.rglob("*") if p.is_file())
    assert files == ["README.md", "config.json", "diffusion_pytorch_model.safetensors"]
    card = (uploaded / "README.md").read_text()
    assert "me/tiny-vqvae" in card and "psnr" in card and "library_name: diffusers" in card
    assert MultiScaleVQVAE.from_pretrained(uploaded).config.vocab_size == 32


def test_resume_at_an_epoch_boundary_with_accumulation_and_ema_is_exact(workspace):
    # 24 images, batch 4, accumulation 2: 3 optimiser steps per epoch, so checkpoint-3 ends epoch 0. Dropout draws
    # from the global RNG, whose state the resumed run must restore at the right moment.
    (workspace / "vqvae_dropout.json").write_text(json.dumps({**CONFIG, "dropout": 0.2}))
    common = [
        "--vqvae_config", str(workspace / "vqvae_dropout.json"),
        "--train_batch_size", "4", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3",
        "--checkpointing_steps", "3", "--use_ema", "--ema_decay", "0.9", "--random_flip", "--lr_scheduler", "cosine",
        "--validation_split_percentage", "0", "--max_train_steps", "5",
    ]  # fmt: skip
    run(workspace, "boundary-straight", *common)
    killed = workspace / "boundary-killed"  # what a run killed after checkpoint-3 leaves: that checkpoint only
    killed.mkdir()
    shutil.copytree(workspace / "boundary-straight" / "checkpoint-3", killed / "checkpoint-3")
    run(workspace, "boundary-killed", *common, "--resume_from_checkpoint", "latest")
    a = load_file(workspace / "boundary-straight" / "diffusion_pytorch_model.safetensors")
    b = load_file(killed / "diffusion_pytorch_model.safetensors")
    worst = max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)).item() for k in a)
    assert worst <= 1e-6, f"resumed run differs by {worst:.2e}"
