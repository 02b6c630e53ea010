"""Merge cost of LoHa and LoKr adapters against LoRA ones of the same Llama-3-8B shapes.

    python benchmarks/adapter_types_speed.py [--layers 32] [--repeats 3]

Three adapters of each type on the 224 modules of ``llama8b_shaped.py`` (bfloat16 files written here):
LoRA rank 16; LoHa r = 4 (its exact factors have rank r² = 16, the LoRA's); LoKr r = 1 with PEFT's own
split of each side (``factorization``: W1 full, W2 = W2a W2b), whose exact factors have rank
rank(W1) · 1 (64 for a 4096 x 4096 module: a Kronecker product with a full block is high-rank by nature);
and LoRA rank 64, the rank LoKr's factors reach, to show what that rank costs by itself.
Each merge runs in this process, as ``load_adapter`` three times and ``merge_adapters`` with the defaults
(Iso-C, core space); wall time median (min–max) of ``--repeats``, and the ratio to the LoRA merge; and
once per type in a fresh process, as one ``loramerge merge`` runs.

Writes ``benchmarks/results/adapter_types_speed.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import load_averages, synthetic_adapter, write_results
from llama8b_shaped import llama_shapes
from peft.tuners.lokr.layer import factorization
from safetensors.torch import save_file

from loramerge import load_adapter, merge_adapters

PREFIX = "base_model.model."


def _write(folder: Path, state: dict[str, torch.Tensor], config: dict) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    targets = sorted({key.removeprefix(PREFIX).rsplit(".", 2)[0].rsplit(".", 1)[-1] for key in state})
    config = {**config, "target_modules": targets, "base_model_name_or_path": "synthetic/llama-3-8b-shaped"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, folder / "adapter_model.safetensors")
    return (folder / "adapter_model.safetensors").stat().st_size


def loha_adapter(folder: Path, shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> int:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, (out_features, in_features) in shapes.items():
        for side in ("w1", "w2"):
            state[f"{PREFIX}{name}.hada_{side}_a"] = torch.randn(out_features, rank, generator=generator) / rank**0.5
            state[f"{PREFIX}{name}.hada_{side}_b"] = torch.randn(rank, in_features, generator=generator) / 8
    return _write(folder, state, {"peft_type": "LOHA", "r": rank, "alpha": 2 * rank})


def lokr_adapter(folder: Path, shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> int:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, (out_features, in_features) in shapes.items():
        (out_m, out_n), (in_m, in_n) = factorization(out_features), factorization(in_features)
        state[f"{PREFIX}{name}.lokr_w1"] = torch.randn(out_m, in_m, generator=generator) / in_m**0.5
        state[f"{PREFIX}{name}.lokr_w2_a"] = torch.randn(out_n, rank, generator=generator)
        state[f"{PREFIX}{name}.lokr_w2_b"] = torch.randn(rank, in_n, generator=generator) / in_n**0.5
    return _write(folder, state, {"peft_type": "LOKR", "r": rank, "alpha": rank})


def timed_merge(folders: list[Path]) -> tuple[float, int]:
    started = time.perf_counter()
    merged = merge_adapters([load_adapter(folder) for folder in folders])
    return time.perf_counter() - started, max(module.rank for module in merged.modules.values())


def fresh_process_merge(folders: list[Path]) -> float:
    """The load and merge in a new Python process (``--once``): what one ``loramerge merge`` pays, with the
    page faults of its first large allocations, which later merges in a process reuse."""
    command = [sys.executable, __file__, "--once", *map(str, folders)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--once", nargs="+", type=Path, help=argparse.SUPPRESS)  # one timed merge, then exit
    args = parser.parse_args()
    if args.once:
        print(timed_merge(args.once)[0])
        return
    shapes = llama_shapes(args.layers)
    writers = {
        "LoRA rank 16": lambda folder, seed: synthetic_adapter(folder, shapes, 16, seed),
        "LoHa r 4 (factors of rank 16)": lambda folder, seed: loha_adapter(folder, shapes, 4, seed),
        "LoKr r 1, W1 full (factors of rank 32-64)": lambda folder, seed: lokr_adapter(folder, shapes, 1, seed),
        # the rank LoKr's exact factors reach: what the merge of its deltas costs as plain low-rank terms
        "LoRA rank 64": lambda folder, seed: synthetic_adapter(folder, shapes, 64, seed),
    }
    loads = [load_averages()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="types-speed-") as scratch:
        sets = {}
        for label, write in writers.items():
            folders = [Path(scratch) / f"{'-'.join(label.split()[:3])}-{i}" for i in range(3)]  # one folder per row
            sizes = [write(folder, seed=i + 1) for i, folder in enumerate(folders)]
            sets[label] = (folders, sum(sizes))
        fresh = {label: fresh_process_merge(folders) for label, (folders, _) in sets.items()}
        times: dict[str, list[float]] = {label: [] for label in sets}
        ranks = {}
        for _ in range(args.repeats):  # interleaved, so that a busy moment hits every type alike
            for label, (folders, _) in sets.items():
                seconds, ranks[label] = timed_merge(folders)
                times[label].append(seconds)
                print(f"{label}: {seconds:.1f} s", flush=True)
    loads.append(load_averages())
    reference, same_rank = statistics.median(times["LoRA rank 16"]), statistics.median(times["LoRA rank 64"])
    for label, (_, size) in sets.items():
        median = statistics.median(times[label])
        rows.append({"adapters": label, "bytes": size, "seconds": times[label], "median": median,
                     "ratio": median / reference, "ratio_rank64": median / same_rank, "fresh": fresh[label],
                     "fresh_ratio": fresh[label] / fresh["LoRA rank 16"], "output_rank": ranks[label]})  # fmt: skip
    lines = [
        f"Three adapters of each type on {len(shapes)} Llama-3-8B-shaped modules ({args.layers} layers), bfloat16 "
        "files; `load_adapter` three times and `merge_adapters` with the defaults (Iso-C, core space), in one "
        f"process: wall time median (min–max) of {args.repeats}, interleaved, after one merge of each type in a "
        "fresh process (its own column: what one `loramerge merge` pays). Load averages (1, 5, 15 min) "
        f"{loads[0]} at the start, {loads[1]} at the end.",
        "",
        "| adapters | files | merge | vs LoRA rank 16 | vs LoRA rank 64 | in a fresh process | vs LoRA rank 16 "
        "| largest output rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        spread = f"{min(row['seconds']):.1f}–{max(row['seconds']):.1f}"
        lines.append(
            f"| {row['adapters']} | {row['bytes'] / 2**20:.0f} MiB | {row['median']:.1f} s ({spread}) | "
            f"{row['ratio']:.2f}× | {row['ratio_rank64']:.2f}× | {row['fresh']:.1f} s | {row['fresh_ratio']:.2f}× | "
            f"{row['output_rank']} |"
        )
    write_results("adapter_types_speed", {"rows": rows, "layers": args.layers, "load": loads}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
