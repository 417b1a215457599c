"""A sampling run of ``diffusers-var generate`` that can be split over processes, killed and resumed.

The run's images are cut into batches once, the same way however many processes share it: process ``r`` of ``N``
samples batches ``r, r + N, r + 2N, …``. Each image is therefore computed in the same batch as in a one-process
run (pixels, unlike tokens, depend on the batch they were decoded in), and N processes write byte-identical files.

A work folder records the run: ``settings.json`` (what the run is: a resumed run must be the same run) and one
``done/<batch>`` marker per finished batch, written only after the batch's files. A killed run, started again
with the same command, skips the finished batches. Batches bound for an ``.npz`` or a grid are kept as
``shards/<batch>.npy`` until the main process assembles them in order. When the run is complete, the work folder
goes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .saving import current_umask, write_text_atomically

WORK_FOLDER = ".diffusers-var-generate"


def _differences(previous: dict, current: dict, prefix: str = "") -> list[str]:
    """The (dotted) keys whose values differ, nested settings included: ``["sampling.top_k"]``."""
    changed = []
    for key in sorted(set(previous) | set(current)):
        old, new = previous.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            changed.append(f"{prefix}{key}")
    return changed


class GenerationRun:
    """The batches of one run, which of them are done, and the shards of those bound for an npz or a grid."""

    def __init__(
        self, folder: str | os.PathLike, settings: dict, num_batches: int, overwrite: bool = False, check: bool = True
    ):
        """``check``: compare with a run already recorded there (the main process does; the others wait for it)."""
        self.folder, self.settings, self.num_batches = Path(folder), settings, num_batches
        stored = self.folder / "settings.json"
        if check and stored.is_file():
            previous = json.loads(stored.read_text(encoding="utf-8"))
            if previous != settings and not overwrite:
                changed = _differences(previous, settings)
                raise ValueError(
                    f"{self.folder} records an unfinished run with other settings ({', '.join(changed)} differ), "
                    "which this one would mix with. Rerun that command to finish it, use another output, or "
                    "--overwrite to start over."
                )
            if previous != settings:  # --overwrite: the old run's records are ours to drop
                shutil.rmtree(self.folder)

    def prepare(self) -> None:
        """Create the work folder (main process only, before the others look at it)."""
        (self.folder / "done").mkdir(parents=True, exist_ok=True)
        (self.folder / "shards").mkdir(exist_ok=True)
        if not (self.folder / "settings.json").is_file():
            write_text_atomically(self.folder / "settings.json", json.dumps(self.settings, indent=1) + "\n")

    def is_done(self, batch: int) -> bool:
        return (self.folder / "done" / f"{batch:07d}").is_file()

    def mark_done(self, batch: int, record: dict | None = None) -> None:
        write_text_atomically(self.folder / "done" / f"{batch:07d}", json.dumps(record or {}) + "\n")

    def records(self) -> Iterator[dict]:
        """What each finished batch recorded (e.g. rejection statistics), in batch order."""
        for path in sorted((self.folder / "done").glob("*")):
            yield json.loads(path.read_text(encoding="utf-8"))

    def batches_of(self, rank: int, world_size: int) -> list[int]:
        """The batches process ``rank`` of ``world_size`` samples (done ones included; the caller skips them)."""
        return list(range(rank, self.num_batches, world_size))

    def save_shard(self, batch: int, images: np.ndarray) -> None:
        path = self.folder / "shards" / f"{batch:07d}.npy"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(images, dtype=np.uint8))
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)

    def shards(self) -> Iterator[np.ndarray]:
        """Every batch's images, in batch order (all must be done)."""
        for batch in range(self.num_batches):
            yield np.load(self.folder / "shards" / f"{batch:07d}.npy")

    def missing(self) -> list[int]:
        return [b for b in range(self.num_batches) if not self.is_done(b)]

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
