"""Running the ``loramerge`` command line in-process, and what a clean refusal looks like."""

from __future__ import annotations

from typer.testing import CliRunner

from loramerge.cli.app import app


def run(*args):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def assert_clean_failure(result, message: str, output) -> None:
    """Exit code 2, one line on stderr naming the problem, no traceback, no output, no staging leftovers."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not output.exists()
    assert not list(output.parent.glob(f".{output.name}.*"))
