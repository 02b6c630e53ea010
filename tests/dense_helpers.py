"""Tiny random Llama models saved in the test, and a mergekit-yaml runner (a black box in a subprocess)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# mergekit is a test dependency (pyproject's [test] extra): its CLI sits beside this interpreter.
MERGEKIT = shutil.which("mergekit-yaml", path=str(Path(sys.executable).parent)) or shutil.which("mergekit-yaml")


def save_llama(path: Path, seed: int, *, layers: int = 2, hidden: int = 64, like: Path | None = None) -> Path:
    """A random tiny Llama; with ``like``, a fine-tune-like copy: that model plus small noise."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    if like is not None:
        base = load_file(like / "model.safetensors")
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(base[name] + 0.02 * torch.randn_like(param))
    model.save_pretrained(path)
    return path


WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(125)]  # 128 tokens: the models' vocab_size


def save_tokenizer(folder: Path, added: list[str] = (), special: list[str] = ()) -> int:
    """A word-level tokenizer of the tiny models' 128 tokens (plus ``added`` and ``special`` ones)."""
    core = Tokenizer(WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.add_tokens(list(added))
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special)})
    tokenizer.save_pretrained(folder)
    return len(tokenizer)


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_mergekit(recipe: Path, out: Path, seed: int | None = None, tokenizer: bool = False) -> dict[str, torch.Tensor]:
    assert MERGEKIT, "mergekit-yaml not found: pip install -e '.[test]' installs mergekit 0.1.5"
    command = [MERGEKIT, str(recipe), str(out), *([] if tokenizer else ["--no-copy-tokenizer"])]
    if seed is not None:
        command += ["--random-seed", str(seed)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return load_weights(out)


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors
