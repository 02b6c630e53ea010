"""Load a merged adapter on the demo base with PEFT and show that it changes the model's logits.

    python examples/load_merged.py out/merged
"""

from __future__ import annotations

import logging
import sys

import torch

BASE = "adapters/base"


def main(adapter_dir: str) -> None:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it announces an optional CPU speed-up at import
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokens = torch.arange(1, 17).unsqueeze(0)
    base = AutoModelForCausalLM.from_pretrained(BASE)
    with torch.no_grad():
        before = base(tokens).logits
        merged = PeftModel.from_pretrained(base, adapter_dir)
        after = merged(tokens).logits
    print(f"loaded {adapter_dir} on {BASE} with PeftModel.from_pretrained")
    print(f"max |logit change| from the merged adapter: {(after - before).abs().max().item():.4f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/merged")
