"""Training checkpoints: written atomically, rotated, and found again for ``--resume_from_checkpoint latest``."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (``checkpoint-<step>``) in step order; folders of interrupted saves are ignored."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m[1]), p) for p in folder.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume_path(output_dir: str | Path, resume_from_checkpoint: str | None) -> Path | None:
    """``latest`` → newest checkpoint in ``output_dir`` (None if there is none); a path must exist."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a checkpoint folder.")
    return path


def checkpoint_step(path: str | Path) -> int:
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{str(path)!r} is not named checkpoint-<step>.")
    return int(match[1])


def save_checkpoint(accelerator, output_dir: str | Path, step: int, total_limit: int | None = None) -> Path:
    """``accelerator.save_state`` into ``checkpoint-<step>`` atomically, then keep at most ``total_limit`` of them.

    Every process calls it: accelerate writes the weights and optimiser from the main process and one RNG state per
    process, all into a hidden temporary folder that the main process renames into place once all have finished.
    """
    output_dir = Path(output_dir)
    target, tmp = output_dir / f"checkpoint-{step}", output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target
