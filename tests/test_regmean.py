"""RegMean (Jin et al., ICLR 2023) on LoRA factors: checked against the weighted mean where every task has the same
inputs, and against a dense float64 implementation of the paper's closed form on a real (tiny) model's own
activations, captured here one prompt at a time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from cli_helpers import run
from conftest import CHARDEMO, rel_err
from loramerge import calibration_grams, load_adapter, merge_adapters
from loramerge.errors import BadInput
from loramerge.lowrank import LowRank
from loramerge.lowrank.regmean import regmean, solve_psd

SKILLS = ("add", "reverse", "sort")


def random_terms(seed: int, ranks=(3, 5, 2), shape=(14, 9)) -> list[LowRank]:
    generator = torch.Generator().manual_seed(seed)
    return [LowRank(torch.randn(shape[0], r, generator=generator), torch.randn(r, shape[1], generator=generator))
            for r in ranks]  # fmt: skip


def random_gram(seed: int, size: int = 9) -> torch.Tensor:
    rows = torch.randn(3 * size, size, generator=torch.Generator().manual_seed(seed))
    return rows.T @ rows / len(rows)


@pytest.mark.parametrize("off_diagonal", [1.0, 0.4])
def test_the_same_inputs_for_every_task_give_the_weighted_mean(off_diagonal):
    terms, weights = random_terms(0), [0.5, 2.0, 1.0]
    gram = random_gram(1)
    merged = regmean(terms, weights, rank=10, grams=[gram] * 3, off_diagonal=off_diagonal)
    mean = sum(w * t.dense() for w, t in zip(weights, terms, strict=True)) / sum(weights)
    assert merged.rank == 10 and rel_err(merged.dense(), mean) < 1e-5


def test_one_task_is_kept_and_the_weights_only_weigh_the_tasks_against_each_other():
    terms = random_terms(2)
    grams = [random_gram(3 + i) for i in range(3)]
    alone = regmean(terms[:1], [0.3], rank=3, grams=grams[:1], off_diagonal=0.9)
    assert rel_err(alone.dense(), terms[0].dense()) < 1e-5
    once = regmean(terms, [1.0, 2.0, 0.5], rank=10, grams=grams, off_diagonal=0.9)
    scaled = regmean(terms, [3.0, 6.0, 1.5], rank=10, grams=grams, off_diagonal=0.9)
    assert rel_err(scaled.dense(), once.dense()) < 1e-5
    with pytest.raises(BadInput, match="must not be negative"):
        regmean(terms, [1.0, -1.0, 1.0], rank=10, grams=grams, off_diagonal=0.9)


def module_inputs(model, tokenizer, prompts: list[str], names: list[str]) -> dict[str, torch.Tensor]:
    """Every token's input row of each named module, one prompt per forward pass (no padding at all)."""
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_pre_hook(lambda _m, inputs, name=name: rows[name].append(inputs[0][0]))
               for name in names]  # fmt: skip
    with torch.no_grad():
        for prompt in prompts:
            model(**tokenizer(prompt, return_tensors="pt"))
    for handle in handles:
        handle.remove()
    return {name: torch.cat(found).to(torch.float64) for name, found in rows.items()}


def calibration_files(root: Path, count: int = 20) -> list[Path]:
    files = []
    for skill in SKILLS:
        rows = (CHARDEMO / "data" / f"{skill}.eval.jsonl").read_text().splitlines()[:count]
        path = root / f"{skill}.jsonl"
        path.write_text("\n".join(json.dumps({"prompt": json.loads(row)["prompt"]}) for row in rows) + "\n")
        files.append(path)
    return files


def test_regmean_equals_the_dense_closed_form_on_a_real_models_activations(tmp_path):
    """Δ* = (Σ w_i Δ_i G̃_i)(Σ w_i G̃_i)⁻¹ with G_i the mean of x xᵀ over task i's prompt tokens and G̃_i its
    off-diagonal entries scaled by α, written out densely in float64 from the base's own activations; the merge
    batches (20 prompts: two batches) and pads the prompts, so this also checks that padding is left out. One
    adapter lacks a module: there its Δ is 0, and its inputs still count."""
    base = CHARDEMO / "base"
    files = calibration_files(tmp_path)
    adapters = [load_adapter(CHARDEMO / skill) for skill in SKILLS]
    missing = "model.layers.1.self_attn.v_proj"
    del adapters[1].modules[missing]
    weights, alpha = [1.0, 0.5, 2.0], 0.7
    grams = calibration_grams(str(base), files, adapters)
    merged = merge_adapters(adapters, weights, "regmean", grams=grams, params={"off_diagonal": alpha})

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    names = sorted(adapters[0].modules)
    assert missing in names
    inputs = [module_inputs(model, tokenizer, [json.loads(r)["prompt"] for r in f.read_text().splitlines()], names)
              for f in files]  # fmt: skip
    for name in names:
        shrunk = []
        for rows in inputs:
            gram = rows[name].T @ rows[name] / len(rows[name])
            shrunk.append(alpha * gram + (1 - alpha) * torch.diag(torch.diag(gram)))
        zero = torch.zeros(adapters[0].modules[name].shape, dtype=torch.float64)
        deltas = [a.modules[name].factors(torch.float64).dense() if name in a.modules else zero for a in adapters]
        numerator = sum(w * d @ g for w, d, g in zip(weights, deltas, shrunk, strict=True))
        denominator = sum(w * g for w, g in zip(weights, shrunk, strict=True))
        expected = torch.linalg.solve(denominator, numerator.T).T  # X M = N with M symmetric
        got = merged.modules[name].factors(torch.float64).dense()
        assert rel_err(got, expected) < 1e-4, name
    # the regularisation matters here: without it the mean of the deltas is not the answer
    plain = sum(w * d for w, d in zip(weights, deltas, strict=True)) / sum(weights)
    assert rel_err(plain, expected) > 0.05


def test_the_cli_merges_with_calibration_files_and_refuses_what_it_cannot_use(tmp_path):
    files = calibration_files(tmp_path, count=4)
    adapters = []
    for skill in SKILLS[:2]:  # copies whose config names the fixture's base where this test runs
        shutil.copytree(CHARDEMO / skill, tmp_path / skill)
        adapters.append(tmp_path / skill)
    base = str(CHARDEMO / "base")
    out = tmp_path / "merged"
    given = ["--calibration", files[0], "--calibration", files[1]]
    done = run("merge", *adapters, "--method", "regmean", "--base", base, *given, "-o", out)
    assert done.exit_code == 0, done.output
    grams = calibration_grams(base, files[:2], [load_adapter(a) for a in adapters])
    expected = merge_adapters([load_adapter(a) for a in adapters], grams=grams, method="regmean")
    written = load_adapter(out)
    for name, module in expected.modules.items():
        assert rel_err(written.modules[name].factors().dense(), module.factors().dense()) < 1e-6
    card = (out / "README.md").read_text()  # the model card names each adapter's prompts
    assert f"calibration: {files[0]}" in card and f"calibration: {files[1]}" in card, card
    refusals = [
        ("method regmean merges with each adapter's activations", ("--method", "regmean", "--base", base)),
        ("--calibration: 1 files for 2 adapters", ("--method", "regmean", "--base", base, *given[:2])),
        (
            "method regmean weighs each adapter's inputs: its weights must not be",
            ("--method", "regmean", "--base", base, "--weights", "1,-1", *given),
        ),
        ("--calibration: method iso_c does not use activations", ("--base", base, *given)),
        ("runs the base model on the calibration prompts: give --base MODEL", ("--method", "regmean", *given)),
    ]
    for message, flags in refusals:
        refused = run("merge", *adapters, *flags, "-o", tmp_path / "refused")
        assert refused.exit_code == 2 and message in refused.stderr, (message, refused.stderr)
        assert not (tmp_path / "refused").exists()
    planned = run("merge", *adapters, "--method", "regmean", "--base", "no/such/base", *given, "--dry-run", "-o", out)
    assert planned.exit_code == 0 and "regmean" in planned.stdout, planned.output  # no model is loaded


def test_a_recipe_names_each_adapters_calibration_file(tmp_path):
    files = calibration_files(tmp_path, count=4)
    base = str(CHARDEMO / "base")
    entries = [{"adapter": str(CHARDEMO / skill), "weight": w, "calibration": str(f)}
               for skill, w, f in zip(SKILLS[:2], (1.0, 0.5), files, strict=False)]  # fmt: skip
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "regmean", "base_model": base, "adapters": entries,
                                      "parameters": {"off_diagonal": 0.5}}))  # fmt: skip
    done = run("run", recipe, "-o", tmp_path / "merged")
    assert done.exit_code == 0, done.output
    adapters = [load_adapter(CHARDEMO / skill) for skill in SKILLS[:2]]
    grams = calibration_grams(base, files[:2], adapters)
    expected = merge_adapters(adapters, [1.0, 0.5], "regmean", grams=grams, params={"off_diagonal": 0.5})
    written = load_adapter(tmp_path / "merged")
    assert all(rel_err(written.modules[n].factors().dense(), m.factors().dense()) < 1e-6
               for n, m in expected.modules.items())  # fmt: skip
    assert f"calibration: {files[1]}" in (tmp_path / "merged" / "README.md").read_text()
    for method, entry, message in [
        ("regmean", {"adapter": str(CHARDEMO / "sort")}, "adapters[2].calibration: method regmean runs the base"),
        ("iso_c", {"adapter": str(CHARDEMO / "sort")}, "adapters[0].calibration: method iso_c does not use"),
    ]:
        recipe.write_text(yaml.safe_dump({"merge_method": method, "base_model": base, "adapters": [*entries, entry]}))
        refused = run("run", recipe, "-o", tmp_path / "refused")
        assert refused.exit_code == 2 and message in refused.stderr, refused.stderr


def test_the_solve_takes_the_pseudo_inverse_where_no_prompt_reached_a_direction():
    generator = torch.Generator().manual_seed(4)
    rows = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    singular, definite = rows.T @ rows, rows.T @ rows + torch.eye(6, dtype=torch.float64)
    rhs = torch.randn(2, 6, generator=generator, dtype=torch.float64)
    assert torch.allclose(solve_psd(singular, rhs), rhs @ torch.linalg.pinv(singular, hermitian=True), atol=1e-10)
    assert torch.allclose(solve_psd(definite, rhs), torch.linalg.solve(definite, rhs.T).T, atol=1e-10)
    # fewer tokens than features, and a trace of round-off: "definite" to Cholesky, with pivots ~1e-14
    for seed in range(20):
        few = torch.randn(30, 40, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        gram = few.T @ few / 30 + 1e-14 * torch.eye(40, dtype=torch.float64)
        assert int(torch.linalg.cholesky_ex(gram)[1]) == 0
        right = torch.randn(3, 40, generator=generator, dtype=torch.float64)
        reference = right @ torch.linalg.pinv(gram, rtol=1e-10, hermitian=True)
        assert rel_err(solve_psd(gram, right), reference) < 1e-6, seed
