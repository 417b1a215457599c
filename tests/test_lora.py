"""LoRA through transformers' PEFT integration: adapters on the attention and MLP projections, saved as a PEFT
adapter folder, loaded on a pipeline in diffusers' manner, fused and unloaded."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_pipeline

from diffusers_var import VARPipeline
from diffusers_var.hub import save_pretrained_into
from diffusers_var.lora import DEFAULT_TARGET_MODULES, add_lora, lora_config


def sample(pipe) -> list[torch.Tensor]:
    out = pipe(class_labels=[1, 2, 3], top_k=8, output_type="latent", generator=torch.Generator().manual_seed(0))
    return out.token_maps, out.images


def trained_adapter(tmp_path, rank: int = 4):
    """A tiny pipeline saved as the base, and an adapter on it whose weights moved (as training would move them)."""
    base = tiny_pipeline()
    base.save_pretrained(tmp_path / "base")
    adapted = VARPipeline.from_pretrained(tmp_path / "base")
    add_lora(adapted.transformer, lora_config(rank, base_model=str(tmp_path / "base")))
    with torch.no_grad():
        for name, param in adapted.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    save_pretrained_into(adapted.transformer, tmp_path / "adapter")
    return base, adapted


def test_var_digits_rank_4_trains_under_5_percent():
    pipe = VARPipeline.from_pretrained("var-digits")
    trainable, total = add_lora(pipe.transformer, lora_config(4))
    assert trainable / total <= 0.05, f"{trainable:,} of {total:,}"
    names = [n for n, p in pipe.transformer.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert {n.split(".")[-4] for n in names} == set(DEFAULT_TARGET_MODULES)  # blocks.0.attn.qkv.lora_A.default.weight


def test_adapter_folder_loads_on_the_pipeline_and_with_transformers(tmp_path):
    base, adapted = trained_adapter(tmp_path)
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base") and config["r"] == 4

    expected_tokens, expected_latents = sample(adapted)
    base_tokens, _ = sample(base)
    assert not all(torch.equal(a, b) for a, b in zip(expected_tokens, base_tokens)), "the adapter changes nothing"

    pipe = VARPipeline.from_pretrained(tmp_path / "base")
    pipe.load_lora_weights(tmp_path / "adapter")
    tokens, latents = sample(pipe)
    assert all(torch.equal(a, b) for a, b in zip(tokens, expected_tokens))

    model = VARPipeline.from_pretrained(tmp_path / "base").transformer
    model.load_adapter(str(tmp_path / "adapter"))  # transformers' own API
    inputs = torch.randn(2, 20, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([1, 2]), inputs).logits,
                                   pipe.transformer(torch.tensor([1, 2]), inputs).logits)  # fmt: skip


def test_fuse_unfuse_and_unload(tmp_path):
    base, _ = trained_adapter(tmp_path)
    pipe = VARPipeline.from_pretrained(tmp_path / "base")
    pipe.load_lora_weights(tmp_path / "adapter")
    _, unfused = sample(pipe)
    pipe.fuse_lora()
    _, fused = sample(pipe)
    torch.testing.assert_close(fused, unfused, atol=1e-4, rtol=1e-4)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert not any("lora_" in n for n, _ in pipe.transformer.named_parameters())
    base_tokens, base_latents = sample(base)
    tokens, latents = sample(pipe)
    assert all(torch.equal(a, b) for a, b in zip(tokens, base_tokens))
    torch.testing.assert_close(latents, base_latents, atol=1e-5, rtol=0)


def test_a_scaled_fusion_unfuses_back_to_the_base_weights(tmp_path):
    trained_adapter(tmp_path)
    pipe = VARPipeline.from_pretrained(tmp_path / "base")
    before = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    pipe.load_lora_weights(tmp_path / "adapter")
    pipe.fuse_lora(lora_scale=0.5)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    for name, param in pipe.transformer.named_parameters():
        torch.testing.assert_close(param, before[name], atol=1e-6, rtol=0)


def test_fuse_unload_save_gives_a_plain_fine_tuned_model(tmp_path):
    _, adapted = trained_adapter(tmp_path)
    _, expected = sample(adapted)
    pipe = VARPipeline.from_pretrained(tmp_path / "base")
    pipe.load_lora_weights(tmp_path / "adapter")
    with pytest.raises(ValueError, match="carries LoRA adapters, so its save would hold only the adapter"):
        pipe.save_pretrained(tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # as in diffusers: the fused weights stay
    pipe.save_pretrained(tmp_path / "fused")
    _, fused = sample(VARPipeline.from_pretrained(tmp_path / "fused"))
    torch.testing.assert_close(fused, expected, atol=1e-4, rtol=1e-4)


def test_the_adapter_s_class_names_come_and_go_with_it(tmp_path):
    base, _ = trained_adapter(tmp_path)
    (tmp_path / "adapter" / "id2label.json").write_text(json.dumps({"0": "cat", "1": "dog"}))
    pipe = VARPipeline.from_pretrained(tmp_path / "base")
    pipe.load_lora_weights(tmp_path / "adapter")
    assert pipe.get_label_ids(["dog"]) == [1] and pipe.config.id2label == {0: "cat", 1: "dog"}
    pipe.unload_lora_weights()
    assert pipe.config.id2label == base.config.id2label and pipe.get_label_ids(["digit 1"]) == [1]


def test_an_adapter_folder_is_not_taken_for_a_damaged_model(tmp_path):
    trained_adapter(tmp_path)
    import shutil

    shutil.copytree(tmp_path / "base", tmp_path / "mixed")
    (tmp_path / "mixed" / "transformer" / "model.safetensors").unlink()
    shutil.copy(tmp_path / "adapter" / "adapter_model.safetensors", tmp_path / "mixed" / "transformer")
    shutil.copy(tmp_path / "adapter" / "adapter_config.json", tmp_path / "mixed" / "transformer")
    with pytest.raises(ValueError, match="transformer holds a LoRA adapter, not a whole model"):
        VARPipeline.from_pretrained(tmp_path / "mixed")


def test_bad_lora_settings_say_what_is_allowed(tmp_path):
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match=r"LoRA target module\(s\) \['to_q'\] are not in the transformer"):
        add_lora(pipe.transformer, lora_config(4, target_modules=["to_q"]))
    with pytest.raises(ValueError, match="rank must be ≥ 1"):
        lora_config(0)
    with pytest.raises(ValueError, match="holds no LoRA adapter"):
        pipe.load_lora_weights(tmp_path)
    with pytest.raises(ValueError, match="no LoRA adapter to fuse"):
        pipe.fuse_lora()
