"""Score a merge on every skill's held-out set against the base and the adapters it came from.

    python examples/evaluate_merge.py [SAMPLES]        # default 50 prompts per skill
"""

from __future__ import annotations

import sys
import tempfile

from loramerge import load_adapter, merge_adapters
from loramerge.evaluate import evaluate, load_model, load_samples

SKILLS = ("add", "reverse", "sort", "cipher")


def main(samples: int) -> None:
    data = {
        skill: load_samples(f"adapters/data/{skill}.eval.jsonl", prompt_field="prompt", completion_field="completion",
                            max_samples=samples)
        for skill in SKILLS
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        folder = f"{scratch}/merged"
        merge_adapters([load_adapter(f"adapters/{s}") for s in SKILLS], [1.0] * 4).save(folder)  # the defaults
        models = {"base": None, **{f"adapter {s}": f"adapters/{s}" for s in SKILLS}, "merged": folder}
        print(f"{'model':<18}" + "".join(f"{skill:>9}" for skill in SKILLS))
        for name, adapter in models.items():
            model, tokenizer = load_model("adapters/base", adapter=adapter)
            scores = [evaluate(model, tokenizer, data[skill], skill).exact_match for skill in SKILLS]
            print(f"{name:<18}" + "".join(f"{100 * score:8.1f}%" for score in scores))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 50)
