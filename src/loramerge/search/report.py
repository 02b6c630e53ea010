"""A search's output folder: the best recipe, the history (CSV and a plot), a summary, and optionally
the best merged adapter; written atomically. Nothing in it depends on timing or on the worker count."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import yaml

from loramerge.adapters.merge import execute_plan
from loramerge.adapters.model import LoraAdapter
from loramerge.evaluate.suite import retention
from loramerge.io.output import OutputFolder, output_folder
from loramerge.search.gradient import GradientResult
from loramerge.search.job import SearchJob
from loramerge.search.optimise import SearchResult, best_exact_match


def history_rows(job: SearchJob, result: SearchResult) -> list[dict[str, object]]:
    """One row per candidate: its values, score, best score so far, and exact match and loss per dev set."""
    rows, top = [], float("-inf")
    for candidate in result.candidates:
        top = max(top, candidate.score)
        row: dict[str, object] = {"candidate": candidate.index, "batch": candidate.batch}
        row.update(zip(job.space.names, (repr(v) for v in candidate.point), strict=True))
        row.update(score=_number(candidate.score), best_so_far=_number(top))
        for name in job.dev:
            row[f"exact_match:{name}"] = _number(candidate.scores.exact_match.get(name))
            row[f"loss:{name}"] = _number(candidate.scores.loss.get(name))
        row["refused"] = candidate.scores.refused
        rows.append(row)
    return rows


def _number(value: float | None) -> str:
    """Full precision (the files are compared byte for byte); empty for none or a refused merge."""
    return "" if value is None or value == float("-inf") else repr(value)


def history_csv(job: SearchJob, result: SearchResult) -> str:
    rows = history_rows(job, result)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def summary(job: SearchJob, result: SearchResult, settings: dict[str, object]) -> dict[str, object]:
    best, start = result.best, result.start
    names = [d.name.removeprefix("weight:") for d in job.space.dimensions if d.adapter is not None]
    references = {name: scores.exact_match for name, scores in zip(names, result.references, strict=True)}
    return {
        "settings": settings,
        "dimensions": [{"name": d.name, "low": d.low, "high": d.high, "start": d.start} for d in job.space.dimensions],
        "start": {"candidate": 0, "score": start.score, "values": dict(zip(job.space.names, start.point, strict=True))},
        "best": {
            "candidate": best.index,
            "score": best.score,
            "values": dict(zip(job.space.names, best.point, strict=True)),
            "exact_match": best.scores.exact_match,
            "loss": best.scores.loss,
        },
        "adapters_alone": references,
        "best_adapter_exact_match": result.best_exact_match,
    }


def plot_history(job: SearchJob, result: SearchResult, path: Path, objective: str) -> bool:
    """Score per candidate and the best so far (PNG); False when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    scored = [c for c in result.candidates if c.score > float("-inf")]  # refused merges have no score
    scores = [c.score for c in scored]
    figure = Figure(figsize=(7, 4))
    FigureCanvasAgg(figure)  # a figure of its own: the caller's pyplot backend and state are left alone
    axes = figure.add_subplot()
    axes.scatter([c.index for c in scored], scores, s=12, label="candidate")
    axes.plot([c.index for c in scored], [max(scores[: i + 1]) for i in range(len(scores))], color="C1",
              label="best so far")  # fmt: skip
    if result.start.score > float("-inf"):
        axes.axhline(result.start.score, color="grey", linestyle=":", label="recipe's own values")
    axes.set_xlabel("candidate")
    axes.set_ylabel("kept vs. adapters (dev)" if objective == "exact_match" else "negative mean loss (dev)")
    axes.set_title(f"loramerge search: {job.space.recipe.merge_method}, {len(job.dev)} dev sets")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return True


def write_search(
    target: Path,
    job: SearchJob,
    result: SearchResult,
    settings: dict[str, object],
    *,
    force: bool = False,
    with_adapter: bool = False,
) -> list[str]:
    """Write ``best.yml``, ``history.csv``, ``history.png``, ``search.json`` (and ``adapter/``)."""
    best = result.best
    recipe = job.space.recipe_at(best.point, job.merge_seed)
    with output_folder(target, force=force) as folder:
        folder.text("best.yml", _recipe_text(recipe, best.index, best.score))
        folder.text("history.csv", history_csv(job, result))
        folder.json("search.json", summary(job, result, settings))
        written = ["best.yml", "history.csv", "search.json"]
        if plot_history(job, result, folder.staging / "history.png", str(settings.get("objective"))):
            written.append("history.png")
        if with_adapter:
            _write_adapter(folder, job, best.point)
            written.append("adapter/")
    return written


def _write_adapter(folder: OutputFolder, job: SearchJob, point) -> None:
    from loramerge.adapters.files import save_adapter

    plan = job.plan(point)
    save_adapter(execute_plan(plan), folder.staging / "adapter", dtype=plan.out_dtype)


def _recipe_text(recipe, index: int, score: float) -> str:
    head = f"# found by loramerge search: candidate {index}, score {score:.4f} on the dev sets\n"
    return head + yaml.safe_dump(recipe.model_dump(exclude_none=True), sort_keys=False)


def _kept(result: GradientResult) -> float | None:
    """The merge's dev exact match kept against the best input adapter's (the search's own measure)."""
    return retention(result.scores.exact_match, best_exact_match(result.references, "loss"))


def gradient_summary(job: SearchJob, result: GradientResult, settings: dict[str, object]) -> dict[str, object]:
    """The learned coefficients by adapter and group, the objective per step, and the merge's dev scores."""
    names = [d.name.removeprefix("weight:") for d in job.space.dimensions]
    return {
        "settings": settings,
        "groups": result.groups,
        "start": dict(zip(names, result.start, strict=True)),
        "coefficients": dict(zip(names, result.coefficients, strict=True)),
        "objective": result.objective,
        "forward_passes": result.forward_passes,
        "merge": {
            "exact_match": result.scores.exact_match,
            "loss": result.scores.loss,
            "kept": _kept(result),
        },
        "adapters_alone": {name: s.exact_match for name, s in zip(names, result.references, strict=True)},
        "best_adapter_exact_match": best_exact_match(result.references, "loss"),
    }


def write_gradient_search(
    target: Path,
    job: SearchJob,
    result: GradientResult,
    merged: LoraAdapter,
    settings: dict[str, object],
    *,
    force: bool = False,
) -> list[str]:
    """Write ``search.json``, ``history.csv`` (the objective per step), ``adapter/`` (the merge at the learned
    coefficients) and, for one coefficient per adapter, ``best.yml`` (the recipe with them as its weights)."""
    from loramerge.adapters.files import save_adapter

    with output_folder(target, force=force) as folder:
        folder.json("search.json", gradient_summary(job, result, settings))
        folder.text("history.csv", "step,objective\n" + "".join(f"{i},{v!r}\n" for i, v in enumerate(result.objective)))
        save_adapter(merged, folder.staging / "adapter", dtype=job.plan(job.space.start).out_dtype)
        written = ["search.json", "history.csv", "adapter/"]
        if len(result.groups) == 1:
            point = [row[0] for row in result.coefficients]
            score = _kept(result) or 0.0
            recipe = job.space.recipe_at(point, job.merge_seed)
            folder.text("best.yml", _recipe_text(recipe, 0, score).replace("candidate 0", "gradient search"))
            written.insert(0, "best.yml")
    return written
