"""Saving into folders without losing anyone's files.

Two rules hold for everything this package writes:

- **Nothing it did not write is deleted, moved or overwritten.** A pipeline save goes into a new folder, an empty
  one, or one that holds a previous save of ours (beside ``README.md``, ``.gitattributes`` and ``.git``, so a
  cloned Hub repo works). Anything else there is refused unless the caller passes ``overwrite=True``, and even
  then only the files a pipeline folder consists of are replaced; the rest stays.
- **A reader never sees half a save.** Everything is written to a hidden staging folder first. A new folder
  appears in one rename. In an existing folder the entry point (``model_index.json`` / ``config.json``) is taken
  away first and put back last, so a loader finds the old save, no save, or the complete new one.

Staging folders carry a marker file that their writer holds locked from before the folder gets its public name;
the next save to the same place removes the ones whose writer died (a killed ``convert``), and no others.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: staging folders of dead writers are then left for the user to remove
    fcntl = None

logger = logging.getLogger(__name__)

STAGING_MARKER = ".diffusers-var-staging"
_INSIDE_PREFIX = ".diffusers-var-tmp-"
_INIT_PREFIX = ".diffusers-var-init-"  # a staging folder's name until its marker is locked
# what a previous pipeline save may sit beside: a cloned Hub repo
PIPELINE_NEIGHBOURS = frozenset({"README.md", ".gitattributes", ".git"})
PIPELINE_INDEX = "model_index.json"
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIGS = frozenset({"config.json", "scheduler_config.json", ADAPTER_CONFIG})
# the weight files diffusers, transformers and PEFT write (single, sharded, or a shard index), and nothing else: a
# user's own `ema_backup.safetensors` or `training_args.bin` is never taken for ours
_STEMS = r"(?:diffusion_pytorch_model|pytorch_model|model|adapter_model)"
_WEIGHTS = re.compile(rf"^{_STEMS}(?:\.(?P<variant>\w+))?(?:-\d{{5}}-of-\d{{5}})?\.(?:safetensors|bin)$")
_WEIGHTS_INDEX = re.compile(rf"^{_STEMS}\.(?:safetensors|bin)\.index(?:\.(?P<variant>\w+))?\.json$")


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (setting it to read it would briefly make
    other threads' new files world-writable)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o077)  # elsewhere: read it by setting it, briefly to the most private value
    os.umask(umask)
    return umask


def normal_permissions(folder: str | os.PathLike) -> None:
    """Give every file and folder under ``folder`` the permissions a plain new one gets under the umask.

    Temporary files are private (0600) and diffusers 0.42 writes its safetensors that way; a saved model should
    read like any other file, e.g. in a shared cache or a package.
    """
    umask = current_umask()
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temporary file and a rename: a reader sees the old content or the new."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def claim_recipe_folder(work: Path, defining: dict, marker_name: str = "recipe_arguments.json") -> None:
    """Make ``work`` a recipe run's folder: new or empty, or made by the same recipe with the same ``defining``
    arguments (the run then resumes). Anything else is refused with a one-line ``SystemExit``, so that no one's files
    are overwritten and no step made with other arguments is reused. ``marker_name`` records ``defining``."""
    work = Path(work)
    marker = work / marker_name
    if marker.is_file():
        recorded = json.loads(marker.read_text())
        changed = {k: (recorded.get(k), v) for k, v in defining.items() if recorded.get(k) != v}
        if changed:
            described = ", ".join(f"{k}: {old!r} → {new!r}" for k, (old, new) in changed.items())
            raise SystemExit(f"error: {work} holds a run with other arguments ({described}); use a new --output-dir.")
        return
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"error: {work} is not empty and was not made by this recipe; use a new --output-dir.")
    work.mkdir(parents=True, exist_ok=True)
    write_text_atomically(marker, json.dumps(defining, indent=2) + "\n")


# -- staging folders -----------------------------------------------------------------------------------------------


def _writer_is_alive(folder: Path) -> bool:
    """True unless ``folder``'s marker can be locked, i.e. the process that wrote it has ended."""
    marker = folder / STAGING_MARKER
    if fcntl is None or not marker.is_file():
        return fcntl is None  # without locks, never assume a writer is gone
    with open(marker, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def _is_save_file(name: str) -> bool:
    from .remote_code import REMOTE_FILES

    return (
        name in MODEL_CONFIGS
        or name == PIPELINE_INDEX
        or name in REMOTE_FILES
        or bool(_WEIGHTS.match(name) or _WEIGHTS_INDEX.match(name))
    )


def remove_stale_staging(target: Path) -> None:
    """Remove the staging folders that killed saves to ``target`` left, in ``target`` and beside it: those whose
    marker's lock died with their writer. Unmarked look-alikes (an older version's, or a user's) are left alone."""
    candidates = []
    if target.parent.is_dir():
        candidates += [p for p in target.parent.glob(f".{glob.escape(target.name)}.tmp-*") if p.is_dir()]
        candidates += [p for p in target.parent.glob(f"{_INIT_PREFIX}*") if p.is_dir()]
    if target.is_dir():
        candidates += [p for p in target.glob(f"{_INSIDE_PREFIX}*") if p.is_dir()]
    for folder in candidates:
        if (folder / STAGING_MARKER).is_file():
            if not _writer_is_alive(folder):
                shutil.rmtree(folder, ignore_errors=True)
        elif folder.name.startswith(_INIT_PREFIX) and not any(folder.iterdir()):
            folder.rmdir()  # a writer killed before it could even mark it
        else:
            logger.warning(f"{folder} looks like a staging folder left by an older diffusers-var; remove it if it is "
                           "not yours.")  # fmt: skip


@contextlib.contextmanager
def staging_folder(parent: Path, prefix: str) -> Iterator[Path]:
    """A hidden folder ``<prefix>…`` in ``parent``, marked as ours and locked while this context runs, then removed.

    It is made under a private name and renamed to its public one only once the marker is locked, so a concurrent
    save's clean-up never finds a folder of ours that it could take for a dead writer's.
    """
    private = Path(tempfile.mkdtemp(prefix=_INIT_PREFIX, dir=parent))
    # mkdtemp makes it private; renamed into place, it should look like any new folder
    os.chmod(private, 0o777 & ~current_umask())
    marker = open(private / STAGING_MARKER, "w")
    path = parent / f"{prefix}{private.name[len(_INIT_PREFIX) :]}"
    try:
        if fcntl is not None:
            fcntl.flock(marker, fcntl.LOCK_EX)
        marker.write(str(os.getpid()))
        marker.flush()
        os.rename(private, path)
        yield path
    finally:
        marker.close()
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)


def _unmark(folder: Path) -> None:
    (folder / STAGING_MARKER).unlink(missing_ok=True)


# -- what a folder holds ---------------------------------------------------------------------------------------------


def _read_index(folder: Path) -> dict | None:
    try:
        return json.loads((folder / PIPELINE_INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _our_components(index: dict | None) -> list[str]:
    """The component folders of a ``model_index.json`` written by a diffusers-var pipeline; [] for anyone else's."""
    if not isinstance(index, dict):
        return []
    components = {
        name: value
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] is not None
    }
    from .remote_code import REMOTE_MODULES

    ours = any(
        str(library).split(".")[0] == "diffusers_var" or library in REMOTE_MODULES for library, _ in components.values()
    )
    return sorted(components) if ours else []


def foreign_entries(folder: Path) -> list[str]:
    """What in ``folder`` is not part of a previous diffusers-var pipeline save (or its allowed neighbours)."""
    from .remote_code import REMOTE_FILES

    components = _our_components(_read_index(folder))
    allowed = set(PIPELINE_NEIGHBOURS) | set(components) | ({PIPELINE_INDEX, *REMOTE_FILES} if components else set())
    foreign = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(_INSIDE_PREFIX) and (entry / STAGING_MARKER).is_file():
            continue
        if entry.name not in allowed:
            foreign.append(entry.name + ("/" if entry.is_dir() else ""))
        elif entry.name in components:
            if not entry.is_dir():
                foreign.append(entry.name)
                continue
            foreign += [
                str(path.relative_to(folder)) + ("/" if path.is_dir() else "")
                for path in sorted(entry.iterdir())
                if not (path.is_file() and _is_save_file(path.name))
            ]
    return foreign


def _describe(entries: list[str], limit: int = 5) -> str:
    shown = ", ".join(entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def check_save_target(target: Path, overwrite: bool, what: str = "a VARPipeline") -> None:
    """Raise a ValueError if saving ``what`` to ``target`` could lose something that is not ours."""
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file, not a folder. Choose a folder name to save {what} into.")
    if target.is_dir() and not overwrite:
        foreign = foreign_entries(target)
        if foreign:
            raise ValueError(
                f"{target} already holds files that are not {what} save: {_describe(foreign)}. Save to a new or "
                "empty folder, or pass overwrite=True (--overwrite on the command line): then only the files a "
                "pipeline folder consists of are replaced, and everything else stays."
            )


# -- putting a staged save in place ----------------------------------------------------------------------------------


def _stale_weights(folder: Path, variant: str | None, any_variant: bool = False) -> list[Path]:
    """The library-named weight files and shard indexes in ``folder`` of ``variant`` (``None``: the plain weights),
    or of every variant: what a new save of that variant replaces (the other variants stay, as in diffusers and
    transformers; unlike them, a stale single file or shard set of the same variant goes too, so a loader cannot
    find the old weights beside the new ones)."""
    stale = []
    for path in folder.iterdir() if folder.is_dir() else []:
        match = path.is_file() and (_WEIGHTS.match(path.name) or _WEIGHTS_INDEX.match(path.name))
        if match and (any_variant or match["variant"] == variant):
            stale.append(path)
    return stale


def _replace_files(new: Path, target: Path, variant: str | None, trash: Path, last: str | None = None) -> None:
    """Move the files of ``new`` into ``target`` (all but ``last``); stale weights of ours go to ``trash``."""
    target.mkdir(exist_ok=True)
    trash.mkdir(parents=True, exist_ok=True)
    new_names = {p.name for p in new.iterdir()}
    for path in _stale_weights(target, variant):
        if path.name not in new_names:
            os.replace(path, trash / path.name)
    for path in sorted(new.iterdir()):
        if path.name != last:
            os.replace(path, target / path.name)


def _withdraw(path: Path, trash: Path) -> None:
    """Take an entry point (``model_index.json``, ``config.json``) away, so no loader starts while files move."""
    if path.is_file():
        os.replace(path, trash / f"withdrawn-{path.name}")


def install_pipeline_save(staged: Path, target: Path, variant: str | None, trash: Path) -> None:
    """Move a staged pipeline save into the existing folder ``target``, ``model_index.json`` last.

    Components of an earlier save of ours that the new one lacks lose their save files (their folder goes if it is
    then empty); files that are not save files are never touched.
    """
    old_components = _our_components(_read_index(target))
    new_components = sorted(p.name for p in staged.iterdir() if p.is_dir())
    for name in new_components:
        if (target / name).exists() and not (target / name).is_dir():
            raise ValueError(f"{target / name} is a file where the pipeline's {name}/ folder goes. Move it away.")
    from .remote_code import REMOTE_FILES

    _withdraw(target / PIPELINE_INDEX, trash)
    for name in new_components:
        for stale in REMOTE_FILES:  # generated code of an earlier remote_code save that this one lacks
            if (target / name / stale).is_file() and not (staged / name / stale).exists():
                (trash / name).mkdir(parents=True, exist_ok=True)
                os.replace(target / name / stale, trash / name / f"code-{stale}")
        _replace_files(staged / name, target / name, variant, trash / name)
    for name in REMOTE_FILES:  # the root's generated code: replaced, added or, if this save has none, removed
        if (staged / name).is_file():
            os.replace(staged / name, target / name)
        elif (target / name).is_file() and old_components:
            os.replace(target / name, trash / f"code-{name}")
    for name in sorted(set(old_components) - set(new_components)):
        folder, bin_ = target / name, trash / name
        bin_.mkdir(parents=True, exist_ok=True)
        for path in _stale_weights(folder, None, any_variant=True) + [
            folder / c for c in MODEL_CONFIGS if (folder / c).is_file()
        ]:
            os.replace(path, bin_ / path.name)
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if nothing else is in it
    os.replace(staged / PIPELINE_INDEX, target / PIPELINE_INDEX)


def install_model_save(
    staged: Path, target: Path, variant: str | None, trash: Path, entry: str = "config.json"
) -> None:
    """Move a staged model save (``entry`` and weights at the top) into ``target``, ``entry`` last."""
    _withdraw(target / entry, trash)
    _replace_files(staged, target, variant, trash / "model", last=entry)
    os.replace(staged / entry, target / entry)


def install_adapter_save(staged: Path, target: Path, variant: str | None, trash: Path) -> None:
    """Move a staged PEFT adapter save (``adapter_config.json``, ``adapter_model.safetensors``) into ``target``."""
    install_model_save(staged, target, variant, trash, entry=ADAPTER_CONFIG)


def save_folder(
    write: Callable[[Path], None],
    target: str | os.PathLike,
    install: Callable[[Path, Path, str | None, Path], None],
    variant: str | None = None,
    overwrite: bool = False,
    what: str = "a VARPipeline",
) -> None:
    """Run ``write(folder)`` into a staging folder, then put the result at ``target`` (see the module docstring).

    A new ``target`` appears in one rename. An existing one must hold nothing but an earlier save of ours unless
    ``overwrite`` (:func:`check_save_target`), and gets the new files through ``install`` (one of
    :func:`install_pipeline_save`, :func:`install_model_save` or :func:`install_adapter_save`). If ``write`` fails,
    ``target`` is untouched; if moving the files in fails (a full disk, a kill), the entry point that was taken away
    is put back and the error raised: the folder may then mix old and new files until the next save.
    """
    target = Path(target).absolute()
    remove_stale_staging(target)
    check_save_target(target, overwrite, what)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with staging_folder(target.parent, f".{target.name}.tmp-") as staging:
            write(staging)
            normal_permissions(staging)
            # fails rather than replace a non-empty folder that someone made meanwhile (an empty one is replaced)
            os.rename(staging, target)
            _unmark(target)
        return
    with staging_folder(target, _INSIDE_PREFIX) as staging:
        staged, trash = staging / "save", staging / "replaced"
        trash.mkdir()
        write(staged)
        normal_permissions(staged)
        try:
            install(staged, target, variant, trash)
        except BaseException:
            for withdrawn in trash.glob("withdrawn-*"):  # the old entry point goes back; nothing of it is lost
                original = target / withdrawn.name[len("withdrawn-") :]
                if not original.exists():
                    os.replace(withdrawn, original)
            raise


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, replace_existing: bool = False) -> Iterator[str]:
    """Yield a staging folder that becomes the folder ``target`` in one rename, or is removed on error.

    ``target`` must not exist, unless ``replace_existing``: for callers that checked that the existing folder is
    one they wrote. It is then swapped out only once the new one is complete, and removed.
    """
    target = Path(target).absolute()
    if target.exists() and not replace_existing:
        raise ValueError(f"{target} already exists; choose a new folder.")
    remove_stale_staging(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    replaced = None
    with staging_folder(target.parent, f".{target.name}.tmp-") as staging:
        yield str(staging)
        normal_permissions(staging)
        if target.exists():
            replaced = staging.with_name(staging.name + ".replaced")
            os.rename(target, replaced)
        os.rename(staging, target)
        _unmark(target)
    if replaced is not None:
        shutil.rmtree(replaced)
