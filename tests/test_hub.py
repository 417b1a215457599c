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


def test_save_over_an_earlier_save_replaces_only_its_files(tmp_path):
    target = tmp_path / "pipe"
    tiny_pipeline().save_pretrained(target)
    # a cloned Hub repo: a card, git attributes and history beside the save, and stale weights of an older format
    (target / "README.md").write_text("my card")
    (target / ".gitattributes").write_text("*.safetensors filter=lfs")
    (target / ".git").mkdir()
    (target / ".git" / "HEAD").write_text("ref: refs/heads/main")
    (target / "transformer" / "pytorch_model.bin").write_bytes(b"old weights")
    os.chmod(target, 0o750)

    new = tiny_pipeline(seed=1, id2label={0: "zero"})
    new.save_pretrained(target)

    assert os.listdir(tmp_path) == ["pipe"]
    assert files_under(target) == [
        ".git/HEAD",
        ".gitattributes",
        "README.md",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "transformer/config.json",
        "transformer/model.safetensors",
        "vqvae/config.json",
        "vqvae/diffusion_pytorch_model.safetensors",
    ]
    assert (target / "README.md").read_text() == "my card"
    assert stat.S_IMODE(target.stat().st_mode) == 0o750  # the user's folder itself is left as it was
    reloaded = VARPipeline.from_pretrained(target)
    assert reloaded.config.id2label == {0: "zero"}
    assert torch.equal(reloaded.transformer.head.weight, new.transformer.head.weight)


def test_a_new_folder_gets_normal_permissions(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path / "pipe")
    mode = stat.S_IMODE((tmp_path / "pipe").stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask  # not mkdtemp's private 0o700


def user_files(folder: Path) -> dict[str, bytes]:
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "vqvae").mkdir(exist_ok=True)
    files = {"notes.txt": b"my notes", "data/x.csv": b"1,2", "vqvae/notes.md": b"about the tokenizer"}
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return files


def test_save_refuses_a_folder_with_user_files_and_overwrite_keeps_them(tmp_path):
    target = tmp_path / "mine"
    files = user_files(target)
    pipe = tiny_pipeline()

    with pytest.raises(ValueError, match=r"mine already holds files that are not a VARPipeline save: data/, notes.txt, "
                       r"vqvae/\. .*overwrite=True"):  # fmt: skip
        pipe.save_pretrained(target)
    assert files_under(target) == sorted(files)  # nothing written, nothing left behind

    pipe.save_pretrained(target, overwrite=True)
    for name, content in files.items():
        assert (target / name).read_bytes() == content, name
    assert (target / "model_index.json").is_file() and not [p for p in target.iterdir() if p.name.startswith(".")]
    assert torch.equal(VARPipeline.from_pretrained(target).transformer.head.weight, pipe.transformer.head.weight)
    # and again: still an earlier save beside the user's files, so overwrite is still needed and still keeps them
    with pytest.raises(ValueError, match="not a VARPipeline save: data/, notes.txt, vqvae/notes.md"):
        pipe.save_pretrained(target)
    pipe.save_pretrained(target, overwrite=True)
    assert all((target / name).read_bytes() == content for name, content in files.items())


def test_save_refuses_a_file_and_someone_elses_pipeline(tmp_path):
    (tmp_path / "file").write_text("precious")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        tiny_pipeline().save_pretrained(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "precious"

    other = tmp_path / "other"  # a diffusers pipeline of another library: not ours to replace
    (other / "unet").mkdir(parents=True)
    (other / "unet" / "config.json").write_text("{}")
    (other / "model_index.json").write_text('{"_class_name": "X", "unet": ["diffusers", "UNet2DModel"]}')
    with pytest.raises(ValueError, match="model_index.json, unet/"):
        tiny_pipeline().save_pretrained(other)


def test_variant_saves_keep_other_weights_and_weights_we_did_not_write(tmp_path):
    target = tmp_path / "pipe"
    pipe = tiny_pipeline()
    pipe.save_pretrained(target)
    pipe.save_pretrained(target, variant="ema")
    names = files_under(target)
    assert "transformer/model.safetensors" in names and "transformer/model.ema.safetensors" in names
    assert "vqvae/diffusion_pytorch_model.safetensors" in names
    assert "vqvae/diffusion_pytorch_model.ema.safetensors" in names
    pipe.save_pretrained(target)  # as diffusers and transformers do: a plain save leaves the other variants
    assert "transformer/model.ema.safetensors" in files_under(target)

    # weight-looking files that no library writes are a user's: refused without overwrite, kept with it
    (target / "transformer" / "ema_backup.safetensors").write_bytes(b"mine")
    (target / "training_args.bin").write_bytes(b"mine too")
    with pytest.raises(ValueError, match="training_args.bin, transformer/ema_backup.safetensors"):
        pipe.save_pretrained(target)
    pipe.save_pretrained(target, overwrite=True)
    assert (target / "transformer" / "ema_backup.safetensors").read_bytes() == b"mine"
    assert (target / "training_args.bin").read_bytes() == b"mine too"


def test_a_sharded_save_replaces_the_single_file_it_supersedes(tmp_path):
    target = tmp_path / "pipe"
    pipe = tiny_pipeline()
    pipe.save_pretrained(target)
    pipe.save_pretrained(target, max_shard_size="20KB")  # the transformer now comes in shards with an index
    names = files_under(target)
    assert "transformer/model.safetensors.index.json" in names and "transformer/model.safetensors" not in names
    reloaded = VARPipeline.from_pretrained(target)
    assert torch.equal(reloaded.transformer.head.weight, pipe.transformer.head.weight)


def test_a_failed_install_puts_the_entry_point_back(tmp_path, monkeypatch):
    target = tmp_path / "pipe"
    tiny_pipeline().save_pretrained(target)
    import diffusers_var.saving as saving

    original = saving._replace_files

    def fail_midway(*args, **kwargs):
        raise OSError("no space left on device (simulated)")

    monkeypatch.setattr(saving, "_replace_files", fail_midway)
    with pytest.raises(OSError, match="no space left"):
        tiny_pipeline(seed=1).save_pretrained(target)
    monkeypatch.setattr(saving, "_replace_files", original)
    assert (target / "model_index.json").is_file()  # still recognised as an earlier save of ours
    tiny_pipeline(seed=1).save_pretrained(target)


def test_staging_folders_of_killed_saves_are_removed_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    parent = tmp_path / "out"
    parent.mkdir()
    # a save killed mid-write: its process ended, so its marker is no longer locked
    killed = (
        "import os, sys; from pathlib import Path; from diffusers_var.saving import staging_folder\n"
        f"with staging_folder(Path({str(parent)!r}), '.pipe.tmp-') as s:\n"
        "    (s / 'vqvae').mkdir(); (s / 'vqvae' / 'config.json').write_text('{}'); os._exit(9)"
    )
    assert subprocess.run([sys.executable, "-c", killed]).returncode == 9
    [stale] = parent.glob(".pipe.tmp-*")
    unmarked = parent / ".pipe.tmp-backup"  # named like ours but unmarked (a user's, or an older version's): kept
    (unmarked / "vqvae").mkdir(parents=True)
    (unmarked / "vqvae" / "config.json").write_text("{}")

    from diffusers_var.saving import staging_folder

    with staging_folder(parent, ".pipe.tmp-") as live:  # a save still running: kept
        tiny_pipeline().save_pretrained(parent / "pipe")
        assert live.is_dir()
    assert not stale.exists()
    assert (unmarked / "vqvae" / "config.json").is_file()
    assert sorted(p.name for p in parent.iterdir()) == [".pipe.tmp-backup", "pipe"]


def test_training_folder_keeps_checkpoints_logs_and_a_foreign_readme(tmp_path, caplog):
    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoint-2" / "model.safetensors").write_bytes(b"checkpoint")
    (run / "logs").mkdir()
    (run / "README.md").write_text("the user's own notes")
    pipe = tiny_pipeline()
    save_pretrained_into(pipe, run, make_model_card(pipe))
    save_pretrained_into(pipe, run, make_model_card(pipe))  # a resumed run saves again
    assert (run / "checkpoint-2" / "model.safetensors").read_bytes() == b"checkpoint" and (run / "logs").is_dir()
    assert (run / "README.md").read_text() == "the user's own notes"
    assert "Not writing the model card" in caplog.text
    assert VARPipeline.from_pretrained(run).transformer.config.depth == 2

    fresh = tmp_path / "fresh"
    save_pretrained_into(pipe, fresh, make_model_card(pipe))
    save_pretrained_into(pipe, fresh, make_model_card(pipe, card_data={"model_name": "second"}))
    assert "second" in (fresh / "README.md").read_text()  # our own card is ours to update


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
    available = r"available: \['digits-classifier', 'var', 'var-digits', 'var-lora', 'var-trained', 'vqvae-trained'\]"
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
