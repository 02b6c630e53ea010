"""Atomic output folders: written beside the target under a temporary name, renamed when complete."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loramerge.errors import BadInput

TMP_SUFFIX = ".loramerge-tmp"


def check_output_target(target: Path, force: bool, inputs: list[Path] = ()) -> Path:
    """Refuse an output that exists (without ``force``), is a file, or would overwrite an input."""
    target = Path(target).absolute()
    for source in inputs:
        source = Path(source).absolute()
        if target == source or source in target.parents or target in source.parents:
            raise BadInput(f"output {target} overlaps the input {source}; choose another output folder")
    if target.exists() and not target.is_dir():
        raise BadInput(f"output {target} exists and is not a folder")
    if target.exists() and not force:
        raise BadInput(f"output {target} already exists; pass --force to replace it")
    return target


@contextmanager
def atomic_output_dir(target: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces ``target``, on failure it is removed."""
    target = check_output_target(Path(target), force)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TMP_SUFFIX, dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", suffix=TMP_SUFFIX, dir=target.parent))
        target.rename(retired / target.name)
        staging.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(target)
