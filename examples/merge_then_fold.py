"""Merge the skill adapters, then fold the merge into the base: a full model that transformers loads
without PEFT.

    python examples/merge_then_fold.py [OUTPUT]        # default out/folded
"""

from __future__ import annotations

import sys

from loramerge import fold, load_adapter, merge_adapters
from loramerge.evaluate import generate_text, load_model


def main(output: str) -> None:
    adapters = [load_adapter(f"adapters/{skill}") for skill in ("add", "reverse", "sort", "cipher")]
    merged = merge_adapters(adapters, [1.0] * len(adapters))  # the defaults: ties, full space, density 0.8
    fold(merged, "adapters/base", output, force=True)
    print(f"folded the merge into adapters/base -> {output}")
    model, tokenizer = load_model(output)  # a plain AutoModelForCausalLM folder with its tokenizer
    print(f"reverse fold={generate_text(model, tokenizer, 'reverse fold=', max_new_tokens=8)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/folded")
