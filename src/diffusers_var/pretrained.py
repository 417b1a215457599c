"""Models shipped inside the package, loadable by name without the Hub: ``VARPipeline.from_pretrained("var-digits")``,
and ``digits-classifier`` wherever a classifier or feature network is taken.

Each entry of ``BUNDLED_MODELS`` maps a name to a model folder relative to this package (an absolute path works
too, which tests use): a pipeline (``model_index.json``) or a transformers model (``config.json``). setup.py ships
``pretrained/**`` (safetensors, json, md) as package data.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_MODELS: dict[str, str] = {
    "var-digits": "pretrained/var-digits",
    "digits-classifier": "pretrained/digits-classifier",
}


def bundled_model_path(name: str) -> Path:
    """The folder of a bundled model, checked to hold one.

    Example::

        >>> bundled_model_path("var-digits")
        PosixPath('.../site-packages/diffusers_var/pretrained/var-digits')
    """
    if name not in BUNDLED_MODELS:
        raise ValueError(
            f"{name!r} is not a bundled model; the bundled models are {sorted(BUNDLED_MODELS)}. For any other "
            "model, pass its folder or Hub repo id to VARPipeline.from_pretrained."
        )
    path = Path(__file__).resolve().parent / BUNDLED_MODELS[name]
    if not ((path / "model_index.json").is_file() or (path / "config.json").is_file()):
        raise FileNotFoundError(
            f"The bundled model {name!r} is missing from this installation: no model_index.json or config.json in "
            f"{path}. Reinstall diffusers-var from a build that includes it, or pass a model folder instead."
        )
    return path
