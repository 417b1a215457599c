"""Shared test helpers: tiny components, and where the official reference fixtures live."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Loading must never reach for the network in tests (and without it, failed look-ups retry for ~20 s).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from diffusers_var import MultiScaleVQVAE, VARConfig, VARPipeline, VARScaleScheduler, VARTransformer  # noqa: E402

FIXTURES_ENV = "VAR_REFERENCE_FIXTURES"
FIXTURES_DEFAULT = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "var_reference"

TINY_PATCH_NUMS = (1, 2, 4)


def load_script(path: Path, name: str):
    """A script (examples/, benchmarks/) imported as a module, to call its parser or functions in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_fixtures_dir() -> Path:
    """The official-code fixtures: $VAR_REFERENCE_FIXTURES, or ../shared/fixtures/var_reference beside the repo."""
    return Path(os.environ.get(FIXTURES_ENV, FIXTURES_DEFAULT)).resolve()


def tiny_vqvae(patch_nums=TINY_PATCH_NUMS, share_quant_resi: int = 4, seed: int = 0, **kwargs) -> MultiScaleVQVAE:
    torch.manual_seed(seed)
    config = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_num_groups=8, z_channels=8, vocab_size=32)
    config.update(kwargs)
    return MultiScaleVQVAE(patch_nums=patch_nums, share_quant_resi=share_quant_resi, **config).eval()


def tiny_transformer(patch_nums=TINY_PATCH_NUMS, seed: int = 0, **kwargs) -> VARTransformer:
    torch.manual_seed(seed)
    config = dict(num_classes=10, vocab_size=32, latent_channels=8, depth=2, embed_dim=32, num_heads=2)
    config.update(kwargs)
    model = VARTransformer(VARConfig(patch_nums=patch_nums, **config)).eval()
    # init gives near-zero AdaLN gates; perturb so tests see class- and position-dependent logits
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def tiny_pipeline(patch_nums=TINY_PATCH_NUMS, id2label=None, **transformer_kwargs) -> VARPipeline:
    pipe = VARPipeline(
        vqvae=tiny_vqvae(patch_nums),
        transformer=tiny_transformer(patch_nums, **transformer_kwargs),
        scheduler=VARScaleScheduler(patch_nums=patch_nums),
        id2label=id2label if id2label is not None else {i: f"digit {i}, number {i}" for i in range(10)},
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_images(batch: int = 2, size: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


@pytest.fixture
def pipe() -> VARPipeline:
    return tiny_pipeline()


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """Every test starts from the same global RNG state, so results never depend on test order."""
    torch.manual_seed(0)


def launcher_without_upload(script, uploaded) -> list[str]:
    """A command prefix that runs a training script with the Hub intercepted: the folder it would upload is copied
    to ``uploaded`` and nothing leaves the machine."""
    wrapper = f"""
import shutil, sys, runpy, huggingface_hub
from huggingface_hub import RepoUrl
huggingface_hub.HfApi.create_repo = lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/{{repo_id}}")
def upload_folder(self, repo_id, folder_path, **kw):
    shutil.copytree(folder_path, {str(uploaded)!r})
    return f"https://huggingface.co/{{repo_id}}/commit/0"
huggingface_hub.HfApi.upload_folder = upload_folder
sys.argv = sys.argv[1:]  # drop "-c": the script path comes first
runpy.run_path({str(script)!r}, run_name="__main__")
"""
    return [sys.executable, "-c", wrapper]
