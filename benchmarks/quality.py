"""Merge quality on the shipped skill adapters: which method and space keep the most of each skill?

For every subset of 2, 3 and 4 skill adapters (weight 1 each, as in task arithmetic), every method in
every space it can run in, densities 0.2/0.5/0.8 and three seeds for the random methods, the merge is
folded into the base and scored by greedy exact match on each skill's held-out set. A skill's score is
normalised by its own adapter's accuracy; a merge's score is the mean over its skills, then over the
subsets of one size.

    python benchmarks/quality.py                    # about 15 minutes on 2 CPU cores
    python benchmarks/quality.py --samples 50 --sizes 2   # a quick look

Writes ``benchmarks/results/quality.csv`` (one row per merge and skill), ``quality.png`` and a
Markdown summary (``quality.md``, pasted into the README).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from loramerge import load_adapter, merge_adapters
from loramerge.evaluate import evaluate, load_model, load_samples
from loramerge.folding import adapter_targets, folded_tensor
from loramerge.kernels import KERNELS

ROOT = Path(__file__).resolve().parent.parent
SKILLS = ("add", "reverse", "sort", "cipher")
DENSITY_METHODS = ("ties", "magnitude_prune", "breadcrumbs", "dare_linear", "dare_ties", "della")
RANDOM_METHODS = tuple(method for method in DENSITY_METHODS if KERNELS[method].random)  # seeds matter
DENSITIES = (0.2, 0.5, 0.8)
SEEDS = (0, 1, 2)
SPACES = ("core", "full", "factors")


@dataclass(frozen=True)
class Config:
    method: str
    space: str  # "exact" for linear/svd in core or full space: their result does not depend on it
    density: float | None = None
    seed: int = 0


def configs(equal_ranks: bool) -> list[Config]:
    """Every merge the benchmark runs on one subset of adapters."""
    spaces = SPACES if equal_ranks else SPACES[:2]
    runs = [Config("linear", "exact"), Config("svd", "exact")]
    if equal_ranks:
        runs.append(Config("linear", "factors"))
    for method, space, density in itertools.product(DENSITY_METHODS, spaces, DENSITIES):
        seeds = SEEDS if method in RANDOM_METHODS else (0,)
        runs += [Config(method, space, density, seed) for seed in seeds]
    return runs


def merge(adapters, config: Config):
    params: dict[str, object] = {"seed": config.seed}
    if config.space != "exact":
        params["space"] = config.space
    if config.density is not None:
        params["density"] = config.density
    started = time.perf_counter()
    merged = merge_adapters(adapters, [1.0] * len(adapters), config.method, **params)
    return merged, time.perf_counter() - started


def load_folded(model, base_state: dict[str, torch.Tensor], adapter) -> None:
    """Put ``base + adapter`` into ``model`` in place (the same fold ``loramerge fold`` writes); no adapter:
    the base."""
    state = dict(base_state)
    for key, target in adapter_targets(adapter).items() if adapter is not None else ():
        state[key] = folded_tensor(adapter, target, key, base_state[key])
    model.load_state_dict(state)


def accuracies(model, tokenizer, base_state, adapter, samples: dict[str, list], skills) -> dict[str, float]:
    load_folded(model, base_state, adapter)
    return {skill: evaluate(model, tokenizer, samples[skill], skill, batch_size=256).exact_match for skill in skills}


def run(args) -> list[dict[str, object]]:
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(str(args.adapters / "base"))
    base_state = {key: value.clone() for key, value in model.state_dict().items()}
    adapters = {skill: load_adapter(str(args.adapters / skill)) for skill in SKILLS}
    samples = {
        skill: load_samples(args.adapters / f"data/{skill}.eval.jsonl", prompt_field="prompt",
                            completion_field="completion", max_samples=args.samples)
        for skill in SKILLS
    }  # fmt: skip
    own = {s: accuracies(model, tokenizer, base_state, adapters[s], samples, [s])[s] for s in SKILLS}
    print("own adapters:", {skill: round(acc, 3) for skill, acc in own.items()})
    rows = []
    subsets = [s for k in args.sizes for s in itertools.combinations(SKILLS, k)]
    for number, subset in enumerate(subsets, start=1):
        chosen = [adapters[skill] for skill in subset]
        equal = len({a.config.get("r") for a in chosen}) == 1
        plan = [Config("base", "exact"), *configs(equal)]  # the base alone: what a merge keeps for free
        started = time.perf_counter()
        for config in plan:
            merged, seconds = (None, 0.0) if config.method == "base" else merge(chosen, config)
            scores = accuracies(model, tokenizer, base_state, merged, samples, subset)
            for skill, accuracy in scores.items():
                rows.append({
                    "size": len(subset), "subset": "+".join(subset), "method": config.method, "space": config.space,
                    "density": "" if config.density is None else config.density, "seed": config.seed, "skill": skill,
                    "accuracy": accuracy, "own_accuracy": own[skill], "normalised": accuracy / own[skill],
                    "merge_seconds": seconds,
                })  # fmt: skip
        elapsed = time.perf_counter() - started
        print(f"[{number}/{len(subsets)}] {'+'.join(subset)}: {len(plan)} merges in {elapsed:.0f} s")
    return rows


def read_rows(path: Path) -> list[dict[str, object]]:
    """The rows of an earlier run's CSV, typed as ``run`` returns them."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["size"], row["seed"] = int(row["size"]), int(row["seed"])
        row["density"] = float(row["density"]) if row["density"] else ""
    return rows


def summarise(rows: list[dict[str, object]]) -> dict[tuple, dict[str, float]]:
    """(size, method, space, density) -> mean normalised accuracy over seeds, its min and max over seeds,
    and the median merge time. Per seed: mean over skills within a subset, then over subsets."""
    per_subset: dict[tuple, list[float]] = defaultdict(list)
    times: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        key = (row["size"], row["method"], row["space"], row["density"])
        per_subset[(*key, row["seed"], row["subset"])].append(float(row["normalised"]))
        times[key].append(float(row["merge_seconds"]))
    per_seed: dict[tuple, list[float]] = defaultdict(list)
    for (*key, seed, _subset), values in per_subset.items():
        per_seed[(*key, seed)].append(statistics.mean(values))
    seeds: dict[tuple, list[float]] = defaultdict(list)
    for (*key, _seed), values in per_seed.items():
        seeds[tuple(key)].append(statistics.mean(values))
    return {
        key: {"mean": statistics.mean(v), "min": min(v), "max": max(v), "seconds": statistics.median(times[key])}
        for key, v in seeds.items()
    }


def _cell(stats: dict[str, float] | None) -> str:
    if stats is None:
        return "–"
    if stats["max"] - stats["min"] < 5e-4:
        return f"{stats['mean']:.3f}"
    return f"{stats['mean']:.3f} ({stats['min']:.2f}–{stats['max']:.2f})"


def markdown(summary: dict[tuple, dict[str, float]], sizes: list[int]) -> str:
    """One table per number of adapters: a row per method and density, core/full/factors side by side."""
    lines = []
    keys = sorted({(method, density) for (_, method, _, density) in summary},
                  key=lambda k: (k[0] != "base", k[0], str(k[1])))  # fmt: skip
    for size in sizes:
        lines += [f"**{size} adapters** — mean normalised accuracy (min–max over seeds); merge time in ms", "",
                  "| method | density | core (exact: base, linear, svd) | full | factors | ms |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for method, density in keys:
            cells = [summary.get((size, method, space, density)) for space in ("core", "full", "factors")]
            if method in ("base", "linear", "svd"):
                cells[0] = summary.get((size, method, "exact", density))
            if not any(cells):
                continue
            ms = statistics.mean(c["seconds"] for c in cells if c) * 1000
            lines.append(f"| {method} | {density or '–'} | " + " | ".join(map(_cell, cells)) + f" | {ms:.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict[tuple, dict[str, float]], sizes: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), sharey=True, squeeze=False)
    colors = dict(zip(DENSITY_METHODS, plt.get_cmap("tab10").colors, strict=False))
    for ax, size in zip(axes[0], sizes, strict=True):
        for method in DENSITY_METHODS:
            for space, style in (("core", "-"), ("full", "--"), ("factors", ":")):
                keys = [(size, method, space, d) for d in DENSITIES]
                points = [(key[3], summary[key]) for key in keys if key in summary]
                if not points:
                    continue
                xs = [d for d, _ in points]
                ax.plot(xs, [s["mean"] for _, s in points], style, color=colors[method], marker="o", markersize=3,
                        label=f"{method} ({space})")  # fmt: skip
                ax.fill_between(xs, [s["min"] for _, s in points], [s["max"] for _, s in points],
                                color=colors[method], alpha=0.12)  # fmt: skip
        for method, color in (("base", "tab:red"), ("linear", "black"), ("svd", "grey")):
            if (size, method, "exact", "") in summary:
                label = "base alone" if method == "base" else f"{method} (exact)"
                ax.axhline(summary[(size, method, "exact", "")]["mean"], color=color, lw=1, ls="-.", label=label)
        ax.set_title(f"{size} adapters")
        ax.set_xlabel("density")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy / own adapter's accuracy")
    axes[0][-1].legend(fontsize=6, ncol=2, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description="Merge quality of every method and space on the skill adapters.")
    parser.add_argument("--samples", type=int, default=200, help="Held-out prompts per skill.")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 3, 4], help="Numbers of adapters merged.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--adapters", type=Path, default=ROOT / "adapters", help="The demo folder.")
    parser.add_argument("--from-csv", type=Path, help="Only redo the summary and plot from an earlier CSV.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = parser.parse_args()
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_csv:
        rows = read_rows(args.from_csv)
    else:
        rows = run(args)
        with open(args.out / "quality.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    summary = summarise(rows)
    table = markdown(summary, args.sizes)
    (args.out / "quality.md").write_text(table)
    plot(summary, args.sizes, args.out / "quality.png")
    print(table)
    print(f"{len(rows)} scores in {time.perf_counter() - started:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
