"""Atomic output folders: written beside the target under a temporary name, renamed when complete.

A run killed outright (SIGKILL, power loss) cannot clean up; its staging folder carries its process id,
and the next run for the same target removes staging folders whose process is gone.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loramerge.errors import BadInput

TMP_SUFFIX = ".loramerge-tmp"


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
    return target


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
