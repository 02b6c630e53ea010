"""How the command line reports what is not bad input: a bug is exit 1 with one line that says so and names
the file holding its traceback; an error after the output was written says it was written."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from cli_helpers import run
from conftest import CHARDEMO


def _one_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_bug_inside_a_merge_is_exit_1_with_its_traceback_in_a_file(tmp_path, monkeypatch):
    def broken(plan, module, pieces=None):
        raise ValueError("shapes (3,4) and (5,6) cannot be multiplied")  # what a bug, not the input, raises

    monkeypatch.setattr("loramerge.adapters.merge.merge_module", broken)
    out = tmp_path / "out"
    result = run("merge", CHARDEMO / "add", CHARDEMO / "sort", "-o", out)
    assert result.exit_code == 1, result.output
    line = _one_line(result)
    match = re.fullmatch(
        r"internal error \(a bug; please report it\): ValueError: shapes \(3,4\) and \(5,6\) cannot be multiplied; "
        r"nothing was written; the traceback is in (\S+)",
        line,
    )
    assert match, line
    saved = Path(match.group(1)).read_text()
    assert "Traceback" in saved and "in broken" in saved
    Path(match.group(1)).unlink()
    assert not out.exists()


def test_a_kernel_refusing_its_parameters_is_still_bad_input(tmp_path):
    out = tmp_path / "out"
    result = run("merge", CHARDEMO / "add", CHARDEMO / "sort", "-o", out, "--method", "della", "--density", "0.9")
    assert result.exit_code == 2, result.output
    assert "della needs 0 < density - epsilon and density + epsilon < 1" in _one_line(result)


def test_an_error_in_evaluate_says_the_output_was_written(tmp_path):
    recipe = {
        "merge_method": "linear",
        "adapters": [{"adapter": str(CHARDEMO / "add")}, {"adapter": str(CHARDEMO / "sort")}],
        "evaluate": {"base": str(CHARDEMO / "base"), "data": str(tmp_path / "missing.jsonl")},
    }
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    result = run("run", path, "-o", out)
    assert result.exit_code == 2, result.output
    line = _one_line(result)
    assert "missing.jsonl" in line and f"(the output {out.absolute()} was written before this error)" in line, line
    assert "nothing was written" not in line
    assert (out / "adapter_model.safetensors").is_file()
