"""Fold a rank-16 adapter into synthetic Llama-shaped float16 bases of 0.5, 1 and 2 GB (500 MB shards),
against a plain pass that reads every base tensor and writes it back out in shards of the same size.

    python benchmarks/fold_speed.py [--sizes 0.5,1,2]

Prints wall time and peak RSS of each (fresh processes), the time ratio, and the RSS budget
(largest shard + 1 GiB); writes them to ``benchmarks/results/fold_speed.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from _common import load_averages, run_measured, synthetic_adapter, write_results
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
    rows = []
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
            rows.append({"base_gb": size / 1e9, "layers": layers, "largest_shard_mib": largest, "copy_s": copy_s,
                         "copy_rss_mib": copy_rss, "fold_s": fold_s, "fold_rss_mib": fold_rss,
                         "budget_mib": largest + 1024})  # fmt: skip
            print(row_line(rows[-1]), flush=True)
            shutil.rmtree(base)
            shutil.rmtree(work / "adapter")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = markdown(rows)
    write_results("fold_speed", {"rows": rows, "load_average": load_averages()}, text)
    print(text)


def row_line(row: dict[str, float]) -> str:
    return (f"{row['base_gb']:.2f} GB base ({row['layers']} layers, largest shard {row['largest_shard_mib']:.0f} MiB): "
            f"plain read+write {row['copy_s']:.1f} s, {row['copy_rss_mib']:.0f} MiB | fold {row['fold_s']:.1f} s, "
            f"{row['fold_rss_mib']:.0f} MiB")  # fmt: skip


def markdown(rows: list[dict[str, float]]) -> str:
    lines = ["Fold a rank-16 adapter (every linear module) into a synthetic Llama-shaped float16 base (500 MB "
             "shards), against a plain pass that reads every base tensor and writes it back in shards of the same "
             "size; each a fresh process.", "",
             "| base | plain read+write | loramerge fold | time ratio | fold peak RSS (budget: largest shard + 1 GiB) "
             "| plain pass peak RSS |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['base_gb']:.2f} GB | {r['copy_s']:.1f} s | {r['fold_s']:.1f} s | "
                     f"{r['fold_s'] / r['copy_s']:.2f}× | {r['fold_rss_mib']:.0f} MiB ({r['budget_mib']:.0f}) | "
                     f"{r['copy_rss_mib']:.0f} MiB |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
