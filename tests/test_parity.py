"""Exact parity with the official VAR code, on every configuration in the reference fixtures.

Each configuration is converted with the real command line (``diffusers-var convert --official-config``), loaded
with ``VARPipeline.from_pretrained`` and compared with the tensors the official code produced
(``outputs.safetensors``; names as in the fixtures' README). Tokens must be identical; floats within 1e-4.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES_ENV, reference_fixtures_dir
from safetensors.torch import load_file, save_file

from diffusers_var import VARPipeline
from diffusers_var.cli import main as cli_main

ATOL = 1e-4
FIXTURES = reference_fixtures_dir()
CONFIGS = sorted(p.parent.name for p in FIXTURES.glob("*/config.json"))


def test_reference_fixtures_are_present():
    # Parity must never pass vacuously: without fixtures this fails and says where they were looked for.
    assert CONFIGS, f"No reference fixtures under {FIXTURES}; set ${FIXTURES_ENV} to the var_reference folder."


@pytest.fixture(scope="module", params=CONFIGS)
def converted(request, tmp_path_factory) -> tuple[str, Path]:
    folder = FIXTURES / request.param
    output = tmp_path_factory.mktemp(request.param) / "pipeline"
    cli_main(
        [
            "convert",
            "--official-config",
            str(folder / "config.json"),
            "--vae",
            str(folder / "vae.pth"),
            "--var",
            str(folder / "var.pth"),
            "--output",
            str(output),
        ]
    )
    return request.param, output


@pytest.fixture(params=["sdpa", "eager"])
def case(request, converted):
    """A converted configuration, loaded with each attention kernel: parity holds on both."""
    name, output = converted
    pipe = VARPipeline.from_pretrained(output)
    pipe.transformer.set_attn_implementation(request.param)
    assert pipe.transformer.config._attn_implementation == request.param
    pipe.set_progress_bar_config(disable=True)
    folder = FIXTURES / name
    config = json.loads((folder / "config.json").read_text())
    return pipe, load_file(folder / "outputs.safetensors"), config


def flatten(token_maps: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten(1) for t in token_maps], dim=1)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    diff = (actual.float() - expected.float()).abs().max().item()
    assert diff <= ATOL, f"{name}: max abs diff {diff:.3e} > {ATOL}"


@torch.no_grad()
def test_tokenize_and_detokenize(case):
    pipe, ref, _ = case
    vqvae = pipe.vqvae
    assert_close(vqvae.encode(ref["images"]), ref["vae_f"], "vae_f")
    token_maps = vqvae.tokenize(ref["images"])
    assert [tuple(t.shape[1:]) for t in token_maps] == [(p, p) for p in ref["patch_nums"].tolist()]
    assert torch.equal(flatten(token_maps), ref["gt_idx_BL"]), "gt_idx_BL: token indices differ"
    _, f_hats = vqvae.quantizer.quantize(vqvae.encode(ref["images"]))
    assert_close(torch.stack(f_hats), ref["gt_fhat_per_scale"], "gt_fhat_per_scale")
    assert_close(vqvae.token_maps_to_fhat(token_maps), ref["fhat_from_idx"], "fhat_from_idx")
    assert_close(vqvae.detokenize(token_maps), ref["idx_to_img_last"], "idx_to_img_last")
    assert_close(vqvae.reconstruct(ref["images"]), ref["recon_img_last"], "recon_img_last")
    assert_close(vqvae.decode(ref["fhat_from_idx"]).clamp(-1, 1), ref["fhat_to_img"], "fhat_to_img")


@torch.no_grad()
def test_next_scale_inputs(case):
    pipe, ref, _ = case
    token_maps = pipe.vqvae.tokenize(ref["images"])
    assert_close(pipe.vqvae.next_scale_inputs(token_maps), ref["var_input_BLC"], "var_input_BLC")


@torch.no_grad()
def test_teacher_forcing_logits(case):
    pipe, ref, config = case
    transformer = pipe.transformer
    out = transformer(ref["labels"], ref["var_input_BLC"], output_hidden_states=True)
    assert_close(out.logits, ref["var_tf_logits"], "var_tf_logits")
    assert_close(torch.stack(out.hidden_states[1:]), ref["var_tf_block_outputs"], "var_tf_block_outputs")
    null = torch.full_like(ref["labels"], config["var_kwargs"]["num_classes"])
    assert_close(transformer(null, ref["var_input_BLC"]).logits, ref["var_tf_logits_uncond"], "var_tf_logits_uncond")


def _pipeline_kwargs(call: dict) -> dict:
    """The official autoregressive_infer_cfg arguments in diffusers terms."""
    random_labels = not isinstance(call["label_B"], list)
    return dict(
        class_labels=None if random_labels else call["label_B"],
        num_images_per_prompt=call["B"] if random_labels else 1,
        guidance_scale=1 + call["cfg"],  # official cfg=c is guidance_scale 1 + c
        top_k=call["top_k"],
        top_p=call["top_p"] or 1.0,  # official top_p=0 means no nucleus filter, which is our 1.0
        more_smooth=call["more_smooth"],
    )


@torch.no_grad()
def test_sampling_matches_official(case):
    pipe, ref, config = case
    for name, call in config["ar_calls"].items():
        kwargs = _pipeline_kwargs(call)
        out = pipe(output_type="pt", generator=torch.Generator().manual_seed(call["g_seed"]), **kwargs)
        assert torch.equal(out.class_labels, ref[f"{name}_labels"]), f"{name}_labels differ"
        assert torch.equal(flatten(out.token_maps), ref[f"{name}_idx_BL"]), f"{name}_idx_BL: tokens differ"
        assert_close(out.images, ref[f"{name}_img"], f"{name}_img")
        latents = pipe(output_type="latent", generator=torch.Generator().manual_seed(call["g_seed"]), **kwargs).images
        decoded = (pipe.vqvae.decode(latents).clamp(-1, 1) + 1) / 2  # the latents are what the decoder consumes
        assert_close(decoded, ref[f"{name}_img"], f"{name}_img from latents")
        if not call["more_smooth"]:  # (Gumbel smoothing mixes soft codes into f̂, not the sampled ones)
            assert_close(latents, pipe.vqvae.token_maps_to_fhat(out.token_maps), f"{name} latents")


@torch.no_grad()
def test_guided_logits_per_scale(case):
    """(1 + t)·cond − t·uncond at every scale, with the scheduler's t, equals the official CFG-combined logits."""
    pipe, ref, config = case
    call = config["ar_calls"]["ar_greedy_cfg4p0"]
    kwargs = _pipeline_kwargs(call)
    guided = []

    def record(module, args, call_kwargs, output):
        t = pipe.scheduler.guidance_weight(call_kwargs["scale_index"], kwargs["guidance_scale"])
        conditional, unconditional = output.logits.chunk(2)
        guided.append((1 + t) * conditional - t * unconditional)

    hook = pipe.transformer.register_forward_hook(record, with_kwargs=True)
    try:
        pipe(output_type="latent", generator=torch.Generator().manual_seed(call["g_seed"]), **kwargs)
    finally:
        hook.remove()
    assert_close(torch.cat(guided, dim=1), ref["ar_greedy_cfg4p0_logits_BLV"], "ar_greedy_cfg4p0_logits_BLV")


def test_safetensors_checkpoints_convert_identically(tmp_path):
    """The converter reads .safetensors as well as .pth, with the same result."""
    folder = FIXTURES / CONFIGS[0]
    save_file(torch.load(folder / "vae.pth", weights_only=True), tmp_path / "vae.safetensors")
    out_pth, out_st = tmp_path / "from_pth", tmp_path / "from_safetensors"
    common = ["convert", "--official-config", str(folder / "config.json")]
    cli_main([*common, "--vae", str(folder / "vae.pth"), "--var", str(folder / "var.pth"), "--output", str(out_pth)])
    cli_main(
        [
            *common,
            "--vae",
            str(tmp_path / "vae.safetensors"),
            "--var",
            str(folder / "var.safetensors"),
            "--output",
            str(out_st),
        ]
    )
    for component, weights in (("vqvae", "diffusion_pytorch_model.safetensors"), ("transformer", "model.safetensors")):
        a, b = load_file(out_pth / component / weights), load_file(out_st / component / weights)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), component


def test_console_script_converts(tmp_path):
    """The installed entry point and ``python -m diffusers_var.convert`` both work."""
    folder = FIXTURES / CONFIGS[-1]
    args = [
        "--official-config",
        str(folder / "config.json"),
        "--vae",
        str(folder / "vae.pth"),
        "--var",
        str(folder / "var.pth"),
    ]
    script = Path(sys.executable).parent / "diffusers-var"
    subprocess.run([str(script), "convert", *args, "--output", str(tmp_path / "a")], check=True)
    subprocess.run([sys.executable, "-m", "diffusers_var.convert", *args, "--output", str(tmp_path / "b")], check=True)
    for out in ("a", "b"):
        assert (tmp_path / out / "model_index.json").is_file()
        assert (tmp_path / out / "transformer" / "model.safetensors").is_file()


@torch.no_grad()
def test_zero_shot_inpainting_matches_official(case):
    """VARInpaintPipeline against the official notebook's autoregressive_infer_cfg_with_mask: the per-scale keep
    masks, the effective tokens (kept and sampled) and the image."""
    from diffusers_var import VARInpaintPipeline
    from diffusers_var.pipelines.image_inputs import keep_masks

    pipe, ref, config = case
    pipe = VARInpaintPipeline(**pipe.components)
    pipe.set_progress_bar_config(disable=True)
    call, patch_nums = config["inpaint_call"], tuple(pipe.vqvae.config.patch_nums)
    mask_image = 1 - ref["inpaint_edit_mask"]  # the official mask keeps (1); diffusers' mask regenerates (1)
    keep = keep_masks(mask_image[None, None], patch_nums)
    assert torch.equal(flatten(keep).expand(2, -1).long(), ref["inpaint_force_gt_BL"].long()), "keep masks differ"

    sizes = [side * side for side in patch_nums]
    token_maps = [t.reshape(-1, s, s) for t, s in zip(ref["inpaint_input_idx_BL"].split(sizes, 1), patch_nums)]
    null = config["var_kwargs"]["num_classes"]
    kwargs = dict(
        mask_image=mask_image,
        class_labels=[None if c == null else c for c in ref["inpaint_labels"].tolist()],  # null class: in-painting
        guidance_scale=1 + call["cfg"],
        top_k=call["top_k"],
        top_p=call["top_p"] or 1.0,
        output_type="pt",
    )
    out = pipe(image_token_maps=token_maps, generator=torch.Generator().manual_seed(call["g_seed"]), **kwargs)
    assert torch.equal(flatten(out.token_maps), ref["inpaint_effective_idx_BL"]), "effective tokens differ"
    assert_close(out.images, ref["inpaint_img"], "inpaint_img")
    # from the image itself (diffusers' [0, 1] convention): the tokenizer gives the same input tokens
    from_image = pipe(image=(ref["images"] + 1) / 2, generator=torch.Generator().manual_seed(call["g_seed"]), **kwargs)
    assert torch.equal(flatten(from_image.token_maps), ref["inpaint_effective_idx_BL"]), "tokens from the image"
