"""Merge the four skill adapters from Python, save a PEFT adapter, and answer one prompt per skill.

    python examples/merge_in_python.py [OUTPUT]        # default out/python_merge
"""

from __future__ import annotations

import sys

from loramerge import load_adapter, merge_adapters
from loramerge.evaluate import generate_text, load_model

SKILLS = {"add": "add 38+47=", "reverse": "reverse merge=", "sort": "sort 52913=", "cipher": "cipher lora="}


def main(output: str) -> None:
    adapters = [load_adapter(f"adapters/{skill}") for skill in SKILLS]
    merged = merge_adapters(adapters, [1.0] * len(adapters), "ties", space="full", density=0.8)
    merged.save(output)
    print(f"merged {len(adapters)} adapters ({len(merged.modules)} modules, rank {merged.config['r']}) -> {output}")
    model, tokenizer = load_model("adapters/base", adapter=output)
    for prompt in SKILLS.values():
        print(f"{prompt}{generate_text(model, tokenizer, prompt, max_new_tokens=8)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/python_merge")
