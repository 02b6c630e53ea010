"""Writing a merged Llama-3-8B-shaped LoRA as a llama.cpp GGUF adapter, against writing the same tensors as
safetensors (PEFT's adapter file), side by side in one process.

    python benchmarks/gguf_export_speed.py [--layers 32] [--repeats 3]

The merge of three rank-16 adapters on the 224 modules of ``llama8b_shaped.py`` (Iso-C in the core space: rank
48 per module) is computed once; then, ``--repeats`` times each and alternating, ``save_adapter`` writes it as
float32 safetensors and ``write_gguf_adapter`` as an f32 GGUF adapter (tensor names from the ``gguf`` map, scales
folded into lora_b, q/k rows permuted), and, once, in f16 and q8_0. The base's architecture comes from a
``config.json`` of Llama-3-8B's shape (no weights are needed). Median (min–max) wall time; the target is GGUF
within 2x of safetensors.

Writes ``benchmarks/results/gguf_export_speed.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import load_averages, synthetic_adapter, write_results
from llama8b_shaped import llama_shapes

from loramerge import load_adapter, merge_adapters, save_adapter
from loramerge.io.gguf_adapter import write_gguf_adapter

LLAMA_8B = {"model_type": "llama", "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "hidden_size": 4096, "intermediate_size": 14336}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        base = root / "base"
        base.mkdir()
        (base / "config.json").write_text(json.dumps({**LLAMA_8B, "num_hidden_layers": args.layers}))
        shapes = llama_shapes(args.layers)
        for i in range(3):
            synthetic_adapter(root / f"a{i}", shapes, 16, seed=i)
        adapters = [load_adapter(root / f"a{i}") for i in range(3)]
        merged = merge_adapters(adapters, [0.5, 0.3, 0.2])
        merged = type(merged)(modules={name: type(m)(m.A.float(), m.B.float(), m.scale) for name, m in
                                       merged.modules.items()}, config=merged.config)  # fmt: skip
        times: dict[str, list[float]] = {"safetensors": [], "gguf": []}
        sizes: dict[str, int] = {}
        for repeat in range(args.repeats):
            for kind in ("safetensors", "gguf") if repeat % 2 == 0 else ("gguf", "safetensors"):
                target = root / f"out-{kind}-{repeat}"
                started = time.perf_counter()
                if kind == "safetensors":
                    save_adapter(merged, target, dtype=torch.float32)
                    path = target / "adapter_model.safetensors"
                else:
                    path = target.with_suffix(".gguf")
                    write_gguf_adapter(merged, str(base), path, gguf_type="f32")
                times[kind].append(time.perf_counter() - started)
                sizes[kind] = path.stat().st_size
        others = {}
        for gguf_type in ("f16", "q8_0"):
            started = time.perf_counter()
            write_gguf_adapter(merged, str(base), root / f"{gguf_type}.gguf", gguf_type=gguf_type)
            others[gguf_type] = {"seconds": time.perf_counter() - started,
                                 "bytes": (root / f"{gguf_type}.gguf").stat().st_size}  # fmt: skip
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    ratio = medians["gguf"] / medians["safetensors"]
    figures = {"modules": len(shapes), "output_rank": 48, "repeats": args.repeats, "seconds": times,
               "median_seconds": medians, "bytes": sizes, "gguf_over_safetensors": ratio, "other_types": others,
               "target_met": ratio <= 2.0, "load_averages": load_averages()}  # fmt: skip
    rows = [f"| {kind} (f32) | {medians[kind]:.2f} ({min(times[kind]):.2f}–{max(times[kind]):.2f}) | "
            f"{sizes[kind] / 2**20:.0f} MiB |" for kind in ("safetensors", "gguf")]  # fmt: skip
    rows += [f"| gguf {t} | {v['seconds']:.2f} | {v['bytes'] / 2**20:.0f} MiB |" for t, v in others.items()]
    markdown = "\n".join([
        f"Writing a merged Llama-3-8B-shaped LoRA ({len(shapes)} modules, rank 48, float32 factors):",
        "",
        "| format | seconds, median (min–max) | file |",
        "|---|---|---|",
        *rows,
        "",
        f"GGUF / safetensors: **{ratio:.2f}x** (target ≤ 2x: {'met' if ratio <= 2 else 'not met'}).",
    ])  # fmt: skip
    write_results("gguf_export_speed", figures, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
