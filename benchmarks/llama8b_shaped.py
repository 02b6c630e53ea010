"""Three rank-16 bfloat16 adapters shaped like Llama-3-8B (32 layers; q,k,v,o,gate,up,down).

    python benchmarks/llama8b_shaped.py [--layers 32] [--skip-peft] [--skip-error] [--skip-full]

Runs, as a user would and in fresh processes, ``loramerge merge`` with the defaults (no ``--method`` or
``--space``), ``--method svd``, and ``--method ties --space full --density 0.5`` (whose rank-16
truncation of each dense merged module uses the randomized range finder at this size): wall time and
peak RSS against the adapters' bytes. The base model is never read (none exists). Then, for one module
of each shape, the randomized truncation's error against the exact one (``torch.linalg.svd``). PEFT's
time for the same jobs is extrapolated from its add_weighted_adapter (``svd`` and ``ties_svd``) measured
here on one module of each distinct shape.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from _common import run_measured, synthetic_adapter, timed
from peft import LoraConfig, get_peft_model

from loramerge import load_adapter
from loramerge.adapters.options import parse_options
from loramerge.kernels import get_kernel, run_kernel
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
        print(f"  PEFT {combination_type:8s} one {out_features}x{in_features} module: {took:.1f} s")
    return seconds


RUNS = {  # label -> extra flags of `loramerge merge`
    "defaults": [],
    "svd": ["--method", "svd"],
    "ties full 0.5": ["--method", "ties", "--space", "full", "--density", "0.5"],
    "knots": ["--method", "knots"],
    "tsv_m": ["--method", "tsv_m"],
    "iso_c": ["--method", "iso_c"],
    "iso_cts": ["--method", "iso_cts"],
    "robustmerge": ["--method", "robustmerge"],
}


def truncation_errors(work: Path, shapes: dict[str, tuple[int, int]]) -> None:
    """For one module of each shape: the dense ties merge (density 0.5) of the three adapters, its exact
    rank-16 truncation and the randomized one; prints both residuals relative to the merged matrix."""
    adapters = [load_adapter(str(work / name)) for name in "abc"]
    options = parse_options(method="ties", density=0.5)
    firsts = {shape: name for name, shape in reversed(list(shapes.items()))}
    for shape, name in sorted(firsts.items()):
        deltas = torch.stack([a.modules[name].factors().dense() for a in adapters])
        gens = tensor_generators(0, name, range(3))
        merged = run_kernel(get_kernel("ties"), deltas, torch.ones(3), options.kernel_params, gens)
        took_exact, exact = timed(lambda m=merged: truncate_dense(m, RANK))
        took_random, randomized = timed(lambda m=merged: truncate_dense_randomized(m, RANK, seed=0))
        norm = torch.linalg.matrix_norm(merged)
        best = torch.linalg.matrix_norm(merged - exact.dense()) / norm
        error = torch.linalg.matrix_norm(merged - randomized.dense()) / norm
        gap = torch.linalg.matrix_norm(randomized.dense() - exact.dense()) / torch.linalg.matrix_norm(exact.dense())
        print(f"  {shape[0]}x{shape[1]}: residual exact {best:.4f}, randomized {error:.4f} "
              f"({error / best:.4f}x); |randomized - exact| / |exact| {gap:.3f}; "
              f"SVD {took_exact:.1f} s, range finder {took_random:.2f} s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--skip-error", action="store_true", help="Skip the exact-SVD error check (minutes).")
    parser.add_argument("--skip-full", action="store_true", help="Skip the full-space ties run (minutes).")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loramerge-bench-"))
    try:
        shapes = llama_shapes(args.layers)
        sizes = [synthetic_adapter(work / name, shapes, RANK, seed) for seed, name in enumerate("abc")]
        total_mib = sum(sizes) / 2**20
        budget = 3 * total_mib + 1024
        print(f"{len(shapes)} modules x 3 adapters, rank {RANK}, bfloat16: {total_mib:.0f} MiB of adapters")
        print(f"memory budget (3x adapters + 1 GiB): {budget:.0f} MiB; base model: never read")
        results = {}
        for label, flags in RUNS.items():
            if args.skip_full and "--space" in flags:
                continue
            command = [sys.executable, "-m", "loramerge.cli", "merge", *(str(work / n) for n in "abc"), *flags,
                       "-o", str(work / "out"), "--force"]  # fmt: skip
            seconds, rss, code = run_measured(command)
            if code != 0:
                raise SystemExit(f"loramerge merge {' '.join(flags)} failed with exit code {code}")
            results[label] = seconds
            print(f"loramerge merge {label:14s} {' '.join(flags) or '(no --method, no --space)':45s}: "
                  f"{seconds:6.1f} s, peak RSS {rss:6.0f} MiB ({rss / budget:.2f} of budget)")  # fmt: skip
        if not args.skip_error:
            print("rank-16 truncation of the dense ties merge, randomized range finder vs exact SVD:")
            truncation_errors(work, shapes)
        if args.skip_peft:
            return
        for ours, theirs in (("svd", "svd"), ("ties full 0.5", "ties_svd")):
            if ours not in results:
                continue
            per_shape = peft_seconds_per_shape(theirs)
            extrapolated = args.layers * sum(per_shape[shape] for shape in SHAPES.values())
            print(f"PEFT add_weighted_adapter({theirs}) extrapolated to {len(shapes)} modules: {extrapolated:.0f} s "
                  f"-> loramerge {ours} is {extrapolated / results[ours]:.0f}x faster")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
