"""Searching merge weights on the dev sets, gradient-free against gradients, at the same budget of forward passes:
how much of the four skill adapters does each merge keep on the held-out prompts?

Rows: the default merge (``iso_c``, weights 1); task arithmetic at weights 1 (where the gradient search starts);
``loramerge search`` (CMA-ES over the four weights of the default recipe, exact match on the dev sets); ``loramerge
search --gradient`` (AdaMerging, a coefficient per adapter and layer of task arithmetic), on the entropy of the
next token after each unlabeled dev prompt (the paper's objective) and on the dev loss. Budget: the gradient-free
search scores ``budget`` candidates on every dev row (4 x 64); the gradient searches get as many rows with
gradients, ``budget x 64 x 4 / (4 x batch)`` steps of ``batch`` rows per dev set. Both also score the four
adapters alone on the dev sets, and the gradient search its final merge.

    python benchmarks/search_budget.py                    # about 30 minutes on 2 CPU cores
    python benchmarks/search_budget.py --adapters adapters/gemma3 --out benchmarks/results/gemma3

Writes ``search_budget.json`` / ``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _common import RESULTS, ROOT, write_results

SKILLS = ("sentiment", "arithmetic", "dates", "orders")


def cli(*args: object) -> None:
    command = [sys.executable, "-m", "loramerge.cli", *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")


def recipe(path: Path, method: str, adapters: Path, weights=(1.0, 1.0, 1.0, 1.0)) -> Path:
    entries = [{"adapter": str(adapters / s), "weight": w} for s, w in zip(SKILLS, weights, strict=True)]
    path.write_text(yaml.safe_dump({"merge_method": method, "adapters": entries}))
    return path


class HeldOut:
    """The base loaded once; each merge folded into it in place (as ``quality.py`` scores) and scored by exact match
    on each skill's held-out prompts."""

    def __init__(self, base: str, data: Path, samples: int) -> None:
        from loramerge.evaluate import load_model, load_samples
        from loramerge.io.checkpoint import resolve_model_dir

        self.model, self.tokenizer = load_model(str(resolve_model_dir(base)))
        self.state = {key: value.clone() for key, value in self.model.state_dict().items()}
        self.rows = {skill: load_samples(data / f"{skill}.eval.jsonl", max_samples=samples) for skill in SKILLS}

    def __call__(self, adapter: Path) -> dict[str, float]:
        from quality import load_folded

        from loramerge import load_adapter
        from loramerge.evaluate import evaluate

        load_folded(self.model, self.state, load_adapter(str(adapter)))
        return {skill: evaluate(self.model, self.tokenizer, rows, skill, batch_size=100).exact_match
                for skill, rows in self.rows.items()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=Path, default=ROOT / "adapters")
    parser.add_argument("--data", type=Path, default=ROOT / "adapters" / "data")
    parser.add_argument("--budget", type=int, default=16, help="Candidates of the gradient-free search.")
    parser.add_argument("--batch", type=int, default=16, help="Rows per dev set per gradient step.")
    parser.add_argument("--samples", type=int, default=100, help="Held-out prompts per skill.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    import torch

    from loramerge import load_adapter

    torch.set_num_threads(args.threads)

    base = load_adapter(args.adapters / SKILLS[0]).base_ref
    dev = [args.data / f"{skill}.dev.jsonl" for skill in SKILLS]
    dev_rows = sum(len(path.read_text().splitlines()) for path in dev)
    steps = args.budget * dev_rows // (len(dev) * args.batch)
    held_out = HeldOut(base, args.data, args.samples)
    own = {skill: held_out(args.adapters / skill)[skill] for skill in SKILLS}
    rows, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        data_flags = [flag for path in dev for flag in ("--data", path)]
        common = ["--threads", args.threads, "--seed", args.seed, *data_flags]
        default = recipe(work / "default.yml", "iso_c", args.adapters)
        linear = recipe(work / "linear.yml", "linear", args.adapters)
        runs = {
            "default merge (iso_c, weights 1)": ("run", default, "-o", work / "default"),
            "task arithmetic (linear, weights 1)": ("run", linear, "-o", work / "linear"),
            f"search: CMA-ES, {args.budget} candidates": ("search", default, *common, "--budget", args.budget,
                                                          "--workers", 1, "--write-adapter", "-o", work / "cma"),
            f"search --gradient: entropy, {steps} steps": ("search", linear, "--gradient", *common, "--budget", steps,
                                                           "--batch", args.batch, "-o", work / "entropy"),
            f"search --gradient: dev loss, {steps} steps": ("search", linear, "--gradient", *common, "--budget",
                                                            steps, "--batch", args.batch, "--objective", "loss",
                                                            "-o", work / "loss"),
        }  # fmt: skip
        for label, command in runs.items():
            began = time.perf_counter()
            cli(*command)
            folder = Path(command[-1])
            seconds = time.perf_counter() - began
            adapter = folder / "adapter" if command[0] == "search" else folder
            summary = json.loads((folder / "search.json").read_text()) if command[0] == "search" else {}
            scores = held_out(adapter)
            kept = sum(scores[s] / own[s] for s in SKILLS) / len(SKILLS)
            passes = summary.get("forward_passes")
            if command[0] == "search" and "--gradient" not in command:
                passes = args.budget * dev_rows
            rows.append({"merge": label, "held_out": scores, "kept": kept, "dev_rows_searched": passes,
                         "seconds": seconds})  # fmt: skip
            print(f"{label}: kept {kept:.3f} {scores} in {seconds:.0f} s", flush=True)
    lines = ["| merge | dev rows searched | " + " | ".join(SKILLS) + " | kept vs. adapters | seconds |",
             "|---|---|" + "---|" * len(SKILLS) + "---|---|"]  # fmt: skip
    for row in rows:
        cells = " | ".join(f"{row['held_out'][s]:.2f}" for s in SKILLS)
        searched = row["dev_rows_searched"] or "–"
        lines.append(f"| {row['merge']} | {searched} | {cells} | **{row['kept']:.3f}** | {row['seconds']:.0f} |")
    folder = (
        args.adapters.resolve().relative_to(ROOT) if args.adapters.resolve().is_relative_to(ROOT) else args.adapters
    )
    table = (f"Exact match on the first {args.samples} held-out prompts per skill (the adapters in {folder}, "
             f"own adapters: " + ", ".join(f"{s} {own[s]:.2f}" for s in SKILLS) + "); kept = mean over skills of "
             "the merge's score over the skill's own adapter's.\n\n" + "\n".join(lines) + "\n")  # fmt: skip
    figures = {"rows": rows, "own": own, "budget": args.budget, "steps": steps, "batch": args.batch,
               "seconds": time.perf_counter() - started}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    write_results("search_budget", figures, table, folder=args.out)
    print(table)


if __name__ == "__main__":
    main()
