"""The cost of a DoRA merge at Llama-3-8B shapes: reading the base's weights once, against reading them alone.

    python benchmarks/dora_8b_shaped.py [--layers 32] [--repeats 2]

Writes, in a scratch folder, a base holding the 224 projection weights of Llama-3-8B (bfloat16, ~13 GiB in
5 GB shards; random, as the timing does not depend on the values) and three rank-16 DoRA adapters of it
(random factors; magnitudes near the rows' norms). Then, interleaved ``--repeats`` times, each in a fresh
process: (1) reading every projection weight of the base and converting it to float32, as the merge does,
and nothing else; (2) ``loramerge merge`` of the three DoRA adapters with ``--method linear --base``, which
reads each module's weight once for the row norms. Wall time and peak RSS of each; the target (issue 23) is a
merge within 2x of the read alone and a peak bounded by one module's weights plus the factors.

Writes ``benchmarks/results/dora_8b_shaped.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from _common import load_averages, run_measured, synthetic_adapter, write_results
from llama8b_shaped import RANK, llama_shapes
from safetensors.torch import load_file, save_file

SHARD_BYTES = 5 * 10**9
READ_ALONE = """
import sys, torch
from safetensors import safe_open
from pathlib import Path
for shard in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    with safe_open(shard, framework="pt") as handle:
        for name in handle.keys():
            handle.get_tensor(name).to(torch.float32)
"""


def write_base(folder: Path, shapes: dict[str, tuple[int, int]]) -> int:
    """The projection weights in bfloat16 shards with their index, and a config naming the architecture."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    weight_map, shard, size, index, total = {}, {}, 0, 0, 0

    def flush() -> None:
        nonlocal shard, size, index
        name = f"model-{index:05d}.safetensors"
        save_file(shard, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
        shard, size, index = {}, 0, index + 1

    for module, (rows, columns) in shapes.items():
        shard[f"{module}.weight"] = (torch.randn(rows, columns, generator=generator) / columns**0.5).to(torch.bfloat16)
        size += rows * columns * 2
        total += rows * columns * 2
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return total


def add_magnitudes(folder: Path, seed: int) -> None:
    """Turn a synthetic LoRA folder into DoRA: ``use_dora`` and a magnitude per output row near 1 (the rows of
    the base have norm about 1)."""
    generator = torch.Generator().manual_seed(seed)
    path = folder / "adapter_model.safetensors"
    state = load_file(path)
    for key in [k for k in state if k.endswith("lora_B.weight")]:
        rows = state[key].shape[0]
        magnitude = 1 + 0.1 * torch.randn(rows, generator=generator)
        state[key.replace("lora_B.weight", "lora_magnitude_vector")] = magnitude.to(torch.bfloat16)
    save_file(state, path)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    shapes = llama_shapes(args.layers)
    loads = [load_averages()]
    with tempfile.TemporaryDirectory(prefix="dora-8b-", dir=Path.home()) as scratch:
        root = Path(scratch)
        base_bytes = write_base(root / "base", shapes)
        adapters = []
        for seed in (1, 2, 3):
            synthetic_adapter(root / f"dora{seed}", shapes, RANK, seed)
            add_magnitudes(root / f"dora{seed}", seed)
            adapters.append(root / f"dora{seed}")
        largest = max(rows * columns for rows, columns in shapes.values()) * 4
        adapter_bytes = sum((a / "adapter_model.safetensors").stat().st_size for a in adapters)
        print(f"base {base_bytes / 2**30:.1f} GiB, adapters {adapter_bytes / 2**20:.0f} MiB", flush=True)
        reads, merges = [], []
        merge = [sys.executable, "-m", "loramerge.cli", "merge", *map(str, adapters), "--method", "linear",
                 "--base", str(root / "base"), "-o", str(root / "out"), "--force"]  # fmt: skip
        for _ in range(args.repeats):
            reads.append(run_measured([sys.executable, "-c", READ_ALONE, str(root / "base")]))
            merges.append(run_measured(merge))
            print(f"read {reads[-1][0]:.1f} s, merge {merges[-1][0]:.1f} s", flush=True)
        if any(code for *_, code in reads + merges):
            raise SystemExit(f"a run failed: reads {reads}, merges {merges}")
    loads.append(load_averages())
    read_s, merge_s = statistics.median(r[0] for r in reads), statistics.median(m[0] for m in merges)
    figures = {
        "base_bytes": base_bytes, "adapter_bytes": adapter_bytes, "largest_module_f32_bytes": largest,
        "read_seconds": [r[0] for r in reads], "read_peak_mib": [r[1] for r in reads],
        "merge_seconds": [m[0] for m in merges], "merge_peak_mib": [m[1] for m in merges],
        "ratio": merge_s / read_s, "load": loads,
    }  # fmt: skip
    spread = lambda runs: f"{min(r[0] for r in runs):.1f}–{max(r[0] for r in runs):.1f}"  # noqa: E731
    lines = [
        f"A Llama-3-8B-shaped base ({len(shapes)} projection weights, bfloat16, {base_bytes / 2**30:.1f} GiB) and "
        f"three rank-{RANK} DoRA adapters ({adapter_bytes / 2**20:.0f} MiB), each run in a fresh process, "
        f"median (min–max) of {args.repeats}, interleaved; load averages {loads[0]} at the start, {loads[1]} at "
        "the end.",
        "",
        "| job | wall time | peak RSS |",
        "|---|---|---|",
        f"| read every base weight and convert it to float32, nothing else | {read_s:.1f} s ({spread(reads)}) | "
        f"{max(r[1] for r in reads):.0f} MiB |",
        f"| `loramerge merge` of the three DoRA adapters, `--method linear --base` | {merge_s:.1f} s "
        f"({spread(merges)}) | "
        f"{max(m[1] for m in merges):.0f} MiB |",
        "",
        f"Merge / read: {merge_s / read_s:.2f}×. The largest module's weight in float32 is {largest / 2**20:.0f} MiB.",
    ]
    write_results("dora_8b_shaped", figures, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
