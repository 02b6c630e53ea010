"""The search loop: a nevergrad optimiser asks a batch of candidates, the pool scores them, and they are
told back in candidate order. The batch size (not the worker count) is the optimiser's parallelism, so
for a seed and budget the candidates and the history are the same with 1 worker, K workers or Ray.

The score is LoraHub's (Huang et al., COLM 2024, arXiv:2307.13269) gradient-free objective made the
merge's retention: the mean over dev sets of the merge's exact match over the best input adapter's
(``kept vs. adapters``), or the negative mean loss."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from loramerge.errors import BadInput
from loramerge.evaluate.suite import retention
from loramerge.search.evaluator import Scores, Task
from loramerge.search.job import SearchJob
from loramerge.search.pools import Pool

Objective = Literal["exact_match", "loss"]
Progress = Callable[[int, int, str], None]
DEFAULT_OPTIMIZER = "CMA"  # CMA-ES, as mergekit-evolve; NGOpt can pick a metamodel that fails on numpy 2.3+


@dataclass(frozen=True)
class Candidate:
    index: int
    batch: int
    point: tuple[float, ...]
    score: float  # higher is better: retention, or the negative mean loss; -inf when the merge was refused
    scores: Scores


@dataclass(frozen=True)
class SearchResult:
    candidates: list[Candidate]  # in candidate order; the first is the recipe's own values
    references: list[Scores]  # each input adapter alone on the dev sets
    best_exact_match: dict[str, float]  # per dev set, the best input adapter's

    @property
    def best(self) -> Candidate:
        """The highest score; the earliest candidate among equals."""
        best = max(self.candidates, key=lambda c: (c.score, -c.index))
        if best.scores.refused:
            raise BadInput(f"search: every candidate was refused, the first: {self.candidates[0].scores.refused}")
        return best

    @property
    def start(self) -> Candidate:
        return self.candidates[0]


def nevergrad_module():
    try:
        import nevergrad
    except ImportError:
        raise BadInput("search needs nevergrad: pip install 'loramerge[search]'") from None
    return nevergrad


def make_optimizer(job: SearchJob, name: str, budget: int, batch: int):
    """A seeded nevergrad optimiser over the space's box; its first candidate is the recipe's own point."""
    import numpy as np

    ng = nevergrad_module()
    dimensions = job.space.dimensions
    lows, highs = np.array([d.low for d in dimensions]), np.array([d.high for d in dimensions])
    box = ng.p.Array(init=np.array(job.space.start, dtype=float), lower=lows, upper=highs)  # step: a 6th of the box
    box.random_state = np.random.RandomState(job.seed)
    optimizer = ng.optimizers.registry[name](parametrization=box, budget=budget, num_workers=batch)
    optimizer.suggest(np.array(job.space.start, dtype=float))
    return optimizer


def check_settings(job: SearchJob, objective: str, optimizer: str, budget: int, batch: int) -> None:
    """Refuse, before any worker starts, settings that cannot run (an objective the dev data cannot give)."""
    if budget < 1 or batch < 1:
        raise BadInput(f"`budget` and `batch` must be at least 1 (got {budget} and {batch})", param="budget")
    registry = nevergrad_module().optimizers.registry
    if optimizer not in registry:
        raise BadInput(
            f"`optimizer='{optimizer}'`: not a nevergrad optimiser (e.g. CMA, TwoPointsDE, DE, OnePlusOne)",
            param="optimizer",
        )
    if batch > 1 and getattr(registry[optimizer], "no_parallelization", False):
        why = "does not support parallelization (try `batch=1`)"
        raise BadInput(f"`optimizer='{optimizer}'`: {why}", param="optimizer")
    refusal = _build_refusal(job, optimizer, budget, batch)
    if refusal:
        raise BadInput(f"`optimizer='{optimizer}'`: {refusal}", param="optimizer")
    if objective not in ("exact_match", "loss"):
        raise BadInput(f"`objective='{objective}'`: choose exact_match or loss", param="objective")
    if objective == "exact_match" and not all(any(s.prompt for s in samples) for samples in job.dev.values()):
        raise BadInput(
            "`objective='exact_match'` needs prompt/completion dev data; use `objective='loss'`", param="objective"
        )


def _build_refusal(job: SearchJob, optimizer: str, budget: int, batch: int) -> str:
    """Why the optimiser cannot be built with these settings ("" when it can): some refuse parallel asks
    only when built. The half-built object's ``__del__`` then fails too (nevergrad 1.0); that report
    would print a traceback, so it is silenced while the object goes."""
    import sys

    hook, sys.unraisablehook = sys.unraisablehook, lambda _: None
    try:
        make_optimizer(job, optimizer, budget, batch)
    except ValueError as error:
        return str(error).splitlines()[0]
    finally:
        import gc

        gc.collect()
        sys.unraisablehook = hook
    return ""


def objective_score(scores: Scores, objective: Objective, best: dict[str, float]) -> float:
    if scores.refused:
        return float("-inf")
    if objective == "loss":
        return -sum(scores.loss.values()) / len(scores.loss)
    kept = retention(scores.exact_match, best)
    return float("nan") if kept is None else kept


def best_exact_match(references: Sequence[Scores], objective: Objective) -> dict[str, float]:
    """Per dev set, the best input adapter's exact match (what retention divides by)."""
    best = {name: max(r.exact_match[name] or 0.0 for r in references) for name in references[0].exact_match}
    if objective == "exact_match" and not any(best.values()):
        raise BadInput("no input adapter gets any dev example right: exact match cannot guide the search; "
                       "use `objective='loss'`", param="objective")  # fmt: skip
    return best


def _penalty(candidates: Sequence[Candidate]) -> float:
    """What the optimiser is told for a refused point: worse than every score so far."""
    scores = [c.score for c in candidates if c.score > float("-inf")]
    return min(scores, default=0.0) - 1.0


def search(
    job: SearchJob,
    pool: Pool,
    *,
    budget: int,
    batch: int = 4,
    optimizer: str = DEFAULT_OPTIMIZER,
    objective: Objective = "exact_match",
    progress: Progress | None = None,
) -> SearchResult:
    """Score the input adapters, then ``budget`` candidate merges, ``batch`` at a time."""
    check_settings(job, objective, optimizer, budget, batch)
    chooser = make_optimizer(job, optimizer, budget, batch)
    total = len(job.adapters) + budget
    references = []
    for scores in pool(Task(-1 - i, reference=i) for i in range(len(job.adapters))):
        references.append(scores)
        if progress is not None:
            progress(len(references), total, "input adapters")
    best = best_exact_match(references, objective)
    candidates: list[Candidate] = []
    while len(candidates) < budget:
        asked = [chooser.ask() for _ in range(min(batch, budget - len(candidates)))]
        first, number = len(candidates), len(candidates) // batch
        tasks = [Task(first + i, tuple(float(v) for v in ask.value)) for i, ask in enumerate(asked)]
        for ask, task, scores in zip(asked, tasks, pool(tasks), strict=True):
            candidate = Candidate(task.index, number, task.point, objective_score(scores, objective, best), scores)
            candidates.append(candidate)
            chooser.tell(ask, -candidate.score if candidate.score > float("-inf") else -_penalty(candidates))
            if progress is not None:
                top = max(c.score for c in candidates)
                progress(len(references) + len(candidates), total, f"best {top:.4f}")
    return SearchResult(candidates, references, best)
