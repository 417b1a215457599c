"""The Hub side: repo ids from the HF cache offline, atomic saving, push_to_hub and model cards. No network."""

from __future__ import annotations

import os
import shutil
import socket
import stat
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
import yaml
from conftest import tiny_pipeline, tiny_vqvae
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError

from diffusers_var import VARPipeline, VARTransformer
from diffusers_var.hub import make_model_card, save_pretrained_into

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Belt and braces over HF_HUB_OFFLINE: any attempt to open an internet connection fails the test."""

    def refuse(self, address, *args):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"a test tried to connect to {address}")
        return original_connect(self, address, *args)

    original_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def sample(pipe: VARPipeline) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe([2, 5], guidance_scale=2.5, top_k=8, generator=generator, output_type="pt").images


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def make_hf_cache(hub_cache: Path, repo_id: str, saved: Path) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<sha>/...}."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    shutil.copytree(saved, repo / "snapshots" / SHA)
    return repo / "snapshots" / SHA


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An empty HF_HOME for this test, in the environment (read by new processes and anything reading it lazily)."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


# -- 3. loading by repo id from the HF cache, offline ----------------------------------------------------------------


def test_repo_id_from_cache_dir_offline(tmp_path, hf_home):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "saved")
    snapshot = make_hf_cache(hf_home / "hub", "org/name", tmp_path / "saved")

    reloaded = VARPipeline.from_pretrained("org/name", cache_dir=hf_home / "hub")
    reloaded.set_progress_bar_config(disable=True)

    assert reloaded.config._name_or_path == "org/name"
    assert Path(reloaded.transformer.config._name_or_path).resolve() == (snapshot / "transformer").resolve()
    assert torch.equal(reloaded.transformer.head.weight, pipe.transformer.head.weight)
    assert torch.equal(sample(reloaded), sample(pipe))


def test_repo_id_from_default_cache_offline(tmp_path, hf_home, monkeypatch):
    # huggingface_hub reads HF_HOME / HF_HUB_CACHE once at import, so the environment alone is not enough here
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "saved")
    make_hf_cache(hf_home / "hub", "org/name", tmp_path / "saved")

    reloaded = VARPipeline.from_pretrained("org/name")
    reloaded.set_progress_bar_config(disable=True)

    assert reloaded.config.id2label == pipe.config.id2label
    images = sample(reloaded)
    assert images.shape == (2, 3, 8, 8)
    assert torch.equal(images, sample(pipe))


def test_missing_repo_id_offline_names_the_repo(tmp_path, hf_home):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "saved")
    make_hf_cache(hf_home / "hub", "org/name", tmp_path / "saved")

    with pytest.raises(LocalEntryNotFoundError, match="'org/missing'"):
        VARPipeline.from_pretrained("org/missing", cache_dir=hf_home / "hub")
    # a revision the cache does not hold is just as missing
    with pytest.raises(LocalEntryNotFoundError, match=r"'org/name' \(revision v2\)"):
        VARPipeline.from_pretrained("org/name", cache_dir=hf_home / "hub", revision="v2")


# -- 6. atomic saving ------------------------------------------------------------------------------------------------


def failing_transformer_save(pipe: VARPipeline, monkeypatch) -> list[str]:
    """Make the transformer's save fail, after checking the vqvae is already written next to it."""
    seen = []

    def fail(save_directory, *args, **kwargs):
        written = Path(save_directory).parent / "vqvae" / "diffusion_pytorch_model.safetensors"
        assert written.is_file(), "the vqvae should be saved before the transformer"
        seen.append(str(Path(save_directory).parent))
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(pipe.transformer, "save_pretrained", fail)
    return seen


def test_failed_save_leaves_no_folder_and_no_temporary(tmp_path, monkeypatch):
    parent = tmp_path / "out"
    parent.mkdir()
    pipe = tiny_pipeline()
    seen = failing_transformer_save(pipe, monkeypatch)

    with pytest.raises(OSError, match="disk full"):
        pipe.save_pretrained(parent / "pipe")

    assert len(seen) == 1 and Path(seen[0]) != parent / "pipe"  # it was writing elsewhere
    assert not (parent / "pipe").exists()
    assert os.listdir(parent) == []


def test_failed_save_keeps_the_old_folder(tmp_path, monkeypatch):
    parent = tmp_path / "out"
    old = tiny_pipeline()
    old.save_pretrained(parent / "pipe")
    before = {name: (parent / "pipe" / name).read_bytes() for name in files_under(parent / "pipe")}

    new = tiny_pipeline(seed=1)
    failing_transformer_save(new, monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        new.save_pretrained(parent / "pipe")

    assert os.listdir(parent) == ["pipe"]
    assert {name: (parent / "pipe" / name).read_bytes() for name in files_under(parent / "pipe")} == before


def test_save_over_existing_folder_replaces_it(tmp_path):
    parent = tmp_path / "out"
    target = parent / "pipe"
    tiny_pipeline().save_pretrained(target)
    (target / "stale.txt").write_text("from an older save")
    (target / "transformer" / "pytorch_model.bin").write_bytes(b"old weights")

    new = tiny_pipeline(seed=1, id2label={0: "zero"})
    new.save_pretrained(target)

    assert os.listdir(parent) == ["pipe"]
    assert files_under(target) == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "transformer/config.json",
        "transformer/model.safetensors",
        "vqvae/config.json",
        "vqvae/diffusion_pytorch_model.safetensors",
    ]
    mode = stat.S_IMODE(target.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask  # not mkdtemp's private 0o700
    reloaded = VARPipeline.from_pretrained(target)
    assert reloaded.config.id2label == {0: "zero"}
    assert torch.equal(reloaded.transformer.head.weight, new.transformer.head.weight)


def test_save_pretrained_refuses_push_to_hub(tmp_path):
    with pytest.raises(ValueError, match="push_to_hub"):
        tiny_pipeline().save_pretrained(tmp_path / "pipe", push_to_hub=True)
    assert not (tmp_path / "pipe").exists()


# -- 7. push_to_hub --------------------------------------------------------------------------------------------------


def test_push_to_hub_uploads_safetensors_and_a_model_card(tmp_path, monkeypatch):
    calls = {}
    uploaded = tmp_path / "uploaded"

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
        calls["create_repo"] = dict(repo_id=repo_id, private=private, exist_ok=exist_ok)
        return SimpleNamespace(repo_id=f"me/{repo_id}")  # the Hub fills in the namespace

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, create_pr=None, **kwargs):
        calls["upload_folder"] = dict(
            repo_id=repo_id, folder_path=folder_path, commit_message=commit_message, create_pr=create_pr
        )
        shutil.copytree(folder_path, uploaded)  # the folder is temporary: copy it while it exists
        return "https://huggingface.co/me/tiny-var/commit/abc"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)

    pipe = tiny_pipeline()
    result = pipe.push_to_hub("tiny-var", private=True, commit_message="first")

    assert result == "https://huggingface.co/me/tiny-var/commit/abc"
    assert calls["create_repo"] == dict(repo_id="tiny-var", private=True, exist_ok=True)
    assert calls["upload_folder"]["repo_id"] == "me/tiny-var"
    assert calls["upload_folder"]["commit_message"] == "first"
    assert calls["upload_folder"]["create_pr"] is False
    assert not Path(calls["upload_folder"]["folder_path"]).exists()  # the temporary folder was cleaned up

    files = files_under(uploaded)
    assert files == [
        "README.md",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "transformer/config.json",
        "transformer/model.safetensors",
        "vqvae/config.json",
        "vqvae/diffusion_pytorch_model.safetensors",
    ]
    assert not [f for f in files if f.endswith((".bin", ".pth", ".ckpt"))]

    card = (uploaded / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n")
    front_matter, body = card[4:].split("\n---\n", 1)
    metadata = yaml.safe_load(front_matter)
    assert metadata["library_name"] == "diffusers"
    assert "diffusers-var" in metadata["tags"]
    assert 'VARPipeline.from_pretrained("me/tiny-var")' in body
    num_parameters = sum(p.numel() for p in pipe.transformer.parameters())
    assert f"depth 2, width 32, {num_parameters:,} parameters" in body
    assert "{" not in body.split("```python")[0]  # every field of the template was filled

    # what was uploaded is a loadable pipeline
    reloaded = VARPipeline.from_pretrained(uploaded)
    assert isinstance(reloaded.transformer, VARTransformer)
    assert torch.equal(reloaded.transformer.head.weight, pipe.transformer.head.weight)


# -- 8. model cards --------------------------------------------------------------------------------------------------


def test_make_model_card_unknown_template_lists_the_available_ones():
    available = r"available: \['var', 'var-digits', 'var-trained', 'vqvae-trained'\]"
    with pytest.raises(ValueError, match=r"'no-such-card'.*" + available):
        make_model_card(tiny_pipeline(), template="no-such-card")


def test_make_model_card_fills_the_template():
    card = make_model_card(tiny_pipeline(), card_data={"repo_id": "org/name", "license": "apache-2.0"})
    assert card.data.library_name == "diffusers"
    assert card.data.license == "apache-2.0"
    assert 'from_pretrained("org/name")' in card.text
    assert "scales (1, 2, 4)" in card.text and "8 px" in card.text


def test_saved_files_get_normal_permissions(tmp_path):
    # diffusers writes its safetensors private (0600); a saved pipeline should read like any other new file
    umask = os.umask(0o022)
    try:
        tiny_pipeline().save_pretrained(tmp_path / "pipe")
        save_pretrained_into(tiny_vqvae(), tmp_path / "run")
    finally:
        os.umask(umask)
    for path in [*(tmp_path / "pipe").rglob("*"), *(tmp_path / "run").rglob("*")]:
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path


def test_load_vqvae_from_a_pipeline_repo_id_or_a_tokenizer_folder_offline(tmp_path, hf_home):
    from diffusers_var.hub import load_vqvae

    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "saved")
    make_hf_cache(hf_home / "hub", "org/pipe", tmp_path / "saved")
    from_repo = load_vqvae("org/pipe", cache_dir=hf_home / "hub")  # a pipeline repo: its vqvae/
    from_folder = load_vqvae(tmp_path / "saved" / "vqvae")
    for vqvae in (from_repo, from_folder):
        assert torch.equal(vqvae.quantizer.embedding.weight, pipe.vqvae.quantizer.embedding.weight)
    with pytest.raises(ValueError, match="neither a MultiScaleVQVAE"):
        load_vqvae(tmp_path / "saved" / "scheduler")
