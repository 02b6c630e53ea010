"""Every script in ``examples/`` runs on the shipped demo (from the repository root, as documented)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The generator retrains everything (minutes); its output is what the other examples and tests use.
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if p.name != "make_demo.py")
NEEDS_OUTPUT = {"merge_in_python", "merge_then_fold", "dense_recipe", "load_merged"}


def test_there_are_examples():
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(script, tmp_path):
    args = [str(tmp_path / "out")] if script.stem in NEEDS_OUTPUT else []
    if script.stem == "load_merged":
        merged = subprocess.run(
            [sys.executable, "-m", "loramerge.cli", "merge", "adapters/add", "adapters/sort", "-o", args[0]],
            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        assert merged.returncode == 0, merged.stderr
    if script.stem == "evaluate_merge":
        args = ["20"]
    result = subprocess.run(
        [sys.executable, str(script), *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.strip()
