"""Shared helpers of the benchmarks: synthetic PEFT adapters, timing, peak memory, results files."""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
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


ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo; elsewhere what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine() -> dict[str, object]:
    """Where a benchmark ran: figures mean little without the CPU, the cores it could use and the versions."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores": usable,  # those this process may run on (a container's share), not the host's count
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def this_command() -> str:
    """The command line that ran this script, as typed from the repository root."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return shlex.join(["python", str(shown), *sys.argv[1:]])


def write_results(
    name: str, figures: dict, markdown: str, command: str | None = None, folder: Path = RESULTS
) -> tuple[Path, Path]:
    """Write ``folder/NAME.json`` (the figures, the command, the machine) and ``folder/NAME.md`` (``markdown``,
    then the command and the machine), so that every figure quoted elsewhere can be traced to a file and a
    run. ``command`` defaults to this process's command line. Returns both paths."""
    command = command or this_command()
    where = machine()
    folder.mkdir(parents=True, exist_ok=True)
    data = {"figures": figures, "command": command, "machine": where}
    json_path, md_path = folder / f"{name}.json", folder / f"{name}.md"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    footer = (
        f"Command: `{command}`  \nMachine: {where['cpu']}, {where['cores']} cores ({where['torch_threads']} torch "
        f"threads), torch {where['torch']}, Python {where['python']}, {where['date']}."
    )
    md_path.write_text(f"{markdown.rstrip()}\n\n{footer}\n")
    return json_path, md_path


def load_averages() -> list[float]:
    """The 1-, 5- and 15-minute load averages: on a shared machine, how busy it was while timing."""
    return [round(value, 2) for value in os.getloadavg()]


NOT_RECORDED = "not recorded (earlier run)"


def write_earlier_results(name: str, figures: dict, markdown: str, derived_by: str, folder: Path = RESULTS) -> None:
    """``write_results`` for the figures of an earlier run whose files did not record the machine or the command:
    both are said to be unknown, never guessed; ``derived_by`` is the command that rewrote them here."""
    data = {"figures": figures, "command": NOT_RECORDED, "machine": NOT_RECORDED, "derived_by": derived_by}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    footer = f"Command: {NOT_RECORDED}  \nMachine: {NOT_RECORDED}  \nDerived from that run's files by `{derived_by}`."
    (folder / f"{name}.md").write_text(f"{markdown.rstrip()}\n\n{footer}\n")
