"""Evaluation data: prompt/completion or plain-text rows of local files, read with ``datasets``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loramerge.errors import BadInput, brief

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


@dataclass(frozen=True)
class Sample:
    prompt: str  # empty for plain text: then the whole text is scored
    completion: str


def load_samples(
    path: str | Path,
    *,
    text_field: str | None = None,
    prompt_field: str | None = None,
    completion_field: str | None = None,
    max_samples: int | None = None,
) -> list[Sample]:
    """Rows of a local JSONL/JSON/CSV/Parquet/text file read with ``datasets``: prompt/completion pairs, or whole
    texts with ``text_field``. With no field given, the ``prompt`` and ``completion`` columns where the file has
    both, else the ``text`` column (every command reads data files this way)."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"`data` {path}: no such file")
    if path.stat().st_size == 0:
        raise BadInput(f"`data` {path}: the file is empty")
    kind = _FORMATS.get(path.suffix.lower())
    if kind is None:
        raise BadInput(f"`data` {path}: unknown format {path.suffix!r}; use {', '.join(_FORMATS)}")
    if text_field is not None and (prompt_field or completion_field):
        raise BadInput("give either `text_field` (whole texts) or `prompt_field`/`completion_field` (pairs), not both")
    if (prompt_field is None) != (completion_field is None):  # the other one at its default
        prompt_field, completion_field = prompt_field or "prompt", completion_field or "completion"
    import datasets

    # the library never prints: no bar per file, no log line before a caller's table or one-line refusal
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        rows = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as error:  # datasets raises many types for unreadable files
        raise BadInput(f"`data` {path}: cannot read ({brief(error)})") from error
    if text_field is None and prompt_field is None and {"prompt", "completion"} <= set(rows.column_names):
        prompt_field, completion_field = "prompt", "completion"
    fields = [prompt_field, completion_field] if prompt_field else [text_field or "text"]
    for field in fields:
        if field not in rows.column_names:
            raise BadInput(f"`data` {path}: no field {field!r} (fields: {', '.join(rows.column_names)})")
    if max_samples is not None:
        rows = rows.select(range(min(max_samples, len(rows))))
    if prompt_field:
        return [Sample(str(row[prompt_field]), str(row[completion_field])) for row in rows]
    return [Sample("", str(row[fields[0]])) for row in rows]
