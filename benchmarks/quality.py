"""Merge quality on the shipped skill adapters (SmolLM2-135M-Instruct): which method and space keep
the most of each skill?

For every subset of 2, 3 and 4 of the four skill adapters (weight 1 each, as in task arithmetic), every
adapter method in every space it runs in (core and full; the factor space needs equal ranks, which the
demo's adapters do not have), at each density and, for the random methods, each seed, the merge is
folded into the base and scored by greedy exact match on each skill's held-out prompts. PEFT's own
``add_weighted_adapter`` runs beside them as the peer, with the combination types that accept
different ranks (``svd``, ``ties_svd``, ``dare_ties_svd``). The full space truncates each dense merged
module with the randomized range finder (``full_svd="auto"`` at these sizes). Dense merges of this model
cost 20-40 s each, so by default only ties and dare_ties at density 0.8 run in the full space and
PEFT (``--every-full`` runs all of them, and ties with the exact SVD, in a few hours). A skill's score is
normalised by its own adapter's accuracy; a merge's score is the mean over its skills, then over the
subsets of one size.

    python benchmarks/quality.py            # about 35 minutes on 2 CPU cores
    python benchmarks/quality.py --quick    # a subset in a few minutes

Writes ``benchmarks/results/quality.csv`` (one row per merge and skill), ``quality.png``, a Markdown
summary (``quality.md``, pasted into the README) and ``quality.json`` (the summary, the command, the
machine). ``--from-csv`` redoes the summary of an earlier CSV, whose machine is then "not recorded".
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from _common import this_command, write_earlier_results, write_results

from loramerge import catalogue, load_adapter, merge_adapters
from loramerge.evaluate import evaluate, load_model, load_samples
from loramerge.evaluate.activations import calibration_prompts, input_grams
from loramerge.folding.math import adapter_targets, folded_tensor
from loramerge.io.checkpoint import resolve_model_dir

ROOT = Path(__file__).resolve().parent.parent
SKILLS = ("sentiment", "arithmetic", "dates", "orders")
DENSITY_METHODS = ("ties", "magnitude_prune", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della",
                   "della_linear")  # fmt: skip
RANDOM_METHODS = tuple(
    method for method in DENSITY_METHODS if catalogue.element_methods()[method].random
)  # seeds matter
SPACES = ("core", "full")
# PEFT's add_weighted_adapter types that accept adapters of different ranks -> our method of the same math
PEFT_TYPES = {"svd": "svd", "ties_svd": "ties", "dare_ties_svd": "dare_ties"}
QUICK_METHODS = FULL_METHODS = ("ties", "dare_ties")
DELLA_EPSILON = catalogue.method("della").kernel_defaults["epsilon"]  # its default spread


@dataclass(frozen=True)
class Config:
    method: str
    space: str  # "exact" for base/linear/svd (the space does not change them); "peft" for the peer
    density: float | None = None
    seed: int = 0
    params: tuple[tuple[str, object], ...] = ()  # the method's own parameters (alpha, keep, inner)

    @property
    def label(self) -> str:
        return " ".join([self.method, *(f"{name}={value}" for name, value in self.params)])


def configs(densities: list[float], seeds: list[int], quick: bool, every_full: bool, top: float = 0.8) -> list[Config]:
    """Every merge the benchmark runs on one subset of adapters (the base alone first). A full-space or
    PEFT merge of this model builds a dense delta of every module (~100 M entries per adapter, 20-40 s on
    2 cores, against ~1 s in the core space), so by default only ties and dare_ties at
    density ``top`` run there; ``--every-full`` runs the whole grid in the full space too."""
    runs = [Config("base", "exact"), Config("linear", "exact"), Config("svd", "exact"), Config("svd", "peft")]
    methods = QUICK_METHODS if quick else DENSITY_METHODS
    for method, space, density in itertools.product(methods, SPACES, densities):
        if space == "full" and not every_full and (method not in FULL_METHODS or density != top):
            continue
        if method.startswith("della") and density + DELLA_EPSILON >= 1:  # its keep-probabilities leave [0, 1]
            continue
        for seed in seeds if method in RANDOM_METHODS else (0,):
            runs.append(Config(method, space, density, seed))
    if not quick:  # the whole-matrix methods at their natural settings (core space: cores suffice)
        runs += [Config("iso_c", "core", None, 0, (("alpha", alpha),)) for alpha in (1.0, 1.5)]
        runs += [Config("tsv_m", "core", None, 0, (("alpha", alpha),)) for alpha in (1.0, 1.5)]
        runs += [Config("knots", "core", d, 0, (("inner", "ties"),)) for d in (0.8, 0.95)]
        runs += [Config("iso_cts", "core", None, 0, (("alpha", alpha),)) for alpha in (1.0, 1.5)]
        runs += [Config("iso_cts", "core", None, 0, (("alpha", 1.5), ("common", c))) for c in (0.5, 0.95)]
        runs += [Config("wudi", "core", None, 0, (("alpha", alpha),)) for alpha in (1.0, 1.5)]
        # DC-Merge: the authors' keep (0.1 % of each task's projected entries), then more of them
        runs += [Config("dc_merge", "core", None, 0, (("keep", keep),)) for keep in (0.001, 0.1, 1.0)]
        # RobustMerge works on the factors (no space): the authors' setting, then gentler pruning
        grid = [(0.2, a) for a in (1.0, 1.5, 2.0, 3.0, 4.0)] + [(0.5, 1.0), (0.5, 2.0), (0.8, 1.0)]
        runs += [Config("robustmerge", "exact", d, 0, (("alpha", a),)) for d, a in grid]
        # RegMean with each skill's 64 dev prompts as its calibration: the off-diagonal shrinkage its authors use
        # most (0.9), and the strong one of their other settings (0.1)
        runs += [Config("regmean", "exact", None, 0, (("off_diagonal", a),)) for a in (0.9, 0.1)]
        # LARV's per-block scales (they read the base's weights) on the three mergers it is offered for: the tiered
        # gate (which the paper's abstract finds the more robust; its tier values are loramerge's), and for the
        # default merge the continuous one
        runs += [Config(m, "core", None, 0, (("larv", "tiered"),)) for m in ("iso_c", "iso_cts", "tsv_m")]
        runs.append(Config("iso_c", "core", None, 0, (("larv", "continuous"),)))
    runs.append(Config("ties", "peft", top))
    if every_full:
        runs.append(Config("ties", "full_exact", top))  # the randomized truncation against the exact one
        runs += [Config("ties", "peft", d) for d in densities if d != top] + [Config("dare_ties", "peft", top)]
    return runs


def merge(adapters, config: Config, grams=None, base: str | None = None):
    params: dict[str, object] = {"seed": config.seed}
    if catalogue.method(config.method).calibrated:
        params["grams"] = grams
    if dict(config.params).get("larv", "none") != "none":
        params["base"] = base
    if config.space == "full_exact":
        params.update(space="full", full_svd="exact")
    elif config.space != "exact":
        params["space"] = config.space
    if config.density is not None:
        params["density"] = config.density
    if config.params:
        params["params"] = dict(config.params)
    started = time.perf_counter()
    merged = merge_adapters(adapters, [1.0] * len(adapters), config.method, **params)
    return merged, time.perf_counter() - started


def load_folded(model, base_state: dict[str, torch.Tensor], adapter) -> None:
    """Put ``base + adapter`` into ``model`` in place (the same fold ``loramerge fold`` writes); no adapter:
    the base."""
    state = dict(base_state)
    for key, target in adapter_targets(adapter).items() if adapter is not None else ():
        state[key] = folded_tensor(adapter, target, key, base_state[key])
    model.load_state_dict(state, strict=False)


def scores(model, tokenizer, samples: dict[str, list], skills) -> dict[str, float]:
    return {skill: evaluate(model, tokenizer, samples[skill], skill, batch_size=100).exact_match for skill in skills}


def peft_model_with(model, adapters: Path, skills: tuple[str, ...]):
    """The peer: a PeftModel on a copy of the base holding every skill adapter under its skill's name."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(adapters / skills[0]), adapter_name=skills[0])
    for skill in skills[1:]:
        peft_model.load_adapter(str(adapters / skill), adapter_name=skill)
    return peft_model.eval()


def peft_scores(peft_model, tokenizer, samples, subset, config: Config) -> tuple[dict[str, float], float]:
    """PEFT's add_weighted_adapter as its users call it, scored with the merged adapter active."""
    peft_type = {method: peft_type for peft_type, method in PEFT_TYPES.items()}[config.method]
    kwargs = {"density": config.density} if config.density is not None else {}
    torch.manual_seed(config.seed)  # PEFT's DARE draws from the global generator
    started = time.perf_counter()
    with torch.no_grad():
        peft_model.add_weighted_adapter(list(subset), [1.0] * len(subset), "merged", combination_type=peft_type,
                                        **kwargs)  # fmt: skip
    seconds = time.perf_counter() - started
    peft_model.set_adapter("merged")
    result = scores(peft_model, tokenizer, samples, subset)
    peft_model.delete_adapter("merged")
    return result, seconds


def run(args) -> list[dict[str, object]]:
    torch.set_num_threads(args.threads)
    skills = tuple(args.skills)
    adapters = {skill: load_adapter(str(args.adapters / skill)) for skill in skills}
    base_ref = args.base or adapters[skills[0]].base_ref
    model, tokenizer = load_model(str(resolve_model_dir(base_ref)))
    base_state = {key: value.clone() for key, value in model.state_dict().items()}
    samples = {
        skill: load_samples(args.data / f"{skill}.eval.jsonl", prompt_field="prompt",
                            completion_field="completion", max_samples=args.samples)
        for skill in skills
    }  # fmt: skip
    plan = configs(args.densities, args.seeds, args.quick, args.every_full, args.full_density)
    plan = [config for config in plan if not args.only or config.space in args.only]
    plan = [config for config in plan if not args.methods or config.method in args.methods]
    plan = [config for config in plan if not args.with_param or args.with_param in dict(config.params)]
    grams = {}  # RegMean's calibration: the base's activations on each skill's dev prompts
    if any(catalogue.method(config.method).calibrated for config in plan if config.method != "base"):
        for skill in skills:
            prompts = calibration_prompts(args.data / f"{skill}.dev.jsonl")
            grams[skill] = input_grams(model, tokenizer, prompts, sorted(adapters[skill].modules))
    own = {}
    for skill in skills:
        load_folded(model, base_state, adapters[skill])
        own[skill] = scores(model, tokenizer, samples, [skill])[skill]
    print("own adapters:", {skill: round(acc, 3) for skill, acc in own.items()}, flush=True)
    load_folded(model, base_state, None)  # the peer's copy must start from the base itself
    peft_model = peft_model_with(model, args.adapters, skills)
    rows = []
    subsets = [s for k in args.sizes for s in itertools.combinations(skills, k)]
    for number, subset in enumerate(subsets, start=1):
        chosen = [adapters[skill] for skill in subset]
        started = time.perf_counter()
        for config in plan:
            if config.space == "peft":
                accuracy, seconds = peft_scores(peft_model, tokenizer, samples, subset, config)
            else:
                subset_grams = [grams.get(skill) for skill in subset]
                merged, seconds = (
                    (None, 0.0) if config.method == "base" else merge(chosen, config, subset_grams, base_ref)
                )
                load_folded(model, base_state, merged)
                accuracy = scores(model, tokenizer, samples, subset)
            for skill, value in accuracy.items():
                method, space = config.label, config.space
                if space == "full_exact":
                    method, space = f"{method} (exact SVD)", "full"
                rows.append({
                    "size": len(subset), "subset": "+".join(subset), "method": method, "space": space,
                    "density": "" if config.density is None else config.density, "seed": config.seed, "skill": skill,
                    "accuracy": value, "own_accuracy": own[skill], "normalised": value / own[skill],
                    "merge_seconds": seconds,
                })  # fmt: skip
        elapsed = time.perf_counter() - started
        print(f"[{number}/{len(subsets)}] {'+'.join(subset)}: {len(plan)} merges in {elapsed:.0f} s", flush=True)
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


def summary_rows(summary: dict[tuple, dict[str, float]]) -> list[dict[str, object]]:
    """``summarise``'s result as JSON rows."""
    return [{"size": size, "method": method, "space": space, "density": density, **stats}
            for (size, method, space, density), stats in sorted(summary.items(), key=str)]  # fmt: skip


def _cell(stats: dict[str, float] | None) -> str:
    if stats is None:
        return "–"
    if stats["max"] - stats["min"] < 5e-4:
        return f"{stats['mean']:.3f}"
    return f"{stats['mean']:.3f} ({stats['min']:.2f}–{stats['max']:.2f})"


def _ms(stats: dict[str, float] | None) -> str:
    return "–" if stats is None else f"{stats['seconds'] * 1000:.0f}"


COLUMNS = ("core", "full", "peft")
SPACE_NAMES = {"exact": "exact", "core": "core", "full": "full", "peft": "PEFT"}


def overview(summary: dict[tuple, dict[str, float]], sizes: list[int]) -> str:
    """One row per (method, space, density), best first: the mean normalised accuracy for each number of
    adapters, their mean, and the median merge time."""
    sizes = sorted({key[0] for key in summary} & set(sizes))
    rows = []
    for method, space, density in {key[1:] for key in summary}:
        cells = [summary.get((size, method, space, density)) for size in sizes]
        means = [cell["mean"] for cell in cells if cell]
        seconds = statistics.median(cell["seconds"] for cell in cells if cell)
        rows.append((statistics.mean(means), method, space, density, cells, seconds))
    lines = ["| method | space | density | " + " | ".join(f"{n} adapters" for n in sizes) + " | mean | merge ms |",
             "|---|---|---|" + "---|" * len(sizes) + "---|---|"]  # fmt: skip
    for mean, method, space, density, cells, seconds in sorted(rows, key=lambda row: (-row[0], *map(str, row[1:4]))):
        lines.append(f"| {method} | {SPACE_NAMES[space]} | {density or '–'} | " + " | ".join(map(_cell, cells))
                     + f" | **{mean:.3f}** | {seconds * 1000:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def markdown(summary: dict[tuple, dict[str, float]], sizes: list[int]) -> str:
    """One table per number of adapters: a row per method and density, core/full/PEFT side by side."""
    lines = []
    keys = sorted({(method, density) for (_, method, _, density) in summary},
                  key=lambda k: (k[0] != "base", k[0], str(k[1])))  # fmt: skip
    for size in sorted({key[0] for key in summary} & set(sizes)):
        lines += [f"**{size} adapters** — mean normalised accuracy (min–max over seeds); median merge time",
                  "", "| method | density | core (exact: base, linear, svd, robustmerge) | full "
                  "| PEFT add_weighted_adapter | ms core / full / PEFT |", "|---|---|---|---|---|---|"]  # fmt: skip
        for method, density in keys:
            cells = [summary.get((size, method, space, density)) for space in COLUMNS]
            if cells[0] is None:  # methods with no space (base, linear, svd, robustmerge): their exact cell
                cells[0] = summary.get((size, method, "exact", density))
            if not any(cells):
                continue
            times = " / ".join(map(_ms, cells))
            lines.append(f"| {method} | {density or '–'} | " + " | ".join(map(_cell, cells)) + f" | {times} |")
        lines.append("")
    return "\n".join(lines)


# the default merge (``loramerge merge`` with no method or parameter) as the summary names it
DEFAULT_LABEL = (f"{catalogue.DEFAULT_METHOD} alpha=1.0", catalogue.DEFAULT_SPACE)


def _family(method: str, space: str) -> str:
    """The colour group of a row: the peer, the exact references, whole-matrix methods, element-wise ones."""
    name = method.split(" ")[0]
    if space == "peft":
        return "PEFT add_weighted_adapter"
    if space == "exact":
        return "exact / on the factors"
    return "whole-matrix (core)" if name in catalogue.matrix_methods() else f"element-wise ({space})"


def plot(summary: dict[tuple, dict[str, float]], sizes: list[int], path: Path) -> None:
    """One panel per number of adapters: every merge the benchmark ran, sorted by score (min–max over seeds as
    error bars), coloured by kind, the default marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(sum(1 for key in summary if key[0] == size) for size in sizes)
    figure, axes = plt.subplots(1, len(sizes), figsize=(6.5 * len(sizes), 0.17 * rows + 1.6), squeeze=False)
    families = sorted({_family(key[1], key[2]) for key in summary})
    colors = dict(zip(families, plt.get_cmap("tab10").colors, strict=False))
    for ax, size in zip(axes[0], sizes, strict=True):
        entries = sorted(((key, stats) for key, stats in summary.items() if key[0] == size),
                         key=lambda entry: entry[1]["mean"])  # fmt: skip
        default = [(key[1], key[2]) == DEFAULT_LABEL for key, _ in entries]
        names = [f"{key[1]} · {key[2]}" + (f" · {key[3]:g}" if key[3] != "" else "") + ("  (default)" if mark else "")
                 for (key, _), mark in zip(entries, default, strict=True)]  # fmt: skip
        means = [stats["mean"] for _, stats in entries]
        spread = [[m - stats["min"] for m, (_, stats) in zip(means, entries, strict=True)],
                  [stats["max"] - m for m, (_, stats) in zip(means, entries, strict=True)]]  # fmt: skip
        ax.barh(range(len(entries)), means, xerr=spread, error_kw={"lw": 0.6},
                color=[colors[_family(key[1], key[2])] for key, _ in entries])  # fmt: skip
        ax.set_yticks(range(len(entries)), names, fontsize=6)
        for tick, mark in zip(ax.get_yticklabels(), default, strict=True):
            tick.set_fontweight("bold" if mark else "normal")
        ax.set_title(f"{size} adapters")
        ax.set_xlabel("accuracy / own adapter's accuracy")
        ax.set_xlim(0, 1.05)
        ax.grid(axis="x", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[family]) for family in families]
    axes[0][0].legend(handles, families, fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description="Merge quality of every method and space on the skill adapters.")
    parser.add_argument("--samples", type=int, default=20, help="Held-out prompts per skill.")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.8, 0.95])
    parser.add_argument("--full-density", type=float, default=0.8, help="The density of the full-space and PEFT rows.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="Seeds of the random methods.")
    parser.add_argument("--quick", action="store_true", help="ties and dare_ties only, 20 prompts, 2 and 4 adapters.")
    parser.add_argument(
        "--every-full",
        action="store_true",
        help="Every method and density in the full space and PEFT too, and ties with the exact SVD (hours).",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["exact", "core", "full", "full_exact", "peft"],
        help="Run only the merges in these spaces (the others' rows: --keep-from).",
    )
    parser.add_argument("--methods", nargs="+", help="Run only these methods (the others' rows: --keep-from).")
    parser.add_argument("--with-param", help="Run only the merges setting this parameter (larv, say).")
    parser.add_argument("--keep-from", type=Path, help="With --only/--methods: the other rows from this earlier CSV.")
    parser.add_argument("--skills", nargs="+", default=list(SKILLS), help="Adapter folders under --adapters.")
    parser.add_argument("--base", help="The base model (default: the adapters' base_model_name_or_path).")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 3, 4], help="Numbers of adapters merged.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--adapters", type=Path, default=ROOT / "adapters", help="The skill adapters' folder.")
    parser.add_argument("--data", type=Path, default=ROOT / "adapters" / "data", help="<skill>.eval/dev.jsonl.")
    parser.add_argument("--from-csv", type=Path, help="Only redo the summary and plot from an earlier CSV.")
    parser.add_argument("--plot-only", type=Path, help="Only redraw the plot from this CSV (no summary is rewritten).")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = parser.parse_args()
    if args.plot_only:
        plot(summarise(read_rows(args.plot_only)), args.sizes, args.out / "quality.png")
        return
    if args.quick:
        args.samples, args.sizes, args.seeds = min(args.samples, 20), [2, 4], args.seeds[:1]
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
        if (args.only or args.methods or args.with_param) and args.keep_from:

            def rerun(row: dict[str, object]) -> bool:
                in_space = not args.only or row["space"] in args.only
                in_method = not args.methods or str(row["method"]).split(" ")[0] in args.methods
                return in_space and in_method and (not args.with_param or f" {args.with_param}=" in str(row["method"]))

            rows = [row for row in read_rows(args.keep_from) if not rerun(row)] + rows
        with open(args.out / "quality.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    summary = summarise(rows)
    table = overview(summary, args.sizes) + "\n" + markdown(summary, args.sizes)
    if (args.only or args.methods or args.with_param) and args.keep_from and not args.from_csv:
        rerun = " ".join(
            [*(args.methods or []), *(args.only or []), *([f"with {args.with_param}"] * bool(args.with_param))]
        )
        table += (
            f"\nOnly the rows of {rerun} were run now (machine below); the others are kept from "
            f"{args.keep_from}, an earlier run, with that run's timings.\n"
        )
    figures: dict[str, object] = {"summary": summary_rows(summary), "scores": len(rows)}
    if args.from_csv:  # the CSV records neither the machine nor the command of the run that scored it
        write_earlier_results("quality", figures, table, this_command(), folder=args.out)
    else:
        figures["seconds"] = time.perf_counter() - started
        write_results("quality", figures, table, folder=args.out)
    plot(summary, args.sizes, args.out / "quality.png")
    print(table)
    print(f"{len(rows)} scores in {time.perf_counter() - started:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
