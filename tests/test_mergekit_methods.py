"""The dense methods mergekit 0.1.5 added after the classics (nuslerp, multislerp, karcher, sce, nearswap,
arcee_fusion, ram, ramplus_tl): each recipe through ``mergekit-yaml`` (a black box in a subprocess) and
``loramerge run``, tensors within 1e-5 in float32."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dense_helpers import load_weights, run_mergekit, save_llama, write_recipe
from loramerge.dense.engine import merge_checkpoints
from loramerge.errors import BadInput
from loramerge.recipe import parse_recipe


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk_methods")
    base = save_llama(root / "base", 0, layers=3)
    tuned = [save_llama(root / f"tuned{i}", i + 1, layers=3, like=base) for i in range(3)]
    return {"base": str(base), **{f"m{i + 1}": str(path) for i, path in enumerate(tuned)}}


def _models(m, *names, **parameters):
    return [{"model": m[name], "parameters": dict(parameters.get(name, {}))} for name in names]


def recipes(m) -> dict[str, dict]:
    def recipe(method, models, base=True, **params):
        return {"merge_method": method, **({"base_model": m["base"]} if base else {}), "dtype": "float32",
                **({"parameters": params} if params else {}), "models": models}  # fmt: skip

    weights = {"m1": {"weight": 0.7}, "m2": {"weight": [0.2, 0.9]}, "m3": {"weight": 0.4}}
    return {
        "nuslerp": recipe("nuslerp", _models(m, "m1", "m2", **weights), base=False),
        "nuslerp_task_vectors_rows": recipe("nuslerp", _models(m, "m1", "m2", **weights), nuslerp_flatten=False),
        "nuslerp_columns": recipe("nuslerp", _models(m, "m1", "m2", **weights), base=False,
                                  nuslerp_flatten=False, nuslerp_row_wise=True),
        "multislerp": recipe("multislerp", _models(m, "m1", "m2", "m3", **weights), base=False),
        "multislerp_task_vectors": recipe("multislerp", _models(m, "m1", "m2", "m3", **weights), eps=0.05),
        "karcher": recipe("karcher", _models(m, "m1", "m2", "m3"), max_iter=5, tol=1e-6),
        "sce": recipe("sce", _models(m, "m1", "m2", "m3"), select_topk=0.4),
        "sce_all": recipe("sce", _models(m, "m1", "m2", "m3", **weights), int8_mask=True),
        "nearswap": recipe("nearswap", _models(m, "m1"), t=[0.005, 0.03]),
        "arcee_fusion": recipe("arcee_fusion", _models(m, "m2")),
        "ram": recipe("ram", _models(m, "m1", "m2", "m3"), epsilon=0.02),
        "ramplus_tl": recipe("ramplus_tl", _models(m, "m1", "m2", "m3"), epsilon=0.02, r=0.5, alpha=0.6),
    }  # fmt: skip


@pytest.mark.parametrize("case", list(recipes({"base": "", "m1": "", "m2": "", "m3": ""})))
def test_same_tensors_as_mergekit(case, models, tmp_path):
    path = write_recipe(tmp_path / "recipe.yml", recipes(models)[case])
    theirs = run_mergekit(path, tmp_path / "mergekit")
    merge_checkpoints(path, tmp_path / "ours")
    ours = load_weights(tmp_path / "ours")
    assert sorted(ours) == sorted(theirs)
    base = load_weights(Path(models["base"]))
    changed = 0
    for name, tensor in theirs.items():
        assert (ours[name] - tensor.float()).abs().max().item() <= 1e-5, name
        changed += not (ours[name] == base[name]).all()
    assert changed  # the merge did something


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (lambda m: {"merge_method": "nuslerp", "models": _models(m, "m1", "m2", m1={"weight": 1})},
         "models[1]: nuslerp needs parameter weight"),
        (lambda m: {"merge_method": "nearswap", "base_model": m["base"], "models": _models(m, "m1")},
         "nearswap needs parameter t"),
        (lambda m: {"merge_method": "sce", "models": _models(m, "m1", "m2")}, "sce needs a base_model"),
        (lambda m: {"merge_method": "arcee_fusion", "base_model": m["base"], "models": _models(m, "m1", "m2")},
         "arcee_fusion takes 2 to 2 inputs, got 3"),
        (lambda m: {"merge_method": "multislerp", "models": _models(m, "m1", "m2", m1={"weight": 1},
                                                                    m2={"weight": -1})}, "sum to zero"),
    ],
)  # fmt: skip
def test_mergekit_errors_become_one_line(recipe, message, models, tmp_path):
    with pytest.raises(BadInput, match=re.escape(message)):
        merge_checkpoints(parse_recipe(recipe(models)), tmp_path / "out")
    assert not (tmp_path / "out").exists()
