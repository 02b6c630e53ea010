"""Every recipe in ``recipes/`` runs on the shipped demo files, and its output loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from cli_helpers import run

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 5


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_runs_and_loads(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name the demo files relative to the repository
    out = tmp_path / "out"
    result = run("run", recipe, "-o", out)
    assert result.exit_code == 0, result.output
    tokens = torch.tensor([[1, 2, 3, 4]])
    if (out / "adapter_config.json").exists():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ROOT / "adapters/base"), out)
    else:
        model = AutoModelForCausalLM.from_pretrained(out)
        assert (out / "README.md").is_file()
        if "adapters:" not in recipe.read_text():  # dense recipes keep the recipe beside the model
            assert (out / "loramerge_recipe.yml").is_file()
    with torch.no_grad():
        assert torch.isfinite(model(tokens).logits).all()
    if recipe.stem == "passthrough_stack":
        assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
