"""Atomic output folders: written beside the target under a temporary name, renamed when complete.

A run killed outright (SIGKILL, power loss) cannot clean up; its staging folder carries its process id,
and the next run for the same target removes staging folders whose process is gone.

Every finished folder holds a marker (``MARKER_NAME``) listing what loramerge wrote there: ``force`` may
replace an empty folder or one whose every entry loramerge wrote, never anything else. Files and folders
get the modes ``cp`` would give them under the process's umask (the staging folder's private mode and
safetensors' private files must not leak into the output).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from loramerge.errors import BadInput

TMP_SUFFIX = ".loramerge-tmp"
MARKER_NAME = ".loramerge.json"
# folders written before the marker existed: recognised by loramerge's model card and only these names
_CARD_SIGNATURE = "(https://github.com/loramerge/loramerge)"
_LEGACY_NAMES = {"README.md", "adapter_config.json", "adapter_model.safetensors", "config.json",
                 "generation_config.json", "model.safetensors.index.json", "loramerge_recipe.yml",
                 "loramerge_moe.yml", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
                 "tokenizer.model", "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json"}  # fmt: skip


def _entries(folder: Path) -> set[str]:
    """Every file and folder under ``folder``, as POSIX paths relative to it."""
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*")}


def _legacy_name(name: str) -> bool:
    return name in _LEGACY_NAMES or (name.startswith("model") and name.endswith(".safetensors") and "/" not in name)


def _written_by_loramerge(folder: Path) -> set[str]:
    """What in ``folder`` loramerge did not write (empty: the folder may be replaced)."""
    entries = _entries(folder)
    marker = folder / MARKER_NAME
    if marker.is_file():
        try:
            written = set(json.loads(marker.read_text())["files"])
        except (OSError, ValueError, KeyError, TypeError):
            return entries
        return entries - written - {MARKER_NAME}
    card = folder / "README.md"
    if entries and card.is_file() and _CARD_SIGNATURE in card.read_text(errors="replace"):
        return {name for name in entries if not _legacy_name(name)}
    return entries


def _not_ours_message(target: Path, foreign: set[str]) -> str:
    shown = ", ".join(sorted(foreign)[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
    return (
        f"output {target} holds files loramerge did not write ({shown}); `force=True` only replaces an empty "
        "folder or one loramerge wrote: choose another output folder or remove them yourself"
    )


def check_output_target(target: Path, force: bool, inputs: list[Path] = ()) -> Path:
    """Refuse an output that exists (without ``force``), is a file, or would overwrite an input. Inputs
    that are no local path (a Hub id, a ``pkg:`` reference) cannot be overwritten and are passed over."""
    target = Path(target).absolute()
    for source in inputs:
        source = Path(source).absolute()
        if not source.exists():
            continue
        if target == source or source in target.parents or target in source.parents:
            raise BadInput(f"output {target} overlaps the input {source}; choose another output folder")
    if target.exists() and not target.is_dir():
        raise BadInput(f"output {target} exists and is not a folder")
    if target.exists() and not force:
        raise BadInput(f"output {target} already exists; pass `force=True` to replace it")
    if target.is_dir() and (foreign := _written_by_loramerge(target)):
        raise BadInput(_not_ours_message(target, foreign))
    return target


def check_not_an_input(target: Path, inputs: list[Path]) -> None:
    """An output file may not be one of the inputs (a base, an adapter file, or inside an adapter folder)."""
    for source in inputs:
        source = Path(source).absolute()
        if source.exists() and (target.resolve() == source.resolve() or source in target.parents):
            raise BadInput(f"output {target} overlaps the input {source}; choose another output file")


def check_output_file(
    target: Path,
    force: bool,
    inputs: list[Path],
    *,
    suffix: str,
    what: str,
    ours: str,
    written_by_loramerge: Callable[[Path], bool],
    ignore_case: bool = False,
) -> Path:
    """A one-file output (``what``, named ``*suffix``): refused where it is an input, misnamed, a folder, existing
    without ``force``, or existing and not written by loramerge (``ours`` names what loramerge writes)."""
    target = Path(target).absolute()
    check_not_an_input(target, inputs)
    if (target.suffix.lower() if ignore_case else target.suffix) != suffix:
        raise BadInput(f"output {target}: a {what} is one file named *{suffix}")
    if target.is_dir():
        raise BadInput(f"output {target} is a folder; a {what} is one file")
    if target.exists() and not force:
        raise BadInput(f"output {target} already exists; pass `force=True` to replace it")
    if target.exists() and not written_by_loramerge(target):
        raise BadInput(f"output {target} is not a {ours} loramerge wrote; `force=True` replaces only those")
    if not target.parent.is_dir():
        raise BadInput(f"output {target}: no such folder {target.parent}")
    return target


@contextmanager
def atomic_output_file(target: Path) -> Iterator[Path]:
    """A staging path beside ``target``; renamed onto it when the block succeeds, removed in every case."""
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        yield staging
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_modes(folder: Path, umask: int) -> None:
    """Give ``folder`` and everything in it the modes a new file or folder gets under ``umask`` (``cp``'s)."""
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_marker(folder: Path) -> None:
    """Record what loramerge wrote into ``folder`` (read back by ``force``)."""
    from loramerge import __version__

    files = sorted(_entries(folder) - {MARKER_NAME})
    record = {"written_by": "loramerge", "version": __version__, "files": files}
    (folder / MARKER_NAME).write_text(json.dumps(record, indent=1) + "\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_staging(target: Path) -> list[Path]:
    """Delete the staging folders of ``target`` left by runs that died; returns what was removed. A run
    killed between retiring the previous output and renaming its own into place left that previous
    output in a retired folder: it is put back first."""
    removed = []
    for folder in sorted(target.parent.glob(f".{target.name}.*{TMP_SUFFIX}")):
        pid = folder.name.removeprefix(f".{target.name}.").split(".")[0]
        if not folder.is_dir() or not pid.isdigit() or _alive(int(pid)):
            continue
        retired = folder / target.name
        if retired.is_dir() and not target.exists():
            retired.rename(target)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


@contextmanager
def atomic_output_dir(target: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces ``target``, on failure it is removed."""
    target = check_output_target(Path(target), force)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    prefix = f".{target.name}.{os.getpid()}."
    staging = Path(tempfile.mkdtemp(prefix=prefix, suffix=TMP_SUFFIX, dir=target.parent))
    try:
        yield staging
        write_marker(staging)
        publish_modes(staging, current_umask())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        retired = Path(tempfile.mkdtemp(prefix=f"{prefix}old.", suffix=TMP_SUFFIX, dir=target.parent))
        target.rename(retired / target.name)
        staging.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(target)
