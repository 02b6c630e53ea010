"""Tiny random Llama models saved in the test, and a mergekit-yaml runner (a black box in a child process)."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from conftest import CHARDEMO


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


# the search tests' dev sets and recipe: the character demo's add (weight 0.8) and reverse adapters
SEARCH_DEV = [CHARDEMO / "data" / "add.eval.jsonl", CHARDEMO / "data" / "reverse.eval.jsonl"]


def search_recipe(path: Path, method: str, parameters: dict | None = None) -> Path:
    adapters = [{"adapter": str(CHARDEMO / "add"), "weight": 0.8}, {"adapter": str(CHARDEMO / "reverse")}]
    return write_recipe(
        path, {"merge_method": method, "adapters": adapters, **({"parameters": parameters} if parameters else {})}
    )


# One long-lived child per command runs mergekit-yaml or mergekit-moe (their own entry points, as the
# console scripts do) once per request: importing mergekit takes 7-9 s, which every call would pay again.
# Each request is a fresh command-line invocation with its own --random-seed; the child's output goes to
# a log file, and only the exit code comes back on the reply pipe.
_SERVER = """
import json, os, sys, traceback
reply = os.fdopen(os.dup(1), "w")
log = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
os.dup2(log, 1), os.dup2(log, 2)
main = __import__(sys.argv[2], fromlist=["main"]).main
for line in sys.stdin:
    try:
        main.main(json.loads(line), standalone_mode=False)
        code = 0
    except SystemExit as error:
        code = error.code or 0
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush(), sys.stderr.flush()
    reply.write(json.dumps(code) + "\\n")
    reply.flush()
"""
_servers: dict[str, tuple[subprocess.Popen, Path]] = {}
COMMANDS = {"mergekit-yaml": "mergekit.scripts.run_yaml", "mergekit-moe": "mergekit.scripts.moe"}


def _mergekit_server(command: str) -> tuple[subprocess.Popen, Path]:
    if command not in _servers or _servers[command][0].poll() is not None:
        script = shutil.which(command, path=str(Path(sys.executable).parent)) or shutil.which(command)
        assert script, f"{command} not found: pip install -e '.[test]' installs mergekit 0.1.5"
        log = Path(tempfile.mkdtemp(prefix="mergekit-")) / "mergekit.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
        process = subprocess.Popen([sys.executable, "-c", _SERVER, str(log), COMMANDS[command]],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
        atexit.register(process.kill)
        _servers[command] = (process, log)
    return _servers[command]


def run_mergekit_command(command: str, args: list[str]) -> None:
    """``command ARGS…`` (mergekit-yaml or mergekit-moe) run to completion; its log on failure."""
    process, log = _mergekit_server(command)
    start = log.stat().st_size if log.exists() else 0
    process.stdin.write(json.dumps([str(a) for a in args]) + "\n")
    process.stdin.flush()
    code = process.stdout.readline()
    assert code.strip() == "0", (command, code, log.read_text()[start:][-2000:])


def run_mergekit(recipe: Path, out: Path, seed: int | None = None, tokenizer: bool = False) -> dict[str, torch.Tensor]:
    """What ``mergekit-yaml RECIPE OUT`` writes (``--random-seed``, ``--no-copy-tokenizer`` as asked)."""
    args = [str(recipe), str(out), *([] if tokenizer else ["--no-copy-tokenizer"])]
    if seed is not None:
        args += ["--random-seed", str(seed)]
    run_mergekit_command("mergekit-yaml", args)
    return load_weights(out)


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors
