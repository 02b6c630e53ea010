"""Fold a rank-16 adapter into synthetic Llama-shaped float16 bases of 0.5, 1 and 2 GB (500 MB shards),
against a plain pass that reads every base tensor and writes it back out in shards of the same size.

    python benchmarks/fold_speed.py [--sizes 0.5,1,2]

Prints wall time and peak RSS of each (fresh processes), the time ratio, and the RSS budget
(largest shard + 1 GiB).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from _common import run_measured, synthetic_adapter
from dense_vs_mergekit import HIDDEN, INTERMEDIATE, SHARD_BYTES, layers_for, write_model

COPY = """
import sys, json
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
base, out, limit = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
out.mkdir(parents=True)
index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
shard, size, count = {}, 0, 0
for name, file in index.items():
    with safe_open(base / file, framework="pt") as handle:
        tensor = handle.get_tensor(name).clone()
    if shard and size + tensor.numel() * 2 > limit:
        save_file(shard, out / f"shard{count}.safetensors"); shard, size, count = {}, 0, count + 1
    shard[name] = tensor
    size += tensor.numel() * 2
save_file(shard, out / f"shard{count}.safetensors")
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="0.5,1,2")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loramerge-fold-"))
    try:
        for gigabytes in (float(s) for s in args.sizes.split(",")):
            layers = layers_for(gigabytes)
            base = work / f"base-{gigabytes}"
            size = write_model(base, layers, 0, None)
            shapes = {}
            for i in range(layers):
                for name, shape in (("self_attn.q_proj", (HIDDEN, HIDDEN)), ("self_attn.k_proj", (HIDDEN, HIDDEN)),
                                    ("self_attn.v_proj", (HIDDEN, HIDDEN)), ("self_attn.o_proj", (HIDDEN, HIDDEN)),
                                    ("mlp.gate_proj", (INTERMEDIATE, HIDDEN)), ("mlp.up_proj", (INTERMEDIATE, HIDDEN)),
                                    ("mlp.down_proj", (HIDDEN, INTERMEDIATE))):  # fmt: skip
                    shapes[f"model.layers.{i}.{name}"] = shape
            synthetic_adapter(work / "adapter", shapes, 16, seed=1, dtype=torch.float16)
            largest = max(p.stat().st_size for p in base.glob("*.safetensors")) / 2**20
            copy_s, copy_rss, _ = run_measured(
                [sys.executable, "-c", COPY, str(base), str(work / "copy"), str(SHARD_BYTES)]
            )
            shutil.rmtree(work / "copy")
            fold = [sys.executable, "-m", "loramerge.cli", "fold", str(work / "adapter"), "--base", str(base),
                    "-o", str(work / "folded"), "--force"]  # fmt: skip
            fold_s, fold_rss, code = run_measured(fold)
            assert code == 0, f"fold failed ({code})"
            shutil.rmtree(work / "folded")
            budget = largest + 1024
            print(f"{size / 1e9:.2f} GB base ({layers} layers, largest shard {largest:.0f} MiB): "
                  f"plain read+write {copy_s:.1f} s, {copy_rss:.0f} MiB | fold {fold_s:.1f} s, {fold_rss:.0f} MiB "
                  f"-> {fold_s / copy_s:.2f}x time, RSS {fold_rss:.0f} of {budget:.0f} MiB budget",
                  flush=True)  # fmt: skip
            shutil.rmtree(base)
            shutil.rmtree(work / "adapter")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
