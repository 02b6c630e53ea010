"""Which peak learning rate should ``loramerge finetune`` default to? On the demo, as a user runs it: merge
the four shipped skill adapters with the defaults (Iso-C), then ``finetune`` the merge with the README's
settings (the four ``adapters/data/<skill>.dev.jsonl`` files, ``--max-samples 32``, 100 steps of batch 16)
at each learning rate, in child processes. Every model is scored twice:

- training loss: the token-weighted mean loss of the completions of the 128 training examples, before
  and after (the fine-tune's own data: a rate that raises it damages the adapter);
- held-out exact match per skill on the first ``--samples`` prompts of each ``<skill>.eval.jsonl``, which
  the fine-tune never sees, scored as ``benchmarks/after_merge.py`` scores them.

The chosen rate is the one with the best mean held-out exact match; a tie goes to the lower rate.

    python benchmarks/finetune_lr.py        # about 35 minutes on 2 CPU cores

Writes ``benchmarks/results/finetune_lr.json`` and ``finetune_lr.md`` (the table of docs/finetune.md).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import write_results
from after_merge import BASE, DATA, ROOT, SKILLS, loramerge, repeated

from loramerge.evaluate import evaluate, load_model
from loramerge.evaluate.data import Sample, load_samples
from loramerge.evaluate.suite import load_datasets

LEARNING_RATES = (1e-4, 2e-4, 3e-4, 5e-4, 1e-3)
MERGED = "merge, no fine-tune"


def measured(adapter: Path, train: list[Sample], held_out: dict, seconds: float) -> dict[str, object]:
    """One row of figures, from one load of the base with ``adapter``: the mean completion loss on the
    fine-tune's own examples, and the held-out exact match per skill (as after_merge.held_out_scores scores
    it) and its mean."""
    model, tokenizer = load_model(BASE, adapter=str(adapter))
    scores = {name: evaluate(model, tokenizer, samples, str(adapter), data=name).exact_match
              for name, samples in held_out.items()}  # fmt: skip
    loss = evaluate(model, tokenizer, train, str(adapter), data="train").loss
    return {"train_loss": loss, "held_out": scores, "mean": sum(scores.values()) / len(scores), "seconds": seconds}


def chosen(rows: dict[str, dict]) -> str:
    """The learning rate with the best mean held-out exact match; ties go to the lower rate (the safer
    one for an adapter that already works)."""
    rates = [name for name in rows if name != MERGED]
    # rounded: equal exact-match counts summed in another order may differ in the last bit
    return max(sorted(rates, key=float), key=lambda name: round(rows[name]["mean"], 9))  # max keeps the first


def table(rows: dict[str, dict], best: str) -> str:
    before = rows[MERGED]["train_loss"]
    header = ["learning rate", "training loss (before → after)", *SKILLS, "mean", "seconds (command)"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name, row in rows.items():
        loss = f"{before:.3f}" if name == MERGED else f"{before:.3f} → {row['train_loss']:.3f}"
        cells = " | ".join(f"{100 * row['held_out'][skill]:.1f} %" for skill in SKILLS)
        mean = f"**{100 * row['mean']:.1f} %**" if name == best else f"{100 * row['mean']:.1f} %"
        lines.append(f"| {name} | {loss} | {cells} | {mean} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def report(rows: dict[str, dict], args: argparse.Namespace, examples: int) -> None:
    """(Re)write the results files with the rows so far: a run stopped late keeps what it measured."""
    best = chosen(rows) if len(rows) > 1 else ""
    settings = {"steps": args.steps, "batch_size": args.batch_size, "dev_samples_per_skill": args.dev_samples,
                "held_out_per_skill": args.samples, "training_examples": examples}  # fmt: skip
    figures = {"settings": settings, "rows": rows, "chosen": best}
    write_results("finetune_lr", figures, table(rows, best), folder=args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description="finetune of the demo merge at several learning rates.")
    parser.add_argument("--samples", type=int, default=100, help="Held-out prompts per skill.")
    parser.add_argument("--dev-samples", type=int, default=32, help="Training examples per skill.")
    parser.add_argument("--steps", type=int, default=100, help="Fine-tuning steps.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, nargs="+", default=LEARNING_RATES, help="Learning rates to try.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = parser.parse_args()
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one bar per model load would bury the commands' output

    dev = [DATA / f"{skill}.dev.jsonl" for skill in SKILLS]
    fields = {"prompt_field": "prompt", "completion_field": "completion"}
    # the held-out sets first: load_datasets also quiets the datasets library's progress bars
    held_out = load_datasets([ROOT / DATA / f"{skill}.eval.jsonl" for skill in SKILLS], max_samples=args.samples,
                             **fields)  # fmt: skip
    train = [row for path in dev for row in load_samples(ROOT / path, max_samples=args.dev_samples, **fields)]
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="finetune-lr-") as scratch:
        merged = Path(scratch) / "merged"
        seconds = loramerge("merge", *(Path("adapters") / s for s in SKILLS), "-o", merged)
        rows[MERGED] = measured(merged, train, held_out, seconds)
        report(rows, args, len(train))
        for lr in args.lr:
            trained = Path(scratch) / f"lr-{lr:g}"
            seconds = loramerge("finetune", merged, *repeated("--data", dev), "--max-samples", args.dev_samples,
                                "--steps", args.steps, "--batch-size", args.batch_size, "--lr", f"{lr:g}",
                                "-o", trained)  # fmt: skip
            rows[f"{lr:g}"] = measured(trained, train, held_out, seconds)
            report(rows, args, len(train))
    print(table(rows, chosen(rows)))


if __name__ == "__main__":
    main()
