"""Three rank-16 bfloat16 adapters shaped like Llama-3-8B (32 layers; q,k,v,o,gate,up,down).

    python benchmarks/llama8b_shaped.py [--layers 32] [--repeats 3] [--skip-peft] [--skip-error] [--skip-full]
    python benchmarks/llama8b_shaped.py --only wudi [--repeats 3]   # some runs alone: llama8b_shaped_<labels>.*

Runs, as a user would and in fresh processes, ``loramerge merge`` with the defaults (no ``--method`` or
``--space``), with ``--method svd``, ``--method ties`` (core space, density 0.95), the whole-matrix methods,
and ``--method ties --space full --density 0.5`` (whose rank-16 truncation of each dense merged module uses
the randomized range finder at this size), each ``--repeats`` times: wall time (median and spread) and
peak RSS against the adapters' bytes. The base model is never read (none exists). Then, for one module
of each shape, the randomized truncation's error against the exact one (``torch.linalg.svd``). PEFT's
time for the same jobs is extrapolated from its add_weighted_adapter (``svd`` and ``ties_svd``) measured
here on one module of each distinct shape (``--peft-only`` measures PEFT again against the merges already in
the results file). Writes ``benchmarks/results/llama8b_shaped.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from _common import RESULTS, load_averages, run_measured, synthetic_adapter, this_command, timed, write_results
from peft import LoraConfig, get_peft_model

from loramerge import catalogue, load_adapter
from loramerge.adapters.options import parse_options
from loramerge.kernels import run_kernel
from loramerge.lowrank import truncate_dense, truncate_dense_randomized
from loramerge.seeding import tensor_generators

HIDDEN, KV, INTERMEDIATE, RANK = 4096, 1024, 14336, 16
SHAPES = {  # (out, in) of each projection in one layer
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (KV, HIDDEN),
    "self_attn.v_proj": (KV, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}


def llama_shapes(layers: int) -> dict[str, tuple[int, int]]:
    return {f"model.layers.{i}.{name}": shape for i in range(layers) for name, shape in SHAPES.items()}


def peft_seconds_per_shape(combination_type: str) -> dict[tuple[int, int], float]:
    """PEFT's add_weighted_adapter on one module of each distinct shape (three rank-16 adapters)."""
    seconds = {}
    for out_features, in_features in sorted(set(SHAPES.values())):
        model = torch.nn.Sequential()
        model.add_module("proj", torch.nn.Linear(in_features, out_features, bias=False))
        config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["proj"], init_lora_weights=False)
        peft_model = get_peft_model(model, config, adapter_name="a")
        for name in ("b", "c"):
            peft_model.add_adapter(name, config)
        merge = functools.partial(
            peft_model.add_weighted_adapter, ["a", "b", "c"], [0.5, 0.3, 0.2], "merged",
            combination_type=combination_type, density=0.5,
        )  # fmt: skip
        with torch.no_grad():
            took, _ = timed(merge)
        seconds[(out_features, in_features)] = took
        print(f"  PEFT {combination_type:8s} one {out_features}x{in_features} module: {took:.1f} s", flush=True)
    return seconds


RUNS = {  # label -> extra flags of `loramerge merge`
    "defaults": [],
    "svd": ["--method", "svd"],
    "ties": ["--method", "ties"],
    "ties full 0.5": ["--method", "ties", "--space", "full", "--density", "0.5"],
    "knots": ["--method", "knots"],
    "tsv_m": ["--method", "tsv_m"],
    "iso_c": ["--method", "iso_c"],
    "iso_cts": ["--method", "iso_cts"],
    "robustmerge": ["--method", "robustmerge"],
    "wudi": ["--method", "wudi"],
    "dc_merge": ["--method", "dc_merge"],
}
PEFT_PEERS = (("svd", "svd"), ("ties", "ties_svd"), ("ties full 0.5", "ties_svd"))  # ours -> PEFT's same job


def truncation_errors(work: Path, shapes: dict[str, tuple[int, int]]) -> list[dict[str, object]]:
    """For one module of each shape: the dense ties merge (density 0.5) of the three adapters, its exact
    rank-16 truncation and the randomized one; both residuals relative to the merged matrix."""
    adapters = [load_adapter(str(work / name)) for name in "abc"]
    options = parse_options(method="ties", density=0.5)
    firsts = {shape: name for name, shape in reversed(list(shapes.items()))}
    rows = []
    for shape, name in sorted(firsts.items()):
        deltas = torch.stack([a.modules[name].factors().dense() for a in adapters])
        gens = tensor_generators(0, name, range(3))
        merged = run_kernel(catalogue.method("ties"), deltas, torch.ones(3), options.kernel_params, gens)
        took_exact, exact = timed(lambda m=merged: truncate_dense(m, RANK))
        took_random, randomized = timed(lambda m=merged: truncate_dense_randomized(m, RANK, seed=0))
        norm = torch.linalg.matrix_norm(merged)
        best = (torch.linalg.matrix_norm(merged - exact.dense()) / norm).item()
        error = (torch.linalg.matrix_norm(merged - randomized.dense()) / norm).item()
        gap = torch.linalg.matrix_norm(randomized.dense() - exact.dense()) / torch.linalg.matrix_norm(exact.dense())
        rows.append({"shape": list(shape), "exact": best, "randomized": error, "ratio": error / best,
                     "gap": gap.item(), "exact_s": took_exact, "randomized_s": took_random})  # fmt: skip
        print(f"  {shape[0]}x{shape[1]}: residual exact {best:.4f}, randomized {error:.4f}", flush=True)
    return rows


def merge_runs(
    work: Path, repeats: int, skip_full: bool, full_repeats: int, only: list[str] | None = None
) -> dict[str, dict[str, object]]:
    """Every ``RUNS`` entry (or those in ``only``), each in ``repeats`` fresh processes (the full-space one
    ``full_repeats`` times)."""
    results = {}
    for label, flags in RUNS.items():
        if only and label not in only:
            continue
        if skip_full and "--space" in flags:
            continue
        command = [sys.executable, "-m", "loramerge.cli", "merge", *(str(work / n) for n in "abc"), *flags,
                   "-o", str(work / "out"), "--force"]  # fmt: skip
        seconds, rss = [], []
        for _ in range(full_repeats if "--space" in flags else repeats):
            took, peak, code = run_measured(command)
            if code != 0:
                raise SystemExit(f"loramerge merge {' '.join(flags)} failed with exit code {code}")
            seconds.append(took)
            rss.append(peak)
            print(f"  loramerge merge {label:14s}: {took:6.1f} s, peak RSS {peak:6.0f} MiB", flush=True)
        results[label] = {"flags": flags, "seconds": seconds, "rss_mib": rss}
    return results


def peft_extrapolation(results: dict[str, dict[str, object]], layers: int) -> list[dict[str, object]]:
    """PEFT's time for each of our jobs that it can run, from one module of each shape times the layers."""
    types = dict.fromkeys(theirs for ours, theirs in PEFT_PEERS if ours in results)  # each measured once
    per_type = {theirs: peft_seconds_per_shape(theirs) for theirs in types}
    rows = []
    for ours, theirs in PEFT_PEERS:
        if ours not in results:
            continue
        per_shape = per_type[theirs]
        extrapolated = layers * sum(per_shape[shape] for shape in SHAPES.values())
        rows.append({"ours": ours, "peft": theirs, "extrapolated_s": extrapolated,
                     "per_shape_s": {f"{o}x{i}": s for (o, i), s in per_shape.items()},
                     "speed_up": extrapolated / statistics.median(results[ours]["seconds"])})  # fmt: skip
    return rows


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f} s"
    return f"{statistics.median(values):.1f} s (median of {len(values)}; {min(values):.1f}–{max(values):.1f} s)"


def markdown(figures: dict[str, object]) -> str:
    runs, budget = figures["runs"], figures["budget_mib"]
    lines = [f"{figures['modules']} modules x 3 adapters, rank {RANK}, bfloat16: {figures['adapters_mib']:.0f} MiB "
             f"of adapters; memory budget (3x adapters + 1 GiB): {budget:.0f} MiB; base model: never read.", "",
             "| run | flags | wall time | peak RSS (largest) | of budget |", "|---|---|---|---|---|"]  # fmt: skip
    for label, run in runs.items():
        peak = max(run["rss_mib"])
        lines.append(f"| {label} | {' '.join(run['flags']) or '(no --method, no --space)'} | "
                     f"{spread(run['seconds'])} | {peak:.0f} MiB | {peak / budget:.2f} |")  # fmt: skip
    if "ties full 0.5" in runs and "defaults" in runs:
        ratio = statistics.median(runs["ties full 0.5"]["seconds"]) / statistics.median(runs["defaults"]["seconds"])
        lines += ["", f"The full-space ties run takes {ratio:.0f}× the defaults' time (medians)."]
    if figures.get("truncation"):
        lines += ["", "Rank-16 truncation of the dense ties merge (density 0.5), randomized range finder vs exact "
                  "SVD, one module of each shape:", "",
                  "| module | residual ‖M − M_k‖/‖M‖, exact SVD | randomized | ratio | ‖randomized − exact‖ / ‖exact‖ "
                  "| exact SVD | range finder |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in figures["truncation"]:
            lines.append(
                f"| {r['shape'][0]}×{r['shape'][1]} | {r['exact']:.4f} | {r['randomized']:.4f} | "
                f"{r['ratio']:.3f} | {r['gap']:.3f} | {r['exact_s']:.1f} s | {r['randomized_s']:.2f} s |"
            )
        worst = max(r["ratio"] for r in figures["truncation"])
        lines += ["", f"Largest ratio: {worst:.3f}."]
    if figures.get("peft"):
        lines += ["", f"PEFT add_weighted_adapter, one module of each shape, extrapolated to {figures['modules']} "
                  f"modules ({figures['layers']} layers x 7):", "",
                  "| loramerge job | PEFT combination_type | PEFT per module, by shape | PEFT extrapolated | "
                  "loramerge is faster by |", "|---|---|---|---|---|"]  # fmt: skip
        for r in figures["peft"]:
            shapes = ", ".join(f"{s:.1f} s ({shape})" for shape, s in r["per_shape_s"].items())
            lines.append(
                f"| {r['ours']} | {r['peft']} | {shapes} | ≈ {r['extrapolated_s']:.0f} s | ≈ {r['speed_up']:.0f}× |"
            )
    return "\n".join(lines) + "\n"


def remeasure_peft(layers: int) -> None:
    """PEFT's extrapolation again, against the merges of the existing results file (the command records both)."""
    data = json.loads((RESULTS / "llama8b_shaped.json").read_text())
    figures = data["figures"]
    figures["peft"] = peft_extrapolation(figures["runs"], layers)
    text = markdown(figures)
    write_results("llama8b_shaped", figures, text, command=f"{data['command']}; then {this_command()}")
    print(text)


def only_runs(layers: int, repeats: int, labels: list[str]) -> None:
    """Some merges of the 8B-shaped set alone, beside the main results (which stay as they are)."""
    work = Path(tempfile.mkdtemp(prefix="loramerge-bench-"))
    try:
        shapes = llama_shapes(layers)
        for seed, name in enumerate("abc"):
            synthetic_adapter(work / name, shapes, RANK, seed)
        runs = merge_runs(work, repeats, True, 0, labels)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for label, run in runs.items():
        seconds = run["seconds"]
        rows.append(f"| {label} | {statistics.median(seconds):.1f} s ({min(seconds):.1f}–{max(seconds):.1f} s) | "
                    f"{max(run['rss_mib']):.0f} MiB |")  # fmt: skip
    text = "\n".join([f"`loramerge merge` of three rank-16 adapters shaped like Llama-3-8B ({len(shapes)} modules), "
                      f"each run {repeats} times in a fresh process:", "", "| merge | wall time, median (min–max) | "
                      "peak RSS |", "|---|---|---|", *rows])  # fmt: skip
    write_results("llama8b_shaped_" + "_".join(labels), {"layers": layers, "runs": runs,
                  "load_average": load_averages()}, text)  # fmt: skip
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="Fresh runs of each merge (the spread is reported).")
    parser.add_argument("--full-repeats", type=int, default=3, help="Runs of the full-space ties merge (minutes).")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--skip-error", action="store_true", help="Skip the exact-SVD error check (minutes).")
    parser.add_argument("--skip-full", action="store_true", help="Skip the full-space ties run (minutes).")
    parser.add_argument(
        "--peft-only",
        action="store_true",
        help="Measure PEFT again against the runs already in benchmarks/results/llama8b_shaped.json.",
    )
    parser.add_argument("--only", nargs="+", choices=list(RUNS), help="Run these merges alone (no error, PEFT or "
                        "full-space runs); results in llama8b_shaped_<labels>.json and .md.")  # fmt: skip
    args = parser.parse_args()
    if args.peft_only:
        remeasure_peft(args.layers)
        return
    if args.only:
        only_runs(args.layers, args.repeats, args.only)
        return
    work = Path(tempfile.mkdtemp(prefix="loramerge-bench-"))
    load_before = load_averages()
    try:
        shapes = llama_shapes(args.layers)
        sizes = [synthetic_adapter(work / name, shapes, RANK, seed) for seed, name in enumerate("abc")]
        total_mib = sum(sizes) / 2**20
        figures: dict[str, object] = {"layers": args.layers, "modules": len(shapes), "adapters_mib": total_mib,
                                      "budget_mib": 3 * total_mib + 1024}  # fmt: skip
        print(f"{len(shapes)} modules x 3 adapters: {total_mib:.0f} MiB of adapters", flush=True)
        figures["runs"] = merge_runs(work, args.repeats, args.skip_full, args.full_repeats)
        if not args.skip_error:
            figures["truncation"] = truncation_errors(work, shapes)
        if not args.skip_peft:
            figures["peft"] = peft_extrapolation(figures["runs"], args.layers)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures["load_average"] = {"start": load_before, "end": load_averages()}
    text = markdown(figures)
    write_results("llama8b_shaped", figures, text)
    print(text)


if __name__ == "__main__":
    main()
