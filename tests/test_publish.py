"""``--push-to-hub`` up to the network boundary: an unreachable endpoint gives one clear line, and the
token never shows in output or files."""

from __future__ import annotations

import os
import subprocess
import sys

TOKEN = "hf_loramergeTestTokenThatMustNeverLeak0123"


def test_push_to_an_unreachable_hub(mixed_adapters, tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
           "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}  # fmt: skip
    out = tmp_path / "merged"
    command = [sys.executable, "-m", "loramerge.cli", "merge", *map(str, mixed_adapters), "-o", str(out),
               "--push-to-hub", "someone/merged-lora", "--private"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "could not push" in lines[0] and "someone/merged-lora" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert TOKEN not in result.stdout + result.stderr
    assert (out / "adapter_model.safetensors").is_file()  # the merge itself was written before the push
    for file in out.iterdir():
        assert TOKEN.encode() not in file.read_bytes()
