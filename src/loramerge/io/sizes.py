"""Sizes in bytes as people write them (``5GB``, ``500MB``, ``2GiB``) and read them; no torch, so the command
line can parse and print sizes before the library loads."""

from __future__ import annotations

from loramerge.errors import BadInput

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count."""
    if isinstance(text, int):
        return text
    cleaned = text.strip().upper().replace(" ", "")
    for unit in sorted(_UNITS, key=len, reverse=True):
        if cleaned.endswith(unit):
            number = cleaned[: -len(unit)]
            break
    else:
        number, unit = cleaned, "B"
    try:
        size = int(float(number) * _UNITS[unit])
    except ValueError:
        raise BadInput(f"cannot read size {text!r}; write it like 5GB or 500MB") from None
    if size <= 0:
        raise BadInput(f"size must be positive, got {text!r}")
    return size


def human_bytes(count: float) -> str:
    """A size as people read it (decimal units, as ``parse_size`` takes them)."""
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1000
    return f"{count:.1f} GB"
