"""The quality benchmark on two bases side by side: which merges keep the most of the skill adapters on
SmolLM2-135M-Instruct and on Gemma 3 270M, and does the default hold on both?

Reads the summaries ``benchmarks/quality.py`` wrote for each base (``benchmarks/results/quality.json``,
``benchmarks/results/gemma3/quality.json``); for every merge both ran, its mean over 2, 3 and 4 adapters on each
base, its rank there, and the mean of the two. Writes ``quality_two_bases.md`` / ``.json`` (no model is run).

    python benchmarks/two_bases.py
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _common import RESULTS, write_results

DEFAULT = ("iso_c alpha=1.0", "core", "")


def means(path: Path) -> dict[tuple, float]:
    """(method, space, density) -> the mean over the numbers of adapters of the mean normalised accuracy."""
    per_size: dict[tuple, list[float]] = {}
    for row in json.loads(path.read_text())["figures"]["summary"]:
        per_size.setdefault((row["method"], row["space"], row["density"]), []).append(row["mean"])
    return {key: statistics.mean(values) for key, values in per_size.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first", type=Path, default=RESULTS / "quality.json")
    parser.add_argument("--second", type=Path, default=RESULTS / "gemma3" / "quality.json")
    parser.add_argument("--names", nargs=2, default=["SmolLM2-135M", "Gemma 3 270M"])
    parser.add_argument("--top", type=int, default=15, help="Rows shown: the best by the mean of both bases.")
    args = parser.parse_args()
    first, second = means(args.first), means(args.second)
    shared = [key for key in first if key in second and key[0] != "base"]
    ranks = [{key: i + 1 for i, key in enumerate(sorted(shared, key=lambda k, t=table: -t[k]))}
             for table in (first, second)]  # fmt: skip
    rows = sorted(shared, key=lambda k: -(first[k] + second[k]))
    shown = rows[: args.top] + [k for k in rows[args.top :] if k == DEFAULT or k[0].startswith(("regmean", "linear"))]
    names = args.names
    lines = [f"| merge | space | density | {names[0]} | rank | {names[1]} | rank | mean of both |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key in shown:
        method, space, density = key
        label = f"**{method}** (default)" if key == DEFAULT else method
        lines.append(f"| {label} | {space} | {density or '–'} | {first[key]:.3f} | {ranks[0][key]} | "
                     f"{second[key]:.3f} | {ranks[1][key]} | **{(first[key] + second[key]) / 2:.3f}** |")  # fmt: skip
    best = [max(shared, key=lambda k, t=table: t[k]) for table in (first, second)]
    table = (
        f"Mean normalised accuracy (a skill's exact match over its own adapter's, averaged over skills, subsets "
        f"and 2, 3 and 4 adapters) of the {len(shared)} merges both runs made, the best {args.top} by the mean "
        f"of both bases, then the default, RegMean and the plain sum where lower.\n\n" + "\n".join(lines) + "\n\n"
        f"Best on {names[0]}: {' '.join(map(str, best[0]))}; on {names[1]}: {' '.join(map(str, best[1]))}.\n"
    )
    figures = {
        "first": str(args.first), "second": str(args.second), "merges": len(shared),
        "rows": [{"method": k[0], "space": k[1], "density": k[2], "first": first[k], "second": second[k],
                  "first_rank": ranks[0][k], "second_rank": ranks[1][k]} for k in rows],
    }  # fmt: skip
    write_results("quality_two_bases", figures, table)
    print(table)


if __name__ == "__main__":
    main()
