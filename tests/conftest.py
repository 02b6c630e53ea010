"""Tiny models and real PEFT adapters built in the test session (no network), and the character-level
fixture model with its adapters (``CHARDEMO``)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The former demo, kept as a fixture: a character-level Llama (hidden 128, 4 layers, 0.7 M parameters, one
# token per character) in base/, LoRA adapters trained on it in add/ (rank 16), reverse/ (8), sort/ (8) and
# cipher/ (4), and 200 held-out prompts per skill in data/<skill>.eval.jsonl. The adapters record their base
# as tests/fixtures/chardemo/base, relative to the repository root (run what reads it from there).
CHARDEMO = Path(__file__).resolve().parent / "fixtures" / "chardemo"
CHARDEMO_SKILLS = ("add", "reverse", "sort", "cipher")


def save_tiny_llama(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def save_tiny_gpt2(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def build_adapter(base: Path, out: Path, *, seed: int, r: int = 4, lora_alpha: float = 8, **config) -> Path:
    """A real PEFT adapter with random (non-zero) A and B, saved with ``save_pretrained``."""
    config.setdefault("target_modules", LLAMA_TARGETS)
    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=lora_alpha, init_lora_weights=False, **config))
    peft_model.save_pretrained(out)
    return out


def peft_with_adapters(base: Path, adapters: dict[str, Path]) -> PeftModel:
    """One PeftModel holding several adapters under the given names."""
    model = AutoModelForCausalLM.from_pretrained(base)
    items = list(adapters.items())
    peft_model = PeftModel.from_pretrained(model, items[0][1], adapter_name=items[0][0])
    for name, path in items[1:]:
        peft_model.load_adapter(path, adapter_name=name)
    return peft_model


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="session")
def gpt2_base(tmp_path_factory) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "base")


@pytest.fixture(scope="session")
def equal_rank_adapters(llama_base, tmp_path_factory) -> list[Path]:
    """Three rank-4 adapters with different alphas (what PEFT's factor-wise merges accept)."""
    root = tmp_path_factory.mktemp("equal")
    return [build_adapter(llama_base, root / f"a{i}", seed=10 + i, r=4, lora_alpha=alpha) for i, alpha in
            enumerate([4, 8, 2])]  # fmt: skip


@pytest.fixture(scope="session")
def mixed_adapters(llama_base, tmp_path_factory) -> list[Path]:
    """Different ranks, rsLoRA, rank/alpha patterns, embedding LoRA, and modules missing from some."""
    root = tmp_path_factory.mktemp("mixed")
    return [
        build_adapter(llama_base, root / "r4", seed=1, r=4, lora_alpha=8),
        build_adapter(
            llama_base, root / "r8_rslora_embed", seed=2, r=8, lora_alpha=4, use_rslora=True,
            target_modules=["q_proj", "v_proj", "embed_tokens"],
        ),
        build_adapter(
            llama_base, root / "r2_patterns", seed=3, r=2, lora_alpha=2,
            target_modules=["q_proj", "k_proj", "down_proj"],
            rank_pattern={"layers.1.self_attn.q_proj": 6}, alpha_pattern={"down_proj": 5},
        ),
    ]  # fmt: skip


def weight_delta(adapter, name: str) -> torch.Tensor:
    """A loaded module's delta in the base weight's orientation (as PEFT's ``get_delta_weight``)."""
    module = adapter.modules[name]
    delta = module.delta()
    return delta.T if (module.embedding or adapter.fan_in_fan_out) else delta


def peft_delta(peft_model: PeftModel, module_name: str, adapter_name: str) -> torch.Tensor | None:
    layer = peft_model.base_model.model.get_submodule(module_name)
    known = set(getattr(layer, "lora_A", {})) | set(getattr(layer, "lora_embedding_A", {}))
    if adapter_name not in known:
        return None
    return layer.get_delta_weight(adapter_name).detach().float()


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x - y).norm() / y.norm().clamp_min(1e-30)).item()


# Reliability figures (docs/reliability.md), counted from this run's passing tests.
_PASSED: list[str] = []


def pytest_runtest_logreport(report) -> None:
    if report.when == "call" and report.passed:
        _PASSED.append(report.nodeid)


def pytest_terminal_summary(terminalreporter) -> None:
    import sys

    def count(fragment: str) -> int:
        return sum(fragment in nodeid for nodeid in _PASSED)

    interrupted = sys.modules.get("test_interrupted")
    kills = len(interrupted.KILLS_SURVIVED) if interrupted else 0
    figures = {
        "bad inputs refused cleanly": count("test_bad_inputs.py::test_bad_input_is_refused_cleanly"),
        "SIGKILLs survived": kills,
        "out-of-space writes cleaned up": count("test_write_failure_mid_output_leaves_nothing"),
        "bit-identical determinism checks": count("test_determinism.py::"),
        "property tests (hypothesis)": count("test_properties.py::"),
        "examples run": count("test_examples.py::test_example_runs"),
    }
    terminalreporter.write_sep("-", "reliability figures")
    terminalreporter.write_line(", ".join(f"{name}: {value}" for name, value in figures.items()))
