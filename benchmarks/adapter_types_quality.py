"""Merge quality of DoRA and LoHa adapters on the real demo base, beside the LoRA pair they were trained as.

    python benchmarks/adapter_types_quality.py [--samples 100]

The demo's sentiment and dates skills, each trained as LoRA (``adapters/<skill>``), DoRA
(``adapters/<skill>-dora``) and LoHa (``adapters/<skill>-loha``) by ``examples/make_demo.py --type``, same
data, rank, steps and seed. Every pair of one sentiment and one dates adapter is merged with the default
method (Iso-C, core space) and with ``linear`` (the exact sum; for DoRA the exact sum of the folded deltas,
with the base's row norms), folded into the base as ``loramerge fold`` writes it, and scored by greedy exact
match on the first ``--samples`` held-out prompts of each skill. A skill's score is divided by its own
input adapter's on the same prompts, then averaged over the two skills, as in ``benchmarks/quality.py``.

Writes ``benchmarks/results/adapter_types_quality.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch
from _common import ROOT, write_results
from quality import load_folded, scores

from loramerge import load_adapter, merge_adapters
from loramerge.catalogue import DEFAULT_METHOD
from loramerge.evaluate import load_model, load_samples
from loramerge.io.checkpoint import resolve_model_dir

SKILLS = ("sentiment", "dates")
TYPES = {"LoRA": "", "DoRA": "-dora", "LoHa": "-loha"}
METHODS = (DEFAULT_METHOD, "linear")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--adapters", type=Path, default=ROOT / "adapters")
    args = parser.parse_args()
    torch.set_num_threads(2)
    adapters = {(skill, kind): load_adapter(str(args.adapters / f"{skill}{suffix}"))
                for skill in SKILLS for kind, suffix in TYPES.items()}  # fmt: skip
    base = adapters[(SKILLS[0], "LoRA")].base_model
    model, tokenizer = load_model(str(resolve_model_dir(base)))
    base_state = {key: value.clone() for key, value in model.state_dict().items()}
    samples = {skill: load_samples(args.adapters / f"data/{skill}.eval.jsonl", prompt_field="prompt",
                                   completion_field="completion", max_samples=args.samples)
               for skill in SKILLS}  # fmt: skip
    own = {}
    for (skill, kind), adapter in adapters.items():
        load_folded(model, base_state, adapter)
        own[(skill, kind)] = scores(model, tokenizer, samples, [skill])[skill]
        print(f"{skill} {kind}: {own[(skill, kind)]:.2f}", flush=True)
    rows = []
    for first, second in itertools.product(TYPES, TYPES):
        pair = [adapters[(SKILLS[0], first)], adapters[(SKILLS[1], second)]]
        for method in METHODS:
            started = time.perf_counter()
            merged = merge_adapters(pair, [1.0, 1.0], method, base=base)
            seconds = time.perf_counter() - started
            load_folded(model, base_state, merged)
            accuracy = scores(model, tokenizer, samples, SKILLS)
            kinds = {SKILLS[0]: first, SKILLS[1]: second}
            kept = {skill: accuracy[skill] / own[(skill, kinds[skill])] for skill in SKILLS}
            rows.append({
                "sentiment": first, "dates": second, "method": method, "accuracy": accuracy, "kept": kept,
                "mean_kept": sum(kept.values()) / 2, "merge_seconds": seconds, "output": merged.kind,
            })  # fmt: skip
            print(rows[-1], flush=True)
    lines = [
        f"Pairs of the demo's sentiment and dates skills, each trained as LoRA, DoRA and LoHa (`examples/make_demo.py "
        f"--type`); greedy exact match on the first {args.samples} held-out prompts per skill, and that score "
        "divided by the input adapter's own (kept).",
        "",
        "| own adapter | " + " | ".join(f"{skill} {kind}" for skill in SKILLS for kind in TYPES) + " |",
        "|---|" + "---|" * (len(SKILLS) * len(TYPES)),
        "| exact match | " + " | ".join(f"{own[(skill, kind)]:.0%}" for skill in SKILLS for kind in TYPES) + " |",
        "",
        "| sentiment | dates | method | output | sentiment | dates | kept (mean) | merge s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['sentiment']} | {row['dates']} | {row['method']} | {row['output']} | "
            f"{row['accuracy']['sentiment']:.0%} | {row['accuracy']['dates']:.0%} | **{row['mean_kept']:.3f}** | "
            f"{row['merge_seconds']:.2f} |"
        )
    figures = {"own": {f"{skill} {kind}": value for (skill, kind), value in own.items()}, "rows": rows}
    write_results("adapter_types_quality", figures, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
