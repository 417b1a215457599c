"""Training checkpoints: written atomically with a manifest, rotated, verified, and found again for
``--resume_from_checkpoint latest`` (which steps over damaged ones)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)  # not accelerate's: this also runs outside a training process

_NAME = re.compile(r"^checkpoint-(\d+)$")
_TMP_NAME = re.compile(r"^\.checkpoint-\d+(?:\.replaced)?\.tmp$")
MANIFEST = "checkpoint_manifest.json"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints (``checkpoint-<step>``) in step order; folders of interrupted saves are ignored."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m[1]), p) for p in folder.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(checkpoint: str | Path) -> None:
    """Record the size and SHA-256 of every file of a finished checkpoint, so damage is found before resuming."""
    checkpoint = Path(checkpoint)
    files = {
        str(p.relative_to(checkpoint)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(checkpoint.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (checkpoint / MANIFEST).write_text(json.dumps({"files": files}, indent=1), encoding="utf-8")


def _readable(path: Path) -> None:
    """Open a checkpoint file the way loading will (raises if it is damaged); for checkpoints without a manifest."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:  # checks the header and that the data covers it
            handle.keys()
    elif path.suffix in (".bin", ".pkl", ".pt", ".pth"):
        import torch

        torch.load(path, map_location="cpu", weights_only=False)  # our own checkpoint, as accelerate loads it


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (a missing, truncated or altered file), or None if it is complete."""
    checkpoint = Path(checkpoint)
    manifest = checkpoint / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        except (ValueError, KeyError) as error:
            return f"its {MANIFEST} is unreadable ({error})"
        for name, expected in files.items():
            path = checkpoint / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != expected["size"]:
                return f"{name} has {path.stat().st_size} bytes, {expected['size']} were written"
            if _sha256(path) != expected["sha256"]:
                return f"{name} has changed since it was written (SHA-256 differs)"
        return None
    files = [p for p in sorted(checkpoint.rglob("*")) if p.is_file()]
    if not files:
        return "it is empty"
    for path in files:
        try:
            _readable(path)
        except Exception as error:  # safetensors, zip and pickle readers raise many types for damaged files
            return f"{path.relative_to(checkpoint)} cannot be read ({type(error).__name__}: {error})"
    return None


def resolve_resume_path(output_dir: str | Path, resume_from_checkpoint: str | None) -> Path | None:
    """``latest`` → newest complete checkpoint in ``output_dir`` (None if there is none); a path must exist.

    Damaged checkpoints (see :func:`checkpoint_problem`) are skipped with a warning naming them; if every checkpoint
    is damaged, or an explicitly named one is, a ValueError says which file and why.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        damaged = []
        for checkpoint in reversed(checkpoints):
            problem = checkpoint_problem(checkpoint)
            if problem is None:
                return checkpoint
            logger.warning(f"Skipping damaged checkpoint {checkpoint}: {problem}. Trying the previous one.")
            damaged.append(f"{checkpoint.name} ({problem})")
        if damaged:
            raise ValueError(
                f"Every checkpoint in {output_dir} is damaged: {'; '.join(damaged)}. Remove them to start over, or "
                "point --resume_from_checkpoint at a good copy."
            )
        return None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a checkpoint folder.")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(
            f"Checkpoint {path} is damaged: {problem}. Resume from an earlier checkpoint, or use 'latest' to take "
            "the newest complete one."
        )
    return path


def checkpoint_step(path: str | Path) -> int:
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{str(path)!r} is not named checkpoint-<step>.")
    return int(match[1])


def save_checkpoint(accelerator, output_dir: str | Path, step: int, total_limit: int | None = None) -> Path:
    """``accelerator.save_state`` into ``checkpoint-<step>`` atomically, then keep at most ``total_limit`` of them.

    Every process calls it: accelerate writes the weights and optimiser from the main process and one RNG state per
    process, all into a hidden temporary folder that the main process completes with a manifest (sizes and
    SHA-256 of every file) and renames into place once all have finished. Temporary folders that killed saves left
    behind are removed.
    """
    output_dir = Path(output_dir)
    target, tmp = output_dir / f"checkpoint-{step}", output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in output_dir.iterdir():
            if stale.is_dir() and _TMP_NAME.match(stale.name):
                shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_manifest(tmp)
        replaced = None
        if target.exists():  # e.g. a damaged checkpoint of an earlier attempt: swapped out, then removed
            replaced = output_dir / f".checkpoint-{step}.replaced.tmp"
            shutil.rmtree(replaced, ignore_errors=True)
            target.rename(replaced)
        tmp.rename(target)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        if total_limit is not None:
            # only earlier steps rotate out: the checkpoint just written always stays, and later ones (a damaged
            # checkpoint that `latest` stepped over, or an abandoned run's) are left for the user to judge
            earlier = [c for c in list_checkpoints(output_dir) if checkpoint_step(c) < step]
            for old in earlier[: max(len(earlier) - (total_limit - 1), 0)]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target
