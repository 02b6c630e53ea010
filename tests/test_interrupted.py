"""Interrupted and failing writes: ``merge``, ``run`` and ``fold`` killed with SIGKILL at random points
leave the target absent or complete; the next run cleans up and succeeds. A write that hits a file size
limit mid-output fails with one line and leaves nothing behind.
"""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from conftest import CHARDEMO
from dense_helpers import save_llama
from loramerge.adapters.files import load_adapter

KILLS_PER_COMMAND = 7
KILLS_SURVIVED: list[str] = []  # read by the figures test (test_figures.py)


def _command(kind: str, work: Path, target: Path) -> list[str]:
    if kind == "merge":
        args = ["merge", CHARDEMO / "add", CHARDEMO / "reverse", CHARDEMO / "sort", "--method", "ties"]
    elif kind == "fold":
        args = ["fold", CHARDEMO / "add", "--base", CHARDEMO / "base", "--out-shard-size", "1MB"]
    else:
        recipe = {"merge_method": "ties", "base_model": str(work / "base"),
                  "models": [{"model": str(work / "m1"), "parameters": {"weight": 1.0, "density": 0.5}},
                             {"model": str(work / "m2"), "parameters": {"weight": 1.0, "density": 0.5}}]}  # fmt: skip
        (work / "recipe.yml").write_text(yaml.safe_dump(recipe))
        args = ["run", work / "recipe.yml", "--out-shard-size", "2MB"]
    return [sys.executable, "-m", "loramerge.cli", *map(str, args), "-o", str(target), "--force"]


def _complete(kind: str, target: Path) -> bool:
    """Absent is fine; present must load in full."""
    if not target.exists():
        return True
    if kind == "merge":
        adapter = load_adapter(target)
        return len(adapter.modules) > 0
    model = AutoModelForCausalLM.from_pretrained(target)
    return all(torch.isfinite(p).all() for p in model.parameters())


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("kills")
    save_llama(work / "base", 0, layers=4, hidden=256)
    save_llama(work / "m1", 1, layers=4, hidden=256, like=work / "base")
    save_llama(work / "m2", 2, layers=4, hidden=256, like=work / "base")
    return work


def _staging(target: Path) -> list[Path]:
    return list(target.parent.glob(f".{target.name}.*"))


@pytest.mark.parametrize("kind", ["merge", "run", "fold"])
def test_sigkill_leaves_the_target_absent_or_complete(kind, work):
    rng = random.Random(f"kills-{kind}")
    target = work / f"out-{kind}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    full = subprocess.run(_command(kind, work, work / f"timing-{kind}"), capture_output=True, text=True, env=env)
    duration = time.perf_counter() - started
    assert full.returncode == 0, full.stderr
    for kill in range(KILLS_PER_COMMAND):
        process = subprocess.Popen(_command(kind, work, target), env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)  # fmt: skip
        if kill % 2:  # at a random moment of the whole run (start-up included)
            time.sleep(rng.uniform(0.2, 1.0) * duration)
        else:  # while the output is being written: as soon as the staging folder appears, plus a little
            deadline = time.perf_counter() + 60
            while not _staging(target) and process.poll() is None and time.perf_counter() < deadline:
                time.sleep(0.001)
            time.sleep(rng.uniform(0, 0.05))
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert _complete(kind, target), f"kill {kill}: {target} is incomplete"
        KILLS_SURVIVED.append(f"{kind}-{kill}")
    result = subprocess.run(_command(kind, work, target), capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert _complete(kind, target) and target.exists()
    assert not _staging(target), "the next run removes what killed runs left"


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then write() fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("kind", ["merge", "run", "fold"])
def test_write_failure_mid_output_leaves_nothing(kind, work):
    target = work / f"full-disk-{kind}"
    limit = 200_000  # bytes per file: the adapter and every model shard are larger
    result = subprocess.run(
        _command(kind, work, target), capture_output=True, text=True, preexec_fn=_limit_file_size(limit),
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and "File too large" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not target.exists() and not _staging(target)
