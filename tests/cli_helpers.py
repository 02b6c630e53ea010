"""Running the ``loramerge`` command line in-process, and what a clean refusal looks like."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from loramerge.cli.app import app


def run(*args):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def _line_pattern(line: str) -> re.Pattern[str]:
    """``line`` exactly, where "(…)" stands for any text in parentheses (a library's own words)."""
    return re.compile(".+".join(re.escape(part) for part in line.split("…")))


def assert_clean_failure(result, message: str, output, *, whole_line: bool = False) -> None:
    """Exit code 2, one line on stderr naming the problem (containing ``message``, or being it with
    ``whole_line``), no traceback, no output, no staging leftovers."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    if whole_line:
        assert _line_pattern(message).fullmatch(lines[0]), f"expected {message!r}, got {lines[0]!r}"
    else:
        assert message in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not output.exists()
    assert not list(output.parent.glob(f".{output.name}.*"))
