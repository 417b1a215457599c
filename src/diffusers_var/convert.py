"""Convert official VAR checkpoints (``vae_ch160v4096z32.pth``, ``var_d16.pth``, …) into a VARPipeline folder.

Usage::

    diffusers-var convert --preset var-d16 --vae vae_ch160v4096z32.pth --var var_d16.pth --output var-d16
    diffusers-var convert --official-config config.json --vae vae.pth --var var.pth --output out
    python -m diffusers_var.convert ...   # the same

The official checkpoints hold weights only; image size, scales and head count come from a preset or from the
official constructor arguments (``vqvae_kwargs`` / ``var_kwargs``) in a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file

from .models.transformer import VARConfig, VARTransformer, scale_level_ids
from .models.vqvae import MultiScaleVQVAE
from .pipelines.var import VARPipeline
from .schedulers.scale import VARScaleScheduler

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)

OFFICIAL_TOKENIZER = dict(
    vocab_size=4096,
    z_channels=32,
    ch=160,
    dropout=0.0,
    beta=0.25,
    using_znorm=False,
    quant_conv_ks=3,
    quant_resi=0.5,
    share_quant_resi=4,
    default_qresi_counts=0,
)


def _official_preset(depth: int, patch_nums: tuple[int, ...], shared_aln: bool = False) -> dict:
    """The official build: width 64·depth, depth heads, L2-normalised attention, 1000 ImageNet classes."""
    var_kwargs = dict(
        num_classes=1000,
        depth=depth,
        embed_dim=64 * depth,
        num_heads=depth,
        mlp_ratio=4.0,
        norm_eps=1e-6,
        shared_aln=shared_aln,
        attn_l2_norm=True,
        cond_drop_rate=0.1,
        drop_path_rate=0.1 * depth / 24,
        patch_nums=patch_nums,
    )
    return {
        "vqvae_kwargs": dict(OFFICIAL_TOKENIZER, v_patch_nums=patch_nums),
        "var_kwargs": var_kwargs,
    }


PRESETS: dict[str, dict] = {
    "var-d16": _official_preset(16, PATCH_NUMS_256),
    "var-d20": _official_preset(20, PATCH_NUMS_256),
    "var-d24": _official_preset(24, PATCH_NUMS_256),
    "var-d30": _official_preset(30, PATCH_NUMS_256),
    "var-d36": _official_preset(36, PATCH_NUMS_512, shared_aln=True),
}


def imagenet_id2label() -> dict[int, str]:
    """The 1000 ImageNet-1k class names in the standard (sorted synset) order."""
    text = resources.files("diffusers_var").joinpath("data/imagenet_classes.json").read_text(encoding="utf-8")
    return {int(k): v for k, v in json.loads(text).items()}


# -- configurations ---------------------------------------------------------------------------------------------


def component_configs(vqvae_kwargs: dict, var_kwargs: dict) -> tuple[dict, dict, dict]:
    """Official constructor arguments → (MultiScaleVQVAE, VARConfig, VARScaleScheduler) keyword arguments."""
    patch_nums = tuple(int(p) for p in var_kwargs.get("patch_nums", PATCH_NUMS_256))
    vq_patch_nums = tuple(int(p) for p in vqvae_kwargs.get("v_patch_nums", patch_nums))
    if vq_patch_nums != patch_nums:
        raise ValueError(f"vqvae_kwargs.v_patch_nums={vq_patch_nums} and var_kwargs.patch_nums={patch_nums} differ.")
    vq = dict(OFFICIAL_TOKENIZER, **vqvae_kwargs)
    vqvae = dict(
        ch=vq["ch"],
        ch_mult=(1, 1, 2, 2, 4),
        num_res_blocks=2,
        dropout=vq["dropout"],
        norm_num_groups=32,
        mid_attention=True,
        lowest_level_attention=True,
        z_channels=vq["z_channels"],
        vocab_size=vq["vocab_size"],
        beta=vq["beta"],
        use_znorm=vq["using_znorm"],
        quant_conv_kernel_size=vq["quant_conv_ks"],
        quant_resi=vq["quant_resi"],
        share_quant_resi=vq["share_quant_resi"],
        default_qresi_counts=vq["default_qresi_counts"],
        patch_nums=patch_nums,
    )
    depth = var_kwargs.get("depth", 16)
    transformer = dict(
        num_classes=var_kwargs.get("num_classes", 1000),
        vocab_size=vq["vocab_size"],
        latent_channels=vq["z_channels"],
        patch_nums=patch_nums,
        depth=depth,
        embed_dim=var_kwargs.get("embed_dim", 1024),
        num_heads=var_kwargs.get("num_heads", 16),
        mlp_ratio=var_kwargs.get("mlp_ratio", 4.0),
        norm_eps=var_kwargs.get("norm_eps", 1e-6),
        shared_adaln=var_kwargs.get("shared_aln", False),
        attn_l2_norm=var_kwargs.get("attn_l2_norm", False),
        class_dropout_prob=var_kwargs.get("cond_drop_rate", 0.1),
        dropout=var_kwargs.get("drop_rate", 0.0),
        attention_dropout=var_kwargs.get("attn_drop_rate", 0.0),
        drop_path_rate=var_kwargs.get("drop_path_rate", 0.0),
    )
    return vqvae, transformer, {"patch_nums": patch_nums}


# -- state dicts ------------------------------------------------------------------------------------------------

_Rule = tuple[str, str | Callable[[re.Match], str]]


def _vqvae_rules(num_levels: int) -> list[_Rule]:
    def up_block(
        m: re.Match,
    ) -> str:  # official up.{i} is indexed by resolution; ours are in run order
        return f"decoder.up_blocks.{num_levels - 1 - int(m[1])}."

    return [
        (r"^quantize\.embedding\.", "quantizer.embedding."),
        (r"^quantize\.quant_resi\.qresi_ls\.(\d+)\.", r"quantizer.phis.\1.conv."),
        (r"^quantize\.quant_resi\.qresi\.", "quantizer.phis.0.conv."),
        (r"^quantize\.quant_resi\.(\d+)\.", r"quantizer.phis.\1.conv."),
        (r"^encoder\.down\.(\d+)\.", r"encoder.down_blocks.\1."),
        (r"^decoder\.up\.(\d+)\.", up_block),
        (r"\.mid\.block_1\.", ".mid_block.resnets.0."),
        (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
        (r"\.mid\.attn_1\.", ".mid_block.attention."),
        (r"\.block\.(\d+)\.", r".resnets.\1."),
        (r"\.attn\.(\d+)\.", r".attentions.\1."),
        (r"\.(downsample|upsample)\.", ".resample."),
        (r"\.nin_shortcut\.", ".conv_shortcut."),
    ]


_TRANSFORMER_RULES: list[_Rule] = [
    (r"^class_emb\.", "class_embedding."),
    (r"^pos_1LC$", "position_embedding"),
    (r"^lvl_embed\.", "level_embedding."),
    (r"^word_embed\.", "input_proj."),
    (r"^shared_ada_lin\.1\.", "shared_adaln."),
    (r"^head_nm\.ada_lin\.1\.", "head_adaln."),
    (r"\.ada_lin\.1\.", ".adaln."),
    (r"\.ada_gss$", ".scale_shift_table"),
    (r"\.attn\.mat_qkv\.", ".attn.qkv."),
    (r"\.attn\.scale_mul_1H11$", ".attn.logit_scale"),
    (r"\.attn\.proj\.", ".attn.out_proj."),
    (r"\.ffn\.", ".mlp."),
]


def _rename(state_dict: dict[str, torch.Tensor], rules: list[_Rule]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, value in state_dict.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def convert_vqvae_state_dict(state_dict: dict[str, torch.Tensor], num_levels: int = 5) -> dict[str, torch.Tensor]:
    """Official ``VQVAE`` keys → :class:`MultiScaleVQVAE` keys. The training-only code-hit EMA is dropped."""
    kept = {k: v for k, v in state_dict.items() if k != "quantize.ema_vocab_hit_SV"}
    return _rename(kept, _vqvae_rules(num_levels))


def convert_transformer_state_dict(state_dict: dict[str, torch.Tensor], config: VARConfig) -> dict[str, torch.Tensor]:
    """Official ``VAR`` keys → :class:`VARTransformer` keys, after checking the derived buffers against ``config``.

    ``lvl_1L`` and ``attn_bias_for_masking`` encode the scales the checkpoint was built with, so they must agree
    with ``config.patch_nums``; ``zero_k_bias`` must be zeros. None of them is stored: ours are derived.
    """
    expected = scale_level_ids(config.patch_nums)
    levels = state_dict.get("lvl_1L")
    if levels is not None:
        if tuple(levels.shape) != (1, expected.numel()) or not torch.equal(levels[0].long(), expected):
            raise ValueError(
                f"The checkpoint's lvl_1L (shape {tuple(levels.shape)}) does not match patch_nums="
                f"{tuple(config.patch_nums)} (L={expected.numel()}). Pick the preset or config it was trained with."
            )
    bias = state_dict.get("attn_bias_for_masking")
    if bias is not None and tuple(bias.shape[-2:]) != (expected.numel(),) * 2:
        raise ValueError(f"attn_bias_for_masking has shape {tuple(bias.shape)}, expected L={expected.numel()}.")
    kept = {}
    for key, value in state_dict.items():
        if key in ("lvl_1L", "attn_bias_for_masking"):
            continue
        if key.endswith(".attn.zero_k_bias"):
            if value.count_nonzero():
                raise ValueError(f"{key} must be all zeros (keys carry no bias), but it is not.")
            continue
        kept[key] = value
    return _rename(kept, _TRANSFORMER_RULES)


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a flat name → tensor dict from ``.pth`` (``weights_only=True``) or ``.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Checkpoint {str(path)!r} does not exist.")
    try:
        if path.suffix == ".safetensors":
            state_dict = load_file(path)
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses a pickle that names a Python global (a function or class it would import and run);
        # garbage bytes fail as an unsupported opcode instead
        refused = re.search(r"GLOBAL ([\w.]+)", str(error))
        if refused is None:
            raise ValueError(
                f"Could not read checkpoint {str(path)!r}; the file is corrupt or truncated. Download it again."
            ) from error
        raise ValueError(
            f"Refusing {str(path)!r}: besides tensors it holds Python objects ({refused[1]}), which "
            "torch.load(weights_only=True) will not load because unpickling them can execute code. Official VAR "
            "checkpoints are plain state dicts; if you trust this file, re-save its tensors as .safetensors and "
            "convert that."
        ) from error
    except Exception as error:  # torch.load and safetensors raise many types for damaged files
        raise ValueError(
            f"Could not read checkpoint {str(path)!r}; the file is corrupt or truncated "
            f"({type(error).__name__}: {error}). Download it again."
        ) from error
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{str(path)!r} is not a flat state dict of tensors (an official VAR/VQVAE checkpoint).")
    return state_dict


# keys only one of the two official checkpoints has: tell a swapped --vae / --var apart from a damaged file
_KIND_KEYS = {"tokenizer (--vae)": "quantize.embedding.weight", "transformer (--var)": "class_emb.weight"}


def check_checkpoint_kind(state_dict: dict[str, torch.Tensor], expected: str, path: str | os.PathLike) -> None:
    """Raise a ValueError if the file given as the ``expected`` kind is the other official checkpoint."""
    for kind, key in _KIND_KEYS.items():
        if kind != expected and key in state_dict and _KIND_KEYS[expected] not in state_dict:
            raise ValueError(
                f"{str(path)!r} was given as the {expected} checkpoint but is the official {kind} one (it has "
                f"{key!r}). Did you swap --vae and --var?"
            )


def load_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load every weight or raise a ValueError naming the missing, unexpected and mis-shaped keys."""
    from .models.loading import describe_key_problems

    expected = model.state_dict()
    misshaped = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if state_dict[k].shape != expected[k].shape
    ]
    problems = describe_key_problems(set(expected) - set(state_dict), set(state_dict) - set(expected), misshaped)
    if problems:
        raise ValueError(
            f"{source} does not fit the configuration: {problems}. Check that --preset / --official-config "
            "describe this checkpoint."
        )
    model.load_state_dict(state_dict, strict=True)


def build_pipeline(
    vae_path: str | os.PathLike,
    var_path: str | os.PathLike,
    official_kwargs: dict,
    id2label: dict[int, str] | None = None,
) -> VARPipeline:
    """Load official checkpoints into a :class:`VARPipeline` (fp32, eval mode)."""
    vqvae_kwargs, transformer_kwargs, scheduler_kwargs = component_configs(
        official_kwargs["vqvae_kwargs"], official_kwargs["var_kwargs"]
    )
    vae_state, var_state = load_checkpoint(vae_path), load_checkpoint(var_path)
    check_checkpoint_kind(vae_state, "tokenizer (--vae)", vae_path)
    check_checkpoint_kind(var_state, "transformer (--var)", var_path)
    vqvae = MultiScaleVQVAE(**vqvae_kwargs)
    load_strict(vqvae, convert_vqvae_state_dict(vae_state, len(vqvae_kwargs["ch_mult"])), str(vae_path))
    config = VARConfig(**transformer_kwargs)
    transformer = VARTransformer(config)
    load_strict(transformer, convert_transformer_state_dict(var_state, config), str(var_path))
    scheduler = VARScaleScheduler(**scheduler_kwargs)
    return VARPipeline(vqvae.eval(), transformer.eval(), scheduler, id2label=id2label)


def convert(
    vae: str | os.PathLike,
    var: str | os.PathLike,
    output: str | os.PathLike,
    preset: str | None = None,
    official_config: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> VARPipeline:
    """Convert and save: a new ``output`` appears complete or not at all; an earlier save there is replaced file by
    file, its ``model_index.json`` last (see :meth:`VARPipeline.save_pretrained`).

    ``output`` must be new, empty, or an earlier pipeline save; ``overwrite=True`` writes beside other files there,
    replacing only the pipeline's own (see :meth:`VARPipeline.save_pretrained`). It is checked before the
    checkpoints are read, so a wrong folder fails at once.
    """
    from .saving import check_save_target

    check_save_target(Path(output).absolute(), overwrite)
    if (preset is None) == (official_config is None):
        raise ValueError("Give exactly one of --preset or --official-config.")
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
        official, id2label = PRESETS[preset], imagenet_id2label()
    else:
        try:
            official = json.loads(Path(official_config).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"Could not read --official-config {str(official_config)!r}: {error}") from error
        missing = [k for k in ("vqvae_kwargs", "var_kwargs") if k not in official]
        if missing:
            raise ValueError(f"--official-config {str(official_config)!r} lacks {missing}.")
        num_classes = official["var_kwargs"].get("num_classes", 1000)
        id2label = imagenet_id2label() if num_classes == 1000 else None
    pipeline = build_pipeline(vae, var, official, id2label)
    pipeline.save_pretrained(output, overwrite=overwrite)
    return pipeline


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vae",
        required=True,
        help="the official tokenizer checkpoint, e.g. vae_ch160v4096z32.pth (.pth or .safetensors; required)",
    )
    parser.add_argument(
        "--var",
        required=True,
        help="the official transformer checkpoint, e.g. var_d16.pth (.pth or .safetensors; required)",
    )
    parser.add_argument(
        "--output",
        required=True,
        help="folder to write the pipeline to: new, empty, or an earlier save (see --overwrite; required)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a folder that holds other files; only the pipeline's own files are replaced (default: off)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="the official hyper-parameters of a released model (this or --official-config is required)",
    )
    source.add_argument(
        "--official-config",
        help="JSON with the official vqvae_kwargs and var_kwargs, for other models (this or --preset is required)",
    )


def run(args: argparse.Namespace) -> None:
    convert(
        args.vae,
        args.var,
        args.output,
        preset=args.preset,
        official_config=args.official_config,
        overwrite=args.overwrite,
    )
    print(f"Saved VARPipeline to {args.output}")


def main(argv: list[str] | None = None) -> None:
    """``python -m diffusers_var.convert``: the same as ``diffusers-var convert``."""
    from .cli import command_main

    command_main("convert", argv)


if __name__ == "__main__":
    main()
