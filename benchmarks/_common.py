"""Shared helpers of the benchmarks: synthetic PEFT adapters, timing, peak memory."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file


def synthetic_adapter(
    folder: Path, shapes: dict[str, tuple[int, int]], rank: int, seed: int, dtype: torch.dtype = torch.bfloat16
) -> int:
    """Write a PEFT LoRA folder with random factors for ``{module name: (out, in)}``; returns its bytes."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, (out_features, in_features) in shapes.items():
        a = torch.randn(rank, in_features, generator=generator) / in_features**0.5
        b = torch.randn(out_features, rank, generator=generator) / rank**0.5
        state[f"base_model.model.{name}.lora_A.weight"] = a.to(dtype)
        state[f"base_model.model.{name}.lora_B.weight"] = b.to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    targets = sorted({name.rsplit(".", 1)[-1] for name in shapes})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets,
              "base_model_name_or_path": "synthetic/llama-3-8b-shaped", "task_type": "CAUSAL_LM"}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(state, folder / "adapter_model.safetensors")
    return (folder / "adapter_model.safetensors").stat().st_size


def timed(fn: Callable[[], object], repeat: int = 1) -> tuple[float, object]:
    """Best wall time of ``repeat`` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_measured(command: Sequence[str]) -> tuple[float, float, int]:
    """Run a command in a fresh child; wall seconds, the child's peak RSS in MiB, its exit code."""
    probe = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); rc = subprocess.run(sys.argv[1:]).returncode;"
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, rc)"
    )
    output = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True, check=True)
    seconds, rss, code = output.stdout.split()[-3:]
    return float(seconds), float(rss), int(code)
