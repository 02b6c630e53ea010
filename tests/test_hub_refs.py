"""Hub repo ids go through huggingface_hub.snapshot_download; here it resolves from a local cache, offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from safetensors.torch import load_file


def test_hub_id_resolves_through_the_hub_cache(mixed_adapters, tmp_path):
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--tiny-lora"
    shutil.copytree(mixed_adapters[0], repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    command = [sys.executable, "-m", "loramerge.cli", "merge", "someone/tiny-lora", str(mixed_adapters[0]),
               "--weights", "1,-1", "--method", "linear", "-o", str(out)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # the same adapter minus itself: B = [B, B], A = [A, -A], whose product is zero
    state = load_file(out / "adapter_model.safetensors")
    a = state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = state["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert a.shape[0] == 8 and (b @ a).abs().max().item() < 1e-6
    assert "someone/tiny-lora" in (out / "README.md").read_text()
