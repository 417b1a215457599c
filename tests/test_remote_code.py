"""Sharing without the package: a pipeline saved with ``remote_code=True`` loads and samples the same tokens in an
environment that has diffusers and transformers but not diffusers-var, from a Hub cache, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import tiny_pipeline

from diffusers_var import VARPipeline
from diffusers_var.remote_code import ALLOWED_IMPORTS, REMOTE_FILES, bundle, imported_modules

SHA = "0123456789abcdef0123456789abcdef01234567"
REPO = "org/var-remote"
LABELS, SEED = [1, 2], 0


def venv_without_the_package(root: Path) -> Path:
    """A venv whose only libraries are this environment's, seen through a folder that leaves diffusers-var out."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    libraries = root / "libraries"
    libraries.mkdir()
    for folder in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for entry in Path(folder).iterdir():
            if "diffusers_var" in entry.name or "diffusers-var" in entry.name or entry.suffix == ".pth":
                continue
            if not (libraries / entry.name).exists():
                (libraries / entry.name).symlink_to(entry)
    where = [venv / "bin" / "python", "-c", "import site; print(site.getsitepackages()[0])"]
    site_packages = Path(subprocess.check_output(where, text=True).strip())
    (site_packages / "libraries.pth").write_text(str(libraries) + "\n")
    return venv / "bin" / "python"


def hub_cache(root: Path, saved: Path) -> Path:
    """The layout huggingface_hub writes: HF_HOME/hub/models--org--name/{refs/main, snapshots/<sha>/...}."""
    import shutil

    repo = root / "hf_home" / "hub" / f"models--{REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    shutil.copytree(saved, repo / "snapshots" / SHA)
    return root / "hf_home"


LOAD_WITHOUT_THE_PACKAGE = f"""
import sys, torch
from diffusers import DiffusionPipeline
from transformers import AutoModel
try:
    import diffusers_var
    sys.exit("diffusers_var is importable: this check would prove nothing")
except ImportError:
    pass
pipe = DiffusionPipeline.from_pretrained({REPO!r}, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
out = pipe(class_labels={LABELS}, top_k=5, output_type="pt", generator=torch.Generator().manual_seed({SEED}))
model = AutoModel.from_pretrained({REPO!r}, subfolder="transformer", trust_remote_code=True)
inputs = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(torch.tensor([3, 7]), inputs).logits
modules = sorted(m for m in sys.modules if "var" in m)
torch.save({{"pipeline": type(pipe).__name__, "model": type(model).__name__, "token_maps": out.token_maps,
            "images": out.images, "logits": logits, "modules": modules}}, sys.argv[1])
"""


@pytest.fixture(scope="module")
def remote_save(tmp_path_factory):
    pipe = tiny_pipeline()
    folder = tmp_path_factory.mktemp("remote") / "saved"
    pipe.save_pretrained(folder, remote_code=True)
    return pipe, folder


def test_generated_files_import_only_the_libraries(remote_save):
    _, folder = remote_save
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.py"))
    assert files == [
        "modeling_var_transformer.py",
        "pipeline_var.py",
        "scheduler/scheduling_var.py",
        "transformer/modeling_var_transformer.py",
        "vqvae/modeling_var_vqvae.py",
    ]
    for path in folder.rglob("*.py"):
        source = path.read_text()
        outside = imported_modules(source) - ALLOWED_IMPORTS - set(sys.stdlib_module_names)
        assert not outside, f"{path.name} imports {outside}"
        assert "package_only" not in source and "load_strictly" not in source
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_var", "VARPipeline"]
    assert index["transformer"] == ["modeling_var_transformer", "VARTransformer"]
    config = json.loads((folder / "transformer" / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_var_transformer.VARTransformer"


def test_bundles_have_no_clashing_definitions():
    import ast

    for name, modules in REMOTE_FILES.items():
        names = [n.name for n in ast.parse(bundle(modules)).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert len(names) == len(set(names)), f"{name} defines {sorted({n for n in names if names.count(n) > 1})} twice"


def test_a_remote_code_save_samples_the_same_tokens_without_the_package(remote_save, tmp_path):
    pipe, folder = remote_save
    python = venv_without_the_package(tmp_path)
    home = hub_cache(tmp_path, folder)
    inputs = torch.randn(2, 20, 8, generator=torch.Generator().manual_seed(0))
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [str(python), "-c", LOAD_WITHOUT_THE_PACKAGE, str(tmp_path / "out.pt"), str(tmp_path / "inputs.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt")
    assert remote["pipeline"] == "VARPipeline" and remote["model"] == "VARTransformer"
    assert not [m for m in remote["modules"] if m.startswith("diffusers_var")]

    expected = pipe(class_labels=LABELS, top_k=5, output_type="pt", generator=torch.Generator().manual_seed(SEED))
    assert all(torch.equal(a, b) for a, b in zip(remote["token_maps"], expected.token_maps))
    torch.testing.assert_close(remote["images"], expected.images, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(remote["logits"], pipe.transformer(torch.tensor([3, 7]), inputs).logits)


def test_with_the_package_a_remote_code_save_loads_without_trust_remote_code(remote_save, tmp_path):
    pipe, folder = remote_save
    reloaded = VARPipeline.from_pretrained(folder)
    assert type(reloaded) is VARPipeline and type(reloaded.transformer).__module__ == "diffusers_var.models.transformer"
    assert reloaded.config.id2label == pipe.config.id2label
    a = pipe(class_labels=LABELS, output_type="latent", generator=torch.Generator().manual_seed(1)).token_maps
    b = reloaded(class_labels=LABELS, output_type="latent", generator=torch.Generator().manual_seed(1)).token_maps
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # saving over it without remote_code replaces the generated code, which was ours
    reloaded.save_pretrained(folder)
    assert not list(folder.rglob("*.py"))
    reloaded.save_pretrained(folder, remote_code=True)
    assert len(list(folder.rglob("*.py"))) == 5


def test_push_to_hub_with_remote_code_uploads_the_code_and_says_how_to_load_it(tmp_path, monkeypatch):
    import shutil
    from types import SimpleNamespace

    import huggingface_hub

    uploaded = tmp_path / "uploaded"
    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: SimpleNamespace(repo_id=f"me/{repo_id}")
    )
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "upload_folder",
        lambda self, *, folder_path, **kw: shutil.copytree(folder_path, uploaded) and "https://huggingface.co/c/1",
    )
    tiny_pipeline().push_to_hub("tiny-var", remote_code=True)
    assert (uploaded / "pipeline_var.py").is_file() and (uploaded / "vqvae" / "modeling_var_vqvae.py").is_file()
    card = (uploaded / "README.md").read_text()
    assert 'DiffusionPipeline.from_pretrained("me/tiny-var", trust_remote_code=True)' in card


def test_with_the_package_components_and_options_reach_a_remote_code_load(remote_save):
    pipe, folder = remote_save
    own = pipe.transformer
    reloaded = VARPipeline.from_pretrained(folder, transformer=own, dtype={"vqvae": torch.bfloat16})
    assert reloaded.transformer is own and reloaded.vqvae.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"does not take \['device_map'\]"):
        VARPipeline.from_pretrained(folder, device_map="balanced")
