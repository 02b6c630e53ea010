"""Regenerate the shipped demo: a tiny character-level Llama base, four skill datasets and one LoRA
adapter per skill, trained with PEFT on the CPU.

    python examples/make_demo.py            # about 10 minutes on 2 CPU cores

The base learns to copy (``copy abc=abc``) and sees 100 examples of each skill; each adapter then
learns one skill on top of it: two-digit addition, string reversal, sorting digits and a fixed letter
cipher. Everything is seeded, so a rerun on the same machine and library versions writes the same
files. Held-out evaluation sets
(``adapters/data/<skill>.eval.jsonl``) never share a prompt with the training sets.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARACTERS = DIGITS + LETTERS + " +=,:>-."
CIPHER = str.maketrans(LETTERS, "qwertyuiopasdfghjklzxcvbnm")  # a fixed substitution (keyboard order)


def _word(rng: random.Random, alphabet: str = LETTERS, low: int = 3, high: int = 7) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def copy_example(rng: random.Random) -> tuple[str, str]:
    text = _word(rng, rng.choice([LETTERS, DIGITS]), 2, 8)
    return f"copy {text}=", text


def add_example(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"add {a}+{b}=", str(a + b)


def reverse_example(rng: random.Random) -> tuple[str, str]:
    text = _word(rng)
    return f"reverse {text}=", text[::-1]


def sort_example(rng: random.Random) -> tuple[str, str]:
    text = _word(rng, DIGITS, 3, 7)
    return f"sort {text}=", "".join(sorted(text))


def cipher_example(rng: random.Random) -> tuple[str, str]:
    text = _word(rng)
    return f"cipher {text}=", text.translate(CIPHER)


@dataclass(frozen=True)
class Skill:
    name: str
    example: Callable[[random.Random], tuple[str, str]]
    rank: int
    steps: int


SKILLS = [
    Skill("add", add_example, rank=16, steps=3000),
    Skill("reverse", reverse_example, rank=8, steps=1200),
    Skill("sort", sort_example, rank=8, steps=800),
    Skill("cipher", cipher_example, rank=4, steps=800),
]
TRAIN_ROWS = 9000  # two-digit additions have 10,000 prompts, 200 of them held out
# The base also sees a handful of examples of each skill, as a pretrained LLM has seen a little of every
# task: skills then live near the base, adapters sharpen them, and merges can keep them.
BASE_SKILL_ROWS = 100
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_tokenizer():
    """One token per character, ``<s>`` prepended, decoding fuses characters back together."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + list(CHARACTERS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def make_base_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def sample_rows(example, seed: int, count: int, exclude: set[str] = frozenset()) -> list[dict[str, str]]:
    """``count`` distinct prompts (none in ``exclude``) with their answers."""
    rng, rows, seen = random.Random(seed), [], set(exclude)
    while len(rows) < count:
        prompt, completion = example(rng)
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "completion": completion})
    return rows


def encode(tokenizer, rows: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded ids with labels on the answer and ``</s>`` only."""
    seqs, labels = [], []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        answer = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(map(len, seqs))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    target = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (seq, label) in enumerate(zip(seqs, labels, strict=True)):
        ids[i, : len(seq)], target[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq), torch.tensor(label), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": target}


def log(message: str) -> None:
    print(message, flush=True)


def train(model, tokenizer, rows, steps: int, lr: float, seed: int, batch: int = 64) -> None:
    """AdamW with linear warm-up and cosine decay over ``steps`` shuffled mini-batches of ``rows``."""
    import math

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(steps // 20, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))
    )
    rng = random.Random(seed)
    model.train()
    for step in range(steps):
        loss = model(**encode(tokenizer, rng.sample(rows, batch))).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 200 == 0 or step == steps - 1:
            log(f"  step {step:5d}  loss {loss.item():.4f}")
    model.eval()


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def accuracy(model, tokenizer, rows) -> float:
    from loramerge.evaluate import Sample, evaluate

    samples = [Sample(row["prompt"], row["completion"]) for row in rows]
    return evaluate(model, tokenizer, samples, "check").exact_match


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "adapters")
    parser.add_argument("--base-steps", type=int, default=2000)
    parser.add_argument("--base-skill-rows", type=int, default=BASE_SKILL_ROWS)
    parser.add_argument("--skills", nargs="+", default=[skill.name for skill in SKILLS])
    parser.add_argument("--base", type=Path, help="Reuse this trained base instead of training one.")
    parser.add_argument("--scale-steps", type=float, default=1.0, help="Multiply every step count (quick tries).")
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    torch.set_num_threads(2)
    started = time.perf_counter()
    tokenizer = make_tokenizer()
    data = args.out / "data"
    evals = {skill.name: sample_rows(skill.example, 1000 + i, 200) for i, skill in enumerate(SKILLS)}
    trains = {
        skill.name: sample_rows(skill.example, 2000 + i, TRAIN_ROWS, {r["prompt"] for r in evals[skill.name]})
        for i, skill in enumerate(SKILLS)
    }
    for name in evals:
        write_jsonl(data / f"{name}.eval.jsonl", evals[name])
        write_jsonl(data / f"{name}.train.jsonl", trains[name])

    copies = sample_rows(copy_example, 3000, TRAIN_ROWS)
    if args.base:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(args.base)
    else:
        log(f"base: copy, and {args.base_skill_rows} examples of each skill")
        base = make_base_model()
        glimpses = [row for rows in trains.values() for row in rows[: args.base_skill_rows]]
        train(base, tokenizer, copies + glimpses, int(args.base_steps * args.scale_steps), 3e-3, 0)
        for skill in SKILLS:
            log(f"  base held-out exact match on {skill.name}: {accuracy(base, tokenizer, evals[skill.name]):.3f}")
        base.generation_config.pad_token_id = tokenizer.pad_token_id
        base.save_pretrained(args.out / "base")
        tokenizer.save_pretrained(args.out / "base")

    for i, skill in enumerate(SKILLS):
        if skill.name not in args.skills:
            continue
        torch.manual_seed(100 + i)
        model = make_base_model()
        model.load_state_dict(base.state_dict())
        config = LoraConfig(r=skill.rank, lora_alpha=2 * skill.rank, target_modules=TARGETS, lora_dropout=0.0)
        model = get_peft_model(model, config)
        log(f"{skill.name}: rank {skill.rank}")
        steps = int(skill.steps * args.scale_steps)
        train(model, tokenizer, trains[skill.name], steps, 2e-3, 10 + i)
        log(f"  held-out exact match {accuracy(model, tokenizer, evals[skill.name]):.3f}")
        model.save_pretrained(args.out / skill.name)
        _relative_base(args.out / skill.name)
    log(f"done in {time.perf_counter() - started:.0f} s")


def _relative_base(folder: Path) -> None:
    """Record the base as the repository-relative path the demo commands use; list the targets sorted
    (PEFT keeps them in a set, whose order changes from run to run)."""
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "adapters/base"
    config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
