"""What LARV (``--param larv=tiered``) adds to a merge: its diagnostics read every module's base weight and need
that weight's singular values (the base's effective rank), besides a small SVD of the summed update's core.

    python benchmarks/larv_cost.py [--repeats 3] [--skip-8b]

1. The demo: ``merge_adapters`` of the four shipped skill adapters (SmolLM2-135M, 210 modules) with Iso-C, without
   and with ``larv=tiered`` (the first merge of the base, and again: its effective ranks kept), interleaved,
   ``--repeats`` times (median): the base read from its cached safetensors folder.
2. Llama-3-8B shapes: one random float32 weight of each distinct projection shape and a rank-48 update (three
   rank-16 adapters summed): the time of one module's diagnostics as the merge runs them (the base weight's
   singular values on one thread, for thread-independent bits, and the update's), times the number of such
   modules in 32 layers (the merge itself: ``benchmarks/results/llama8b_shaped.md``).

Writes ``benchmarks/results/larv_cost.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from _common import timed, write_results
from llama8b_shaped import HIDDEN, INTERMEDIATE, KV

from loramerge import load_adapter, merge_adapters
from loramerge.adapters import layer_scales
from loramerge.adapters.layer_scales import module_diagnostics
from loramerge.lowrank import LowRank
from loramerge.seeding import thread_independent

ROOT = Path(__file__).resolve().parent.parent
SKILLS = ("sentiment", "arithmetic", "dates", "orders")
# distinct (out, in) shapes of Llama-3-8B's projections and how many of each one layer holds; down_proj's
# 4096 x 14336 has the singular values of gate/up's transpose and costs the same
SHAPES_8B = {(HIDDEN, HIDDEN): 2, (KV, HIDDEN): 2, (INTERMEDIATE, HIDDEN): 3}


def demo_times(repeats: int) -> dict[str, list[float]]:
    adapters = [load_adapter(str(ROOT / "adapters" / skill)) for skill in SKILLS]
    base = adapters[0].base_ref
    larv = {"larv": "tiered"}
    merge_adapters(adapters[:2], method="iso_c", base=base, params=larv)  # the GGUF's cached folder, once
    cold, warm = "iso_c larv=tiered, first merge of the base", "iso_c larv=tiered, the base merged before"
    times: dict[str, list[float]] = {"iso_c": [], cold: [], warm: []}
    for _ in range(repeats):
        times["iso_c"].append(timed(lambda: merge_adapters(adapters, method="iso_c"))[0])
        layer_scales._BASE_RANKS.clear()  # the base's effective ranks, kept for the process after a merge
        times[cold].append(timed(lambda: merge_adapters(adapters, method="iso_c", base=base, params=larv))[0])
        times[warm].append(timed(lambda: merge_adapters(adapters, method="iso_c", base=base, params=larv))[0])
    return times


def shape_times(shape: tuple[int, int], rank: int = 48) -> dict[str, float]:
    """One module's diagnostics as the merge runs them, and the base weight's singular values alone."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, generator=generator) / shape[1] ** 0.5
    update = LowRank(
        B=torch.randn(shape[0], rank, generator=generator), A=torch.randn(rank, shape[1], generator=generator)
    )

    def base_values() -> None:
        with thread_independent(weight):
            torch.linalg.svdvals(weight)

    base_seconds, _ = timed(base_values)
    total_seconds, _ = timed(lambda: module_diagnostics(update, weight))
    return {"base_singular_values_s": base_seconds, "module_diagnostics_s": total_seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-8b", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    demo = demo_times(args.repeats)
    medians = {label: statistics.median(values) for label, values in demo.items()}
    lines = [
        "LARV's cost. The demo (SmolLM2-135M, four skill adapters, 210 modules), `merge_adapters` with Iso-C, median "
        f"of {args.repeats}, interleaved:",
        "",
        "| merge | seconds, median (min–max) |",
        "|---|---|",
        *(f"| {label} | {medians[label]:.2f} ({min(v):.2f}–{max(v):.2f}) |" for label, v in demo.items()),
    ]
    figures: dict[str, object] = {"demo_seconds": demo, "demo_medians": medians}
    if not args.skip_8b:
        rows, total = [], 0.0
        for shape, per_layer in SHAPES_8B.items():
            found = shape_times(shape)
            count = 32 * per_layer
            total += count * found["module_diagnostics_s"]
            rows.append({"shape": list(shape), "modules": count, **found})
        figures.update(llama8b_shapes=rows, llama8b_extrapolated_s=total)
        lines += [
            "",
            "Llama-3-8B shapes (32 layers, 224 modules), one module of each shape timed once and multiplied by their "
            "number:",
            "",
            "| shape | modules | the module's diagnostics (rank-48 update) | the base weight's singular values alone |",
            "|---|---|---|---|",
            *(
                f"| {r['shape'][0]} x {r['shape'][1]} | {r['modules']} | {r['module_diagnostics_s']:.2f} s | "
                f"{r['base_singular_values_s']:.2f} s |"
                for r in rows
            ),
            "",
            f"LARV's diagnostics at 8B: about {total / 60:.0f} min on this machine.",
        ]
    table = "\n".join(lines)
    write_results("larv_cost", figures, table)
    print(table)


if __name__ == "__main__":
    main()
