"""``loramerge search``: the LoRA slot a worker scores candidates in gives what PEFT gives for the saved
merge; the ask/tell loop finds the optimum of a known function; 1 worker, 2 local processes and Ray give
identical files; the best recipe reproduces the best merge; bad inputs are one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import assert_clean_failure, run
from conftest import CHARDEMO
from dense_helpers import SEARCH_DEV, search_recipe, write_recipe
from loramerge.adapters.files import save_adapter
from loramerge.adapters.merge import execute_plan
from loramerge.errors import BadInput
from loramerge.evaluate.data import Sample
from loramerge.evaluate.exact_match import evaluate
from loramerge.evaluate.models import load_model
from loramerge.recipe import load_recipe
from loramerge.search.evaluator import Evaluator, Scores, Task
from loramerge.search.job import SearchJob, build_job
from loramerge.search.optimise import search
from loramerge.search.pools import check_capacity
from loramerge.search.report import history_rows, write_search
from loramerge.search.space import search_space

BASE = CHARDEMO / "base"
DEV = SEARCH_DEV


@pytest.fixture
def recipe(tmp_path) -> Path:
    return search_recipe(tmp_path / "recipe.yml", "ties", {"density": 0.7})


def test_the_slot_scores_what_peft_gives_for_the_saved_merge(recipe, tmp_path):
    job = build_job(load_recipe(recipe), [str(p) for p in DEV], base=str(BASE), tune={"density": (0.3, 1.0)},
                    max_samples=12, threads=2)  # fmt: skip
    evaluator = Evaluator(job)
    point = (1.3, 0.6, 0.5)  # ranks 16 and 8 in slots of 16: padding must not change the update
    merged = execute_plan(job.plan(point))
    assert merged.modules and job.plan(point).options.density == 0.5
    for task, adapter in [(Task(0, point), save_adapter(merged, tmp_path / "merged")), (Task(-1, reference=1), None)]:
        scores = evaluator.score(task)
        model, tokenizer = load_model(str(BASE), adapter=str(adapter or CHARDEMO / "reverse"))
        ids = torch.tensor([[1, 5, 9, 12, 40, 7]])
        with torch.no_grad():
            expected, got = model(input_ids=ids).logits, evaluator.model(input_ids=ids).logits
        assert torch.allclose(expected, got, atol=1e-5), (expected - got).abs().max()
        for name, samples in job.dev.items():
            reference = evaluate(model, tokenizer, samples, "peft", data=name)
            assert scores.exact_match[name] == reference.exact_match
            assert scores.loss[name] == pytest.approx(reference.loss, rel=1e-5)
    assert scores.exact_match["reverse"] > 0.5  # the reverse adapter alone solves its dev set
    empty = evaluator.score(Task(1, (0.0, 0.0, 0.5)))  # a point the merge refuses is recorded, not fatal
    assert "weights are all zero" in empty.refused and not empty.loss


def test_a_refused_point_is_recorded_and_the_search_goes_on(tmp_path):
    """DELLA takes density ± epsilon: with --tune density=0.5:1, the points past 0.85 cannot be merged."""
    adapters = [{"adapter": str(CHARDEMO / "add")}, {"adapter": str(CHARDEMO / "reverse")}]
    della = write_recipe(tmp_path / "della.yml", {"merge_method": "della", "adapters": adapters})
    job = build_job(load_recipe(della), [str(DEV[0])], base=str(BASE), tune={"density": (0.5, 1.0)}, max_samples=4)
    refused = Evaluator(job).score(Task(0, (1.0, 1.0, 0.95)))
    assert "della" in refused.refused or "epsilon" in refused.refused, refused.refused
    result = search(job, RefusingPool(), budget=24, batch=4)
    rows = history_rows(job, result)
    marked = [row for row in rows if row["refused"]]
    assert marked and all(row["score"] == "" for row in marked)  # recorded, without a score
    assert all(float(row["density"]) > 0.85 for row in marked) and not result.best.scores.refused
    write_search(tmp_path / "out", job, result, {"objective": "exact_match"})
    assert (tmp_path / "out" / "history.png").is_file()


class RefusingPool:
    """Refuses what DELLA would (density past 0.85), scores the rest by a smooth function."""

    def __call__(self, tasks):
        for task in tasks:
            if task.reference is not None:
                yield Scores(task.index, {"add": 1.0}, {"add": 0.0})
            elif task.point[-1] > 0.85:
                yield Scores(task.index, refused="della: density + epsilon must stay in (0, 1]")
            else:
                yield Scores(task.index, {"add": task.point[-1]}, {"add": 1 - task.point[-1]})


class QuadraticPool:
    """Scores without a model: exact match 1 - |x - target|² / 4 on one set, 1 for the adapters alone."""

    target = (0.4, 1.7)

    def __call__(self, tasks):
        for task in tasks:
            if task.reference is not None:
                yield Scores(task.index, {"set": 1.0}, {"set": 0.0})
            else:
                miss = sum((x - t) ** 2 for x, t in zip(task.point, self.target, strict=True))
                yield Scores(task.index, {"set": 1 - miss / 4}, {"set": miss})


def test_the_loop_finds_the_optimum_of_a_known_function(recipe):
    space = search_space(load_recipe(recipe))
    job = SearchJob("unused", [None, None], space, {"set": [Sample("prompt", "answer")]}, seed=3)
    result = search(job, QuadraticPool(), budget=60, batch=4)
    assert [c.index for c in result.candidates] == list(range(60))
    assert [c.batch for c in result.candidates] == [i // 4 for i in range(60)]
    assert result.start.point == (0.8, 1.0)  # the recipe's own weights come first
    best = result.best
    assert best.score == max(c.score for c in result.candidates) and best.score > 0.99
    assert all(abs(x - t) < 0.1 for x, t in zip(best.point, QuadraticPool.target, strict=True)), best.point
    assert all(0 <= x <= 2 for c in result.candidates for x in c.point)  # inside the --weight-range box
    again = search(job, QuadraticPool(), budget=60, batch=4)
    assert [c.point for c in again.candidates] == [c.point for c in result.candidates]  # seeded


def search_cli(recipe, out, *extra, tune=("--tune", "density=0.3:1")):
    args = ["search", recipe, "--base", BASE, "-o", out, "--budget", "6", "--batch", "3", "--max-samples", "8",
            *tune, "--seed", "1"]  # fmt: skip
    for path in DEV:
        args += ["--data", path]
    return run(*args, *extra)


def test_one_worker_two_processes_and_ray_write_identical_files(recipe, tmp_path):
    runs = {"one": [], "two": ["--workers", "2"], "ray": ["--workers", "2", "--ray-address", "local"]}
    for name, extra in runs.items():
        result = search_cli(recipe, tmp_path / name, *extra, *(["--write-adapter"] if name == "one" else []))
        assert result.exit_code == 0, result.output
    for file in ("history.csv", "best.yml", "search.json"):
        texts = {name: (tmp_path / name / file).read_text() for name in runs}
        assert texts["one"] == texts["two"] == texts["ray"], file
    history = (tmp_path / "one" / "history.csv").read_text().splitlines()
    assert len(history) == 7 and history[0].startswith("candidate,batch,weight:add,weight:reverse,density,score")
    assert history[1].startswith("0,0,0.8,1.0,0.7,")  # the recipe's own values first
    assert (tmp_path / "one" / "history.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "one" / "search.json").read_text())
    assert summary["best"]["score"] == max(float(line.split(",")[5]) for line in history[1:])
    # the best recipe, run, gives the best merge (its values rounded to 6 decimals)
    rerun = run("run", tmp_path / "one" / "best.yml", "-o", tmp_path / "rerun")
    assert rerun.exit_code == 0, rerun.output
    written = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    again = load_file(tmp_path / "rerun" / "adapter_model.safetensors")
    assert sorted(written) == sorted(again)
    assert all(torch.allclose(written[k], again[k], atol=1e-4) for k in written)


def test_bad_search_inputs_are_one_line(recipe, tmp_path, monkeypatch):
    out = tmp_path / "out"
    # more cases (unknown and impossible --tune values, missing dev files, dense recipes, plain-text dev data,
    # an output over an input) are in test_bad_inputs.py, which also checks that inputs stay unchanged
    tuned_twice = ["--tune", "density=0.5:1", "--tune", "density=0.2:1"]
    assert_clean_failure(search_cli(recipe, out, tune=tuned_twice), "density is tuned twice", out)
    cases = [
        (["--weight-range", "zero:two"], "expected LOW:HIGH"),
        (["--objective", "accuracy"], "choose exact_match or loss"),
        (["--optimizer", "Nope"], "not a nevergrad optimiser"),
        (["--optimizer", "Powell"], "does not support parallelization (try --batch 1)"),
        (["--optimizer", "DS9"], "--optimizer DS9: _NonObjectMinimizeBase does not support parallelization"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--budget", "0"], "--budget and --batch must be at least 1"),
    ]
    for extra, message in cases:
        assert_clean_failure(search_cli(recipe, out, *extra), message, out)
    # the base fails to load in this process, in each worker process, in each Ray actor
    for where in (["--workers", "1"], ["--workers", "2"], ["--workers", "2", "--ray-address", "local"]):
        missing = run("search", recipe, "--base", tmp_path / "nope", "-o", out, "--data", DEV[0], *where)
        assert_clean_failure(missing, "nope: no such folder", out)
    with pytest.raises(BadInput, match="the cluster offers 2 CPUs, and `workers=3` need 3"):
        check_capacity({"CPU": 2.0}, {"num_cpus": 1}, 3, "auto")  # actors Ray could never place
    monkeypatch.setitem(sys.modules, "nevergrad", None)
    assert_clean_failure(search_cli(recipe, out), "pip install 'loramerge[search]'", out)
    monkeypatch.delitem(sys.modules, "nevergrad")
    monkeypatch.setitem(sys.modules, "ray", None)
    assert_clean_failure(search_cli(recipe, out, "--ray-address", "local"), "pip install 'loramerge[ray]'", out)


def test_the_recipe_seed_drives_the_merges_and_best_yml_keeps_it(tmp_path):
    """DARE draws masks from the seed: the search merges with the recipe's own ``parameters.seed`` (not
    ``--seed``, the optimiser's), and the recipe it writes carries the seed, so ``loramerge run`` rebuilds
    exactly the merge that was scored."""
    import yaml

    from loramerge.search.report import _recipe_text

    adapters = [{"adapter": str(CHARDEMO / "add")}, {"adapter": str(CHARDEMO / "reverse")}]
    path = write_recipe(tmp_path / "dare.yml", {"merge_method": "dare_ties", "adapters": adapters,
                                                "parameters": {"density": 0.5, "seed": 5}})  # fmt: skip
    job = build_job(load_recipe(path), [str(DEV[0])], base=str(BASE), seed=1, max_samples=2)
    plan = job.plan(job.space.start)
    assert job.merge_seed == 5 and plan.options.seed == 5
    save_adapter(execute_plan(plan), tmp_path / "scored", dtype=plan.out_dtype)
    written = job.space.recipe_at(job.space.start, job.merge_seed)
    (tmp_path / "best.yml").write_text(_recipe_text(written, 0, 1.0))
    assert yaml.safe_load((tmp_path / "best.yml").read_text())["parameters"]["seed"] == 5
    assert run("run", tmp_path / "best.yml", "-o", tmp_path / "rerun").exit_code == 0
    scored = load_file(tmp_path / "scored" / "adapter_model.safetensors")
    rerun = load_file(tmp_path / "rerun" / "adapter_model.safetensors")
    assert all(torch.equal(scored[k], rerun[k]) for k in scored)
    other = job.space.recipe_at(job.space.start, 6)  # another seed draws other masks: the check can fail
    (tmp_path / "other.yml").write_text(_recipe_text(other, 0, 1.0))
    assert run("run", tmp_path / "other.yml", "-o", tmp_path / "other").exit_code == 0
    drawn = load_file(tmp_path / "other" / "adapter_model.safetensors")
    assert any(not torch.equal(scored[k], drawn[k]) for k in scored)


def _dora_copy(source: Path, folder: Path) -> Path:
    """A DoRA adapter made from a LoRA one on the chardemo base: magnitudes 10 % off its rows' norms."""
    import shutil

    from safetensors.torch import save_file

    from loramerge.adapters.dora import row_norms
    from loramerge.adapters.files import load_adapter
    from loramerge.io.checkpoint import open_checkpoint

    shutil.copytree(source, folder)
    adapter, base = load_adapter(folder), open_checkpoint(str(BASE))
    state = load_file(folder / "adapter_model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for name, module in adapter.modules.items():
        norms = row_norms(base.get(f"{name}.weight").float(), module.factors())
        state[f"base_model.model.{name}.lora_magnitude_vector"] = norms * (
            1 + 0.1 * torch.randn(norms.shape, generator=generator)
        )
    save_file(state, folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    return folder


def test_a_dora_slot_scores_what_peft_gives(tmp_path):
    """DoRA inputs search in a DoRA slot: a candidate merge, the DoRA input alone and the LoRA input alone each
    give the logits PEFT gives for that adapter saved and loaded."""
    dora = _dora_copy(CHARDEMO / "add", tmp_path / "add-dora")
    recipe = write_recipe(tmp_path / "recipe.yml", {
        "merge_method": "ties", "parameters": {"density": 0.7},
        "adapters": [{"adapter": str(dora), "weight": 0.8}, {"adapter": str(CHARDEMO / "reverse")}],
    })  # fmt: skip
    job = build_job(load_recipe(recipe), [str(p) for p in DEV], base=str(BASE), max_samples=4, threads=2)
    evaluator = Evaluator(job)
    point = (1.2, 0.6)
    merged = save_adapter(execute_plan(job.plan(point)), tmp_path / "merged")
    ids = torch.tensor([[1, 5, 9, 12, 40, 7]])
    for task, adapter in [(Task(0, point), merged), (Task(-1, reference=0), dora),
                          (Task(-2, reference=1), CHARDEMO / "reverse")]:  # fmt: skip
        evaluator.score(task)
        model, _ = load_model(str(BASE), adapter=str(adapter))
        with torch.no_grad():
            expected, got = model(input_ids=ids).logits, evaluator.model(input_ids=ids).logits
        assert torch.allclose(expected, got, atol=1e-4), (task, (expected - got).abs().max())
