"""The converter refuses bad checkpoints with messages that name the problem, and never half-writes its output."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import reference_fixtures_dir

from diffusers_var.cli import main as cli_main
from diffusers_var.convert import PRESETS, component_configs, convert, imagenet_id2label, load_checkpoint

FIXTURE = reference_fixtures_dir() / "A_adaln_l2norm_qsr4"


def _convert(tmp_path, vae=None, var=None, config=None):
    return convert(
        vae or FIXTURE / "vae.pth",
        var or FIXTURE / "var.pth",
        tmp_path / "out",
        official_config=config or FIXTURE / "config.json",
    )


def _edited_var(tmp_path, edit) -> str:
    state = torch.load(FIXTURE / "var.pth", weights_only=True)
    edit(state)
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    return path


def _assert_no_output(tmp_path):
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temporary folder left behind"


def test_missing_key_is_named(tmp_path):
    path = _edited_var(tmp_path, lambda s: s.pop("head.weight"))
    with pytest.raises(ValueError, match=r"missing \(1\): head.weight\. Check"):
        _convert(tmp_path, var=path)
    _assert_no_output(tmp_path)


def test_unexpected_key_is_named(tmp_path):
    path = _edited_var(tmp_path, lambda s: s.update({"extra.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match=r"unexpected \(1\): extra.weight\. Check"):
        _convert(tmp_path, var=path)
    _assert_no_output(tmp_path)


def test_misshaped_key_is_named(tmp_path):
    path = _edited_var(tmp_path, lambda s: s.update({"head.bias": torch.zeros(7)}))
    with pytest.raises(ValueError, match=r"mis-shaped.*head.bias: checkpoint \(7,\) vs model \(64,\)"):
        _convert(tmp_path, var=path)
    _assert_no_output(tmp_path)


def test_wrong_patch_nums_are_caught_by_the_level_buffer(tmp_path):
    config = json.loads((FIXTURE / "config.json").read_text())
    config["var_kwargs"]["patch_nums"] = config["vqvae_kwargs"]["v_patch_nums"] = [1, 2, 3, 5]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lvl_1L.*patch_nums=\\(1, 2, 3, 5\\)"):
        _convert(tmp_path, config=path)
    _assert_no_output(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupt_or_truncated_files_are_refused(tmp_path, damage, suffix):
    good = (FIXTURE / "var.safetensors" if suffix == ".safetensors" else FIXTURE / "var.pth").read_bytes()
    data = {"truncated": good[: len(good) // 2], "garbage": b"not a checkpoint" * 10, "empty": b""}[damage]
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(data)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="bad"):
        _convert(tmp_path, var=path)
    _assert_no_output(tmp_path)


def test_missing_file_and_non_state_dict(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth")
    torch.save({"model": {"nested": torch.zeros(1)}}, tmp_path / "nested.pth")
    with pytest.raises(ValueError, match="not a flat state dict"):
        load_checkpoint(tmp_path / "nested.pth")


def test_failed_conversion_leaves_existing_output_untouched(tmp_path):
    _convert(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*"))
    path = _edited_var(tmp_path, lambda s: s.pop("head.bias"))
    with pytest.raises(ValueError):
        _convert(tmp_path, var=path)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*")) == before


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(
            [
                "convert",
                "--preset",
                "var-d16",
                "--vae",
                str(tmp_path / "x.pth"),
                "--var",
                "y.pth",
                "--output",
                str(tmp_path / "out"),
            ]
        )
    assert exit_info.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def test_output_folder_with_user_files_is_refused_and_overwrite_keeps_them(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("precious")
    monkeypatch.chdir(work)
    args = ["convert", "--official-config", str(FIXTURE / "config.json"), "--vae", str(FIXTURE / "vae.pth")]
    args += ["--var", str(FIXTURE / "var.pth"), "--output", "."]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "already holds files that are not a VARPipeline save: thesis.tex" in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in work.iterdir()) == ["thesis.tex"]

    cli_main([*args, "--overwrite"])
    assert (work / "thesis.tex").read_text() == "precious" and (work / "model_index.json").is_file()
    assert not [p for p in work.iterdir() if p.name.startswith(".")], "staging folder left behind"
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        convert(FIXTURE / "vae.pth", FIXTURE / "var.pth", tmp_path / "a-file", official_config=FIXTURE / "config.json")


def test_swapped_checkpoints_are_named_in_one_short_line(tmp_path, capsys):
    args = ["convert", "--official-config", str(FIXTURE / "config.json"), "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*args, "--vae", str(FIXTURE / "var.pth"), "--var", str(FIXTURE / "vae.pth")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Did you swap --vae and --var?" in err
    assert len(err) < 400 and len(err.strip().splitlines()) == 1
    _assert_no_output(tmp_path)


def test_many_bad_keys_are_listed_briefly(tmp_path):
    path = _edited_var(tmp_path, lambda s: [s.pop(k) for k in [k for k in s if k.startswith("blocks.")]])
    with pytest.raises(ValueError, match=r"missing \((\d+)\): blocks\.0\..*, … \(\d+ more\)") as error:
        _convert(tmp_path, var=path)
    assert len(str(error.value)) < 600


def test_a_pickle_with_code_is_refused_for_that_reason(tmp_path):
    path = tmp_path / "code.pth"
    torch.save({"weight": torch.zeros(1), "hook": print}, path)  # pickles a callable: weights_only refuses it
    with pytest.raises(ValueError, match=r"besides tensors it holds Python objects \(.*print\).*weights_only=True"):
        load_checkpoint(path)


def test_python_m_convert_prints_one_line_not_a_traceback(tmp_path):
    import subprocess
    import sys

    command = [sys.executable, "-m", "diffusers_var.convert", "--preset", "var-d16", "--vae", str(tmp_path / "x.pth")]
    result = subprocess.run(
        [*command, "--var", "y.pth", "--output", str(tmp_path / "o")], capture_output=True, text=True
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: Checkpoint '{tmp_path / 'x.pth'}' does not exist."]


def test_official_config_errors(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="Could not read --official-config"):
        _convert(tmp_path, config=tmp_path / "bad.json")
    (tmp_path / "partial.json").write_text(json.dumps({"var_kwargs": {}}))
    with pytest.raises(ValueError, match="lacks \\['vqvae_kwargs'\\]"):
        _convert(tmp_path, config=tmp_path / "partial.json")
    with pytest.raises(ValueError, match="exactly one of"):
        convert(FIXTURE / "vae.pth", FIXTURE / "var.pth", tmp_path / "out")
    with pytest.raises(ValueError, match="Unknown preset"):
        convert(FIXTURE / "vae.pth", FIXTURE / "var.pth", tmp_path / "out", preset="var-d99")


def test_presets_hold_the_official_hyper_parameters():
    vqvae, transformer, scheduler = component_configs(**PRESETS["var-d16"])
    assert (vqvae["ch"], vqvae["vocab_size"], vqvae["z_channels"], vqvae["share_quant_resi"]) == (160, 4096, 32, 4)
    assert (transformer["depth"], transformer["embed_dim"], transformer["num_heads"]) == (16, 1024, 16)
    assert transformer["attn_l2_norm"] and not transformer["shared_adaln"]
    assert scheduler["patch_nums"] == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    for name, depth in (("var-d20", 20), ("var-d24", 24), ("var-d30", 30)):
        assert component_configs(**PRESETS[name])[1]["embed_dim"] == 64 * depth
    _, d36, d36_scheduler = component_configs(**PRESETS["var-d36"])
    assert d36["shared_adaln"] and d36["depth"] == 36
    assert d36_scheduler["patch_nums"] == (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


def test_imagenet_class_names():
    names = imagenet_id2label()
    assert len(names) == 1000
    assert names[0].startswith("tench") and names[1].startswith("goldfish") and names[207] == "golden retriever"
