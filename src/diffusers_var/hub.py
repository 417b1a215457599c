"""The Hub and model cards: snapshot download, cards, upload, and saving into a training run's folder."""

from __future__ import annotations

import logging
import os
import tempfile
from importlib import resources
from pathlib import Path

import huggingface_hub
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.constants import HF_HUB_OFFLINE
from huggingface_hub.errors import LocalEntryNotFoundError

from .saving import (  # noqa: F401  (atomic_directory and normal_permissions were first importable from here)
    atomic_directory,
    current_umask,
    install_adapter_save,
    install_model_save,
    install_pipeline_save,
    normal_permissions,
    save_folder,
)

logger = logging.getLogger(__name__)


def save_pretrained_into(pretrained, folder: str | os.PathLike, card: ModelCard | None = None) -> None:
    """Write a pipeline or model (and its card as README.md) into a training run's ``folder``, keeping its other files.

    The folder also holds checkpoints and logs: only the files a pipeline (or model, or adapter) folder consists of
    are replaced, the entry point (``model_index.json``, ``config.json`` or ``adapter_config.json``) last, so a
    loader never finds it pointing at missing weights (see :mod:`diffusers_var.saving`). The card replaces a
    README.md only if we wrote that one too.
    """
    from diffusers import DiffusionPipeline

    if isinstance(pretrained, DiffusionPipeline):  # the library's own save; ours would stage a second time
        from .pipelines.var import check_no_adapters

        check_no_adapters(pretrained)
        write, install = (lambda staged: DiffusionPipeline.save_pretrained(pretrained, staged)), install_pipeline_save
    elif getattr(pretrained, "peft_config", None):  # a model with adapters saves the adapter (adapter_config.json)
        write, install = (lambda staged: pretrained.save_pretrained(staged)), install_adapter_save
    else:
        write, install = (lambda staged: pretrained.save_pretrained(staged)), install_model_save
    save_folder(write, folder, install, overwrite=True)
    if card is not None:
        save_card(card, Path(folder) / "README.md")


def _is_our_card(path: Path) -> bool:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return text.startswith("---") and "- diffusers-var" in text.split("---", 2)[1]


def save_card(card: ModelCard, path: Path) -> bool:
    """Write ``card`` to ``path`` atomically, unless a README of someone else's is there (then warn and skip)."""
    if path.exists() and not _is_our_card(path):
        logger.warning(f"Not writing the model card: {path} exists and was not written by diffusers-var.")
        return False
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        card.save(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def download_snapshot(repo_id: str, **kwargs) -> str:
    """Resolve a Hub repo id to a local snapshot folder, honouring the usual diffusers loading options."""
    ignore = kwargs.get("ignore_patterns")
    if ignore is None and kwargs.get("use_safetensors") is not False:
        ignore = ["*.bin", "*.pth", "*.ckpt", "*.msgpack", "*.onnx"]
    try:
        return huggingface_hub.snapshot_download(
            repo_id,
            revision=kwargs.get("revision"),
            cache_dir=kwargs.get("cache_dir"),
            force_download=kwargs.get("force_download", False),
            token=kwargs.get("token"),
            local_files_only=kwargs.get("local_files_only") or HF_HUB_OFFLINE,
            allow_patterns=kwargs.get("allow_patterns"),
            ignore_patterns=ignore,
            library_name="diffusers-var",
        )
    except LocalEntryNotFoundError as error:  # its own message does not say which repo
        raise LocalEntryNotFoundError(
            f"Cannot load {repo_id!r} (revision {kwargs.get('revision') or 'main'}): it is not in the local Hugging "
            f"Face cache and could not be downloaded. {error}"
        ) from error


def card_template(name: str) -> str:
    """Text of the model card template ``model_cards/<name>.md``."""
    folder = resources.files("diffusers_var").joinpath("model_cards")
    path = folder.joinpath(f"{name}.md")
    if not path.is_file():
        available = sorted(p.name[:-3] for p in folder.iterdir() if p.name.endswith(".md"))
        raise ValueError(f"No model card template {name!r}; available: {available}.")
    return path.read_text(encoding="utf-8")


def make_model_card(
    pipeline, template: str = "var", card_data: dict | None = None, remote_code: bool = False
) -> ModelCard:
    """Fill a card template with the pipeline's configuration; ``card_data`` adds or overrides fields. With
    ``remote_code``, the card also says how to load the repo without diffusers-var."""
    transformer, vqvae = pipeline.transformer.config, pipeline.vqvae.config
    fields = {
        "model_name": "VAR",
        "depth": transformer.depth,
        "embed_dim": transformer.embed_dim,
        "num_classes": transformer.num_classes,
        "vocab_size": vqvae.vocab_size,
        "z_channels": vqvae.z_channels,
        "patch_nums": tuple(vqvae.patch_nums),
        "image_size": pipeline.vqvae.image_size,
        "num_parameters": sum(p.numel() for p in pipeline.transformer.parameters()),
        "repo_id": "path/to/this-model",
        "retrieval": (
            f"attends to {transformer.num_neighbours} retrieved neighbours (`VARRetrievalPipeline`, "
            "`diffusers-var generate --datastore`)"
            if getattr(transformer, "num_neighbours", 0)
            else "none"
        ),
        "objective": "teacher-forced cross-entropy",
    }
    fields.update(card_data or {})
    metadata = ModelCardData(
        library_name="diffusers",
        license=fields.get("license", "mit"),
        pipeline_tag="unconditional-image-generation",
        tags=["diffusers-var", "var", "class-conditional", "image-generation"],
    )
    text = card_template(template).format(**fields)
    if remote_code:
        text += REMOTE_CODE_CARD_SECTION.format(**fields)
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n{text}")


REMOTE_CODE_CARD_SECTION = """
## Without installing diffusers-var

This repo carries its code (generated by diffusers-var), so diffusers and transformers alone can load it:

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True)
```
"""


def make_vqvae_card(vqvae, card_data: dict | None = None) -> ModelCard:
    """The card of a tokenizer trained with ``examples/train_vqvae.py`` (template ``vqvae-trained``)."""
    config = vqvae.config
    fields = {
        "model_name": "MultiScaleVQVAE",
        "ch": config.ch,
        "ch_mult": tuple(config.ch_mult),
        "vocab_size": config.vocab_size,
        "z_channels": config.z_channels,
        "patch_nums": tuple(config.patch_nums),
        "image_size": vqvae.image_size,
        "num_parameters": sum(p.numel() for p in vqvae.parameters()),
        "repo_id": "path/to/this-model",
    }
    fields.update(card_data or {})
    metadata = ModelCardData(
        library_name="diffusers",
        license=fields.get("license", "mit"),
        tags=["diffusers-var", "var", "vqvae", "tokenizer"],
    )
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n{card_template('vqvae-trained').format(**fields)}")


def make_lora_card(pipeline, card_data: dict) -> ModelCard:
    """The card of a LoRA adapter trained with ``train_var.py --lora_rank`` (template ``var-lora``)."""
    fields = {
        "model_name": "VAR LoRA",
        "num_parameters": sum(p.numel() for p in pipeline.transformer.parameters()),
        "repo_id": "path/to/this-adapter",
        **card_data,
    }
    fields["trainable_percent"] = 100 * fields["trainable_parameters"] / fields["num_parameters"]
    metadata = ModelCardData(
        library_name="peft",
        license=fields.get("license", "mit"),
        base_model=fields["base_model"],
        tags=["diffusers-var", "var", "lora", "class-conditional", "image-generation"],
    )
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n{card_template('var-lora').format(**fields)}")


def upload_pretrained(
    pretrained,
    repo_id,
    make_card,
    commit_message=None,
    private=None,
    token=None,
    create_pr=False,
    save_kwargs: dict | None = None,
    extra_files: dict[str, str] | None = None,
) -> str:
    """Save a pipeline or model (``save_kwargs`` go to its ``save_pretrained``) with the card ``make_card(repo_id)``
    and ``extra_files`` (name → text) to a temporary folder and upload it as one commit; returns the commit URL."""
    api = huggingface_hub.HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "upload"
        pretrained.save_pretrained(folder, **(save_kwargs or {}))
        make_card(repo_id).save(folder / "README.md")
        for name, text in (extra_files or {}).items():
            (folder / name).write_text(text, encoding="utf-8")
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or f"Upload {type(pretrained).__name__}",
            create_pr=create_pr,
        )
    return str(commit)


def push_pipeline_to_hub(
    pipeline, repo_id, commit_message, private, token, create_pr, template, card_data, remote_code: bool = False
) -> str:
    """Upload a pipeline with a card from ``model_cards/<template>.md``; returns the commit URL. ``remote_code``
    uploads the code as well (and the card says how to load it without diffusers-var)."""
    card_data = dict(card_data or {})
    return upload_pretrained(
        pipeline,
        repo_id,
        lambda resolved: make_model_card(pipeline, template, {"repo_id": resolved, **card_data}, remote_code),
        commit_message,
        private,
        token,
        create_pr,
        save_kwargs={"remote_code": True} if remote_code else None,
    )


def load_vqvae(name_or_path: str | os.PathLike, **kwargs):
    """A MultiScaleVQVAE from a tokenizer folder, a pipeline folder (its ``vqvae/``), or a Hub repo id of either."""
    from .models.vqvae import MultiScaleVQVAE

    path = Path(name_or_path)
    if not path.is_dir():
        path = Path(download_snapshot(str(name_or_path), **kwargs))
    if (path / "vqvae" / "config.json").is_file():
        path = path / "vqvae"
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{str(name_or_path)!r} holds neither a MultiScaleVQVAE (config.json) nor a pipeline's vqvae/."
        )
    return MultiScaleVQVAE.from_pretrained(path)
