"""Saving and loading: pipeline round trips, derived geometry, dtypes and variants, Auto classes, mismatched parts."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import TINY_PATCH_NUMS, tiny_images, tiny_pipeline, tiny_transformer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel

from diffusers_var import MultiScaleVQVAE, VARConfig, VARPipeline, VARScaleScheduler, VARTransformer

LABELS = [1, 3]


def sample(pipe: VARPipeline, class_labels=LABELS, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return pipe(class_labels, guidance_scale=2.5, top_k=8, top_p=0.9, generator=generator, output_type="pt").images


def load(folder, **kwargs) -> VARPipeline:
    pipe = VARPipeline.from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_same_parameters(model_a: torch.nn.Module, model_b: torch.nn.Module) -> None:
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name, tensor in state_a.items():
        assert tensor.dtype == state_b[name].dtype, name
        assert torch.equal(tensor, state_b[name]), f"{name} differs after reloading"


def public_config(config) -> dict:
    """A saved config without diffusers' bookkeeping keys, with tuples as JSON gives them back (lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items() if not k.startswith("_")}


def expected_level_ids(patch_nums) -> list[int]:
    return [si for si, pn in enumerate(patch_nums) for _ in range(pn * pn)]


@pytest.fixture
def saved(tmp_path):
    """A tiny pipeline and the folder it was saved to."""
    pipe = tiny_pipeline()
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder)
    return pipe, folder


# -- 1. round trip ---------------------------------------------------------------------------------------------------


def test_round_trip_keeps_weights_scheduler_labels_and_samples(saved):
    pipe, folder = saved
    reloaded = load(folder)

    assert isinstance(reloaded, VARPipeline)
    assert_same_parameters(pipe.vqvae, reloaded.vqvae)
    assert_same_parameters(pipe.transformer, reloaded.transformer)
    assert isinstance(reloaded.scheduler, VARScaleScheduler)
    assert public_config(reloaded.scheduler.config) == public_config(pipe.scheduler.config)
    assert public_config(reloaded.vqvae.config) == public_config(pipe.vqvae.config)
    assert public_config(reloaded.transformer.config.to_dict()) == public_config(pipe.transformer.config.to_dict())

    id2label = reloaded.config.id2label
    assert id2label == pipe.config.id2label
    assert all(type(k) is int for k in id2label)
    assert reloaded.get_label_ids(["number 3", "digit 7"]) == [3, 7]

    before, after = sample(pipe), sample(reloaded)
    assert before.shape == (len(LABELS), 3, 8, 8)
    assert torch.equal(before, after)
    # and the class names resolve to the same classes after reloading
    assert torch.equal(after, sample(reloaded, ["digit 1", "number 3"]))


# -- 2. every weight and the derived geometry after from_pretrained --------------------------------------------------


@pytest.mark.parametrize("via", ["pipeline", "transformer"])
def test_reloaded_transformer_is_fully_initialised(saved, via):
    pipe, folder = saved
    original = pipe.transformer
    if via == "pipeline":
        reloaded = load(folder).transformer
    else:
        reloaded = VARTransformer.from_pretrained(folder / "transformer").eval()

    assert_same_parameters(original, reloaded)
    assert dict(original.named_buffers()).keys() == dict(reloaded.named_buffers()).keys()
    for name, buffer in reloaded.named_buffers():
        assert torch.equal(buffer, dict(original.named_buffers())[name]), name

    levels = expected_level_ids(TINY_PATCH_NUMS)
    assert reloaded.level_ids().tolist() == levels
    assert reloaded.num_tokens == len(levels) and reloaded.first_l == 1
    mask = reloaded.block_causal_mask(torch.float32)
    expected_visible = torch.tensor(levels)[:, None] >= torch.tensor(levels)[None, :]
    assert torch.equal(mask == 0, expected_visible)
    assert torch.isneginf(mask[~expected_visible]).all()
    assert torch.equal(mask, original.block_causal_mask(torch.float32))

    token_maps = pipe.vqvae.tokenize(tiny_images(2))
    inputs = pipe.vqvae.next_scale_inputs(token_maps)
    class_labels = torch.tensor([3, 10])  # a class and the null class
    with torch.no_grad():
        expected = original(class_labels, inputs).logits
        logits = reloaded(class_labels, inputs).logits
    assert logits.shape == (2, len(levels), 32)
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, expected)


# -- 4. dtypes and variants ------------------------------------------------------------------------------------------


def test_load_in_bfloat16_samples(saved):
    pipe, folder = saved
    pipe_bf16 = load(folder, dtype=torch.bfloat16)

    assert pipe_bf16.transformer.dtype == torch.bfloat16
    assert pipe_bf16.vqvae.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in pipe_bf16.transformer.parameters())
    assert all(p.dtype == torch.bfloat16 for p in pipe_bf16.vqvae.parameters())
    head = pipe.transformer.head.weight.to(torch.bfloat16)
    assert torch.equal(pipe_bf16.transformer.head.weight, head)

    images = sample(pipe_bf16)
    assert images.shape == (len(LABELS), 3, 8, 8)
    assert torch.isfinite(images.float()).all()
    assert images.min() >= 0 and images.max() <= 1


def test_load_with_per_component_dtype_samples(saved):
    _, folder = saved
    pipe = load(folder, dtype={"transformer": torch.bfloat16, "default": torch.float32})

    assert pipe.transformer.dtype == torch.bfloat16
    assert pipe.vqvae.dtype == torch.float32
    images = sample(pipe)
    assert images.dtype == torch.float32
    assert torch.isfinite(images).all()


def test_to_float16_samples_on_cpu():
    pipe = tiny_pipeline().to(torch.float16)

    assert pipe.transformer.dtype == torch.float16
    assert pipe.vqvae.dtype == torch.float16
    images = sample(pipe)
    assert images.dtype == torch.float16
    assert images.shape == (len(LABELS), 3, 8, 8)
    assert torch.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1


def test_fp16_variant_round_trip(tmp_path):
    pipe = tiny_pipeline().to(torch.float16)
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder, variant="fp16")

    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "transformer/config.json",
        "transformer/model.fp16.safetensors",
        "vqvae/config.json",
        "vqvae/diffusion_pytorch_model.fp16.safetensors",
    ]
    for weights in ("transformer/model.fp16.safetensors", "vqvae/diffusion_pytorch_model.fp16.safetensors"):
        with safe_open(folder / weights, framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, weights

    reloaded = load(folder, variant="fp16", dtype=torch.float16)
    assert_same_parameters(pipe.vqvae, reloaded.vqvae)
    assert_same_parameters(pipe.transformer, reloaded.transformer)
    assert torch.equal(sample(pipe), sample(reloaded))

    # without variant= a variant-only folder fails on whichever weight file diffusers looks for first
    with pytest.raises(OSError, match="no file named"):
        VARPipeline.from_pretrained(folder)


def test_variant_is_saved_beside_the_main_weights(tmp_path):
    pipe = tiny_pipeline()
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder)
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
    for weights in ("transformer/model", "vqvae/diffusion_pytorch_model"):
        assert (folder / f"{weights}.safetensors").is_file() and (folder / f"{weights}.fp16.safetensors").is_file()
    assert load(folder).transformer.dtype == torch.float32
    assert load(folder, variant="fp16", dtype=torch.float16).transformer.dtype == torch.float16


def test_a_half_precision_save_reloads_in_float32_by_default(tmp_path):
    tiny_pipeline().to(torch.bfloat16).save_pretrained(tmp_path / "pipe")
    pipe = load(tmp_path / "pipe")
    assert pipe.transformer.dtype == torch.float32 and pipe.vqvae.dtype == torch.float32


# -- 5. Auto classes -------------------------------------------------------------------------------------------------


def test_auto_config_and_auto_model(saved):
    pipe, folder = saved
    config = AutoConfig.from_pretrained(folder / "transformer")
    assert type(config) is VARConfig
    assert config.model_type == "var"
    assert list(config.patch_nums) == list(TINY_PATCH_NUMS)

    model = AutoModel.from_pretrained(folder / "transformer")
    assert type(model) is VARTransformer
    assert_same_parameters(pipe.transformer, model)


# -- 9. components that disagree -------------------------------------------------------------------------------------


def test_constructing_with_mismatched_patch_nums_names_them():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="patch_nums"):
        VARPipeline(pipe.vqvae, tiny_transformer(patch_nums=(1, 2, 3)), pipe.scheduler)
    with pytest.raises(ValueError, match="patch_nums"):
        VARPipeline(pipe.vqvae, pipe.transformer, VARScaleScheduler(patch_nums=(1, 2, 3)))


def test_loading_transformer_with_other_patch_nums_names_them(saved):
    _, folder = saved
    shutil.rmtree(folder / "transformer")
    tiny_transformer(patch_nums=(1, 2, 3)).save_pretrained(folder / "transformer")
    assert json.loads((folder / "transformer" / "config.json").read_text())["patch_nums"] == [1, 2, 3]

    with pytest.raises(ValueError, match="patch_nums"):
        VARPipeline.from_pretrained(folder)


def test_editing_only_the_config_patch_nums_fails_on_weight_shapes(saved):
    """Without matching weights, the position embedding is refused before the pipeline can check."""
    _, folder = saved
    edit_config(folder / "transformer", patch_nums=[1, 2, 3])
    with pytest.raises(ValueError, match=r"mis-shaped \(1\): position_embedding: file \(1, 21, 32\) vs config"):
        VARPipeline.from_pretrained(folder)


# -- 10. damaged folders never load --------------------------------------------------------------------------------


def edit_config(folder, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def drop_tensor(path, name: str) -> None:
    state = load_file(path)
    del state[name]
    save_file(state, path, metadata={"format": "pt"})


TRANSFORMER_FILE, VQVAE_FILE = "transformer/model.safetensors", "vqvae/diffusion_pytorch_model.safetensors"


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


DAMAGES = {  # what is done to a saved folder → what the error must say
    "transformer-tensor-removed": (
        lambda f: drop_tensor(f / TRANSFORMER_FILE, "head.weight"),
        r"model.safetensors do not fit .*missing \(1\): head.weight",
    ),
    "vqvae-tensor-removed": (
        lambda f: drop_tensor(f / VQVAE_FILE, "decoder.conv_out.weight"),
        r"missing \(1\): decoder.conv_out.weight",
    ),
    "depth-3-over-2-blocks": (
        lambda f: edit_config(f / "transformer", depth=3),
        r"transformer/config.json: missing \(12\): blocks.2.adaln",
    ),
    "depth-1-over-2-blocks": (
        lambda f: edit_config(f / "transformer", depth=1),
        r"unexpected \(12\): blocks.1.adaln.bias, .* \(7 more\)",
    ),
    "vocab-size-edited": (
        lambda f: edit_config(f / "vqvae", vocab_size=64),
        r"mis-shaped \(1\): quantizer.embedding.weight: file \(32, 8\)",
    ),
    "transformer-truncated": (lambda f: truncate(f / TRANSFORMER_FILE), r"model.safetensors is damaged or truncated"),
    "transformer-config-removed": (
        lambda f: (f / "transformer" / "config.json").unlink(),
        r"transformer has no config",
    ),
    "vqvae-random-bytes": (
        lambda f: (f / VQVAE_FILE).write_bytes(os.urandom(4096)),
        r"diffusion_pytorch_model.safetensors is damaged or truncated",
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_folder_fails_to_load_naming_the_file_and_keys(saved, damage):
    _, folder = saved
    apply, message = DAMAGES[damage]
    apply(folder)
    with pytest.raises(ValueError, match=message) as error:
        VARPipeline.from_pretrained(folder)
    assert str(folder) in str(error.value) and len(str(error.value)) < 800


def test_component_classes_are_strict_too_and_keep_the_opt_ins(saved):
    _, folder = saved
    drop_tensor(folder / TRANSFORMER_FILE, "head.weight")
    drop_tensor(folder / VQVAE_FILE, "decoder.conv_out.weight")
    with pytest.raises(ValueError, match="missing \\(1\\): head.weight"):
        VARTransformer.from_pretrained(folder / "transformer")
    with pytest.raises(ValueError, match="missing \\(1\\): head.weight"):
        AutoModel.from_pretrained(folder / "transformer")
    with pytest.raises(ValueError, match="missing \\(1\\): decoder.conv_out.weight"):
        MultiScaleVQVAE.from_pretrained(folder / "vqvae")
    with pytest.raises(ValueError, match="missing \\(1\\): head.weight"):
        VARTransformer.from_pretrained(folder, subfolder="transformer")

    # the libraries' explicit opt-in: the report instead of an error
    _, info = VARTransformer.from_pretrained(folder / "transformer", output_loading_info=True)
    assert set(info["missing_keys"]) == {"head.weight"}
    _, info = MultiScaleVQVAE.from_pretrained(folder / "vqvae", output_loading_info=True)
    assert list(info["missing_keys"]) == ["decoder.conv_out.weight"]


def test_ignore_mismatched_sizes_loads_what_fits(saved):
    pipe, folder = saved
    edit_config(folder / "transformer", num_classes=5)  # class embedding (11, C) in the file, (6, C) in the config
    with pytest.raises(ValueError, match="class_embedding.weight: file \\(11, 32\\) vs config \\(6, 32\\)"):
        VARTransformer.from_pretrained(folder / "transformer")
    model, info = VARTransformer.from_pretrained(
        folder / "transformer", ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert [k[0] if isinstance(k, tuple) else k for k in info["mismatched_keys"]] == ["class_embedding.weight"]
    assert model.class_embedding.weight.shape == (6, 32)
    assert torch.equal(model.head.weight, pipe.transformer.head.weight)
    model = VARTransformer.from_pretrained(folder / "transformer", ignore_mismatched_sizes=True)
    assert torch.equal(model.head.weight, pipe.transformer.head.weight)

    edit_config(folder / "vqvae", vocab_size=64)
    vqvae = MultiScaleVQVAE.from_pretrained(folder / "vqvae", ignore_mismatched_sizes=True, low_cpu_mem_usage=False)
    assert vqvae.quantizer.embedding.weight.shape == (64, 8)
    assert torch.equal(vqvae.decoder.conv_out.weight, pipe.vqvae.decoder.conv_out.weight)


def test_a_damaged_repo_in_the_hf_cache_names_the_cached_file(saved, tmp_path):
    _, folder = saved
    drop_tensor(folder / TRANSFORMER_FILE, "head.weight")
    repo = tmp_path / "hub" / "models--org--broken"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(folder, repo / "snapshots" / ("0" * 40))
    with pytest.raises(ValueError, match="snapshots/0+/transformer/model.safetensors do not fit"):
        VARPipeline.from_pretrained("org/broken", cache_dir=tmp_path / "hub")


def test_a_missing_shard_is_named(saved):
    pipe, folder = saved
    shutil.rmtree(folder / "transformer")
    pipe.transformer.save_pretrained(folder / "transformer", max_shard_size="20KB")
    shards = sorted((folder / "transformer").glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(ValueError, match=f"transformer lacks the weight shard\\(s\\) {shards[1].name} that its index"):
        VARPipeline.from_pretrained(folder)
