"""Resolving a reference to a local folder: the folder itself, or a Hub repo id fetched with
``huggingface_hub.snapshot_download`` (only the files the caller needs)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from loramerge.errors import BadInput, brief

_HUB_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")


def resolve_folder(ref: str | Path, kind: str, expected: str, allow_patterns: Sequence[str]) -> Path:
    """``kind`` (``adapter``, ``model``) and ``expected`` (what the folder holds) name it in errors."""
    path = Path(ref)
    if path.is_dir():
        return path
    if path.exists():
        raise BadInput(f"{kind} {ref}: is a file, expected {expected}")
    if not _HUB_ID.match(str(ref)):
        raise BadInput(f"{kind} {ref}: no such folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(ref), allow_patterns=list(allow_patterns)))
    except Exception as error:  # the hub client raises many types; all mean "could not fetch"
        raise BadInput(f"{kind} {ref}: no such folder, and not fetched from the Hub ({brief(error)})") from error
