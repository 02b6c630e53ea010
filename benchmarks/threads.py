"""The thread policy of the adapter merge (``loramerge.threads``), with and without a competing process.

    python benchmarks/threads.py [--repeats 3] [--layers 32] [--skip-threshold]

1. Threshold: one module's merge, on one thread and on every thread, for low-rank (core-space) and dense
   (full-space) work of growing size: where does a second thread start to pay?
2. Merges, each timed in this process (adapters loaded once) alone and while a second
   Python process spins a float32 matmul loop on every core: the demo's four adapters with ``iso_c``
   (the default) and ``ties`` (core, density 0.95), and the Llama-3-8B-shaped set of
   ``llama8b_shaped.py`` with the defaults. Three policies side by side, repeats interleaved:
   *before* (every module on all of torch's threads, the code before the policy), *after* (the
   policy), and *one thread* for everything (``torch.set_num_threads(1)``, as ``OMP_NUM_THREADS=1``).
   Each merge's output is compared bit for bit across the policies.

Writes ``benchmarks/results/threads.json`` and ``threads.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch
from _common import ROOT, load_averages, synthetic_adapter, write_results
from llama8b_shaped import RANK, llama_shapes

from loramerge import LoraAdapter, LoraModule, load_adapter, merge_adapters, threads

SKILLS = ("sentiment", "arithmetic", "dates", "orders")
SPIN = "import torch\nx = torch.randn(1024, 1024)\nwhile True:\n    x @ x\n"  # every core, as torch defaults to


@contextlib.contextmanager
def policy(name: str) -> Iterator[None]:
    """``before``: no module is small (the code before the policy); ``after``: the policy; ``one thread``:
    torch on one thread for everything."""
    if name == "before":
        with mock.patch.object(threads, "SMALL_WORK", 0):
            yield
    elif name == "one thread":
        with threads.cpu_threads(1):
            yield
    else:
        yield


POLICIES = ("before", "after", "one thread")


@contextlib.contextmanager
def competitor(busy: bool) -> Iterator[None]:
    """A second process multiplying 1024 x 1024 float32 matrices on every core, while the block runs."""
    if not busy:
        yield
        return
    process = subprocess.Popen([sys.executable, "-c", SPIN])
    time.sleep(2)  # past its import and first products: the cores are taken when timing starts
    try:
        yield
    finally:
        process.kill()
        process.wait()


def one_module(shape: tuple[int, int], ranks: tuple[int, ...], seed: int = 0) -> list[LoraAdapter]:
    generator = torch.Generator().manual_seed(seed)
    config = {"peft_type": "LORA", "r": max(ranks), "lora_alpha": max(ranks), "target_modules": ["proj"]}
    return [
        LoraAdapter(modules={"proj": LoraModule(A=torch.randn(r, shape[1], generator=generator) / shape[1] ** 0.5,
                                                B=torch.randn(shape[0], r, generator=generator) / r**0.5, scale=1.0)},
                    config={**config, "r": r})
        for r in ranks
    ]  # fmt: skip


THRESHOLD_CASES = [  # (space, method, shape, input ranks)
    ("core", "iso_c", (576, 576), (4, 16, 8, 12)),
    ("core", "iso_c", (1536, 576), (4, 16, 8, 12)),
    ("core", "iso_c", (4096, 4096), (16, 16, 16)),
    ("core", "iso_c", (14336, 4096), (16, 16, 16)),
    ("core", "iso_c", (14336, 4096), (64, 64, 64, 64)),
    ("core", "ties", (14336, 4096), (16, 16, 16)),
    ("full", "ties", (192, 576), (4, 16, 8, 12)),
    ("full", "ties", (576, 576), (4, 16, 8, 12)),
    ("full", "ties", (1536, 576), (4, 16, 8, 12)),
    ("full", "ties", (2048, 2048), (16, 16, 16)),
    ("full", "ties", (4096, 4096), (16, 16, 16)),
]


def best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def threshold(repeats: int) -> list[dict[str, object]]:
    """One module's merge on one thread and on all, with the policy off (the caller's count is used)."""
    rows = []
    every = torch.get_num_threads()
    for space, method, shape, ranks in THRESHOLD_CASES:
        adapters = one_module(shape, ranks)
        run = lambda a=adapters, m=method, s=space: merge_adapters(a, None, m, space=s, density=0.5)  # noqa: E731
        run()  # warm-up: first-call allocations
        with mock.patch.object(threads, "SMALL_WORK", 0):
            with threads.cpu_threads(1):
                one = best_of(run, repeats)
            all_threads = best_of(run, repeats)
        work = threads.module_work(space, shape, ranks)
        rows.append({"space": space, "method": method, "shape": list(shape), "ranks": list(ranks), "work": work,
                     "one_thread_s": one, "all_threads_s": all_threads, "threads": every,
                     "policy_threads": threads.threads_for(work) or every})  # fmt: skip
        print(f"  {space} {method} {shape} ranks {ranks}: work {work}, 1 thread {one * 1000:.1f} ms, "
              f"{every} threads {all_threads * 1000:.1f} ms", flush=True)  # fmt: skip
    return rows


def workloads(work: Path, layers: int) -> dict[str, Callable[[], LoraAdapter]]:
    demo = [load_adapter(str(ROOT / "adapters" / skill)) for skill in SKILLS]
    shapes = llama_shapes(layers)
    for seed, name in enumerate("abc"):
        synthetic_adapter(work / name, shapes, RANK, seed)
    big = [load_adapter(str(work / name)) for name in "abc"]
    return {
        "demo, 4 adapters, iso_c (the default)": lambda: merge_adapters(demo, None, "iso_c"),
        "demo, 4 adapters, ties (core, 0.95)": lambda: merge_adapters(demo, None, "ties"),
        f"Llama-3-8B-shaped, 3 adapters x {len(shapes)} modules, the defaults": lambda: merge_adapters(big, None),
    }


def fingerprint(adapter: LoraAdapter) -> list[torch.Tensor]:
    return [t for name in sorted(adapter.modules) for t in (adapter.modules[name].A, adapter.modules[name].B)]


def measure(jobs: dict[str, Callable[[], LoraAdapter]], repeats: int) -> list[dict[str, object]]:
    """Every job under every policy, alone then beside a competing process; policies interleaved per repeat."""
    rows = []
    for busy in (False, True):
        with competitor(busy):
            for label, job in jobs.items():
                times: dict[str, list[float]] = {name: [] for name in POLICIES}
                outputs: dict[str, list[torch.Tensor]] = {}
                for _ in range(repeats):
                    for name in POLICIES:
                        with policy(name):
                            started = time.perf_counter()
                            merged = job()
                            times[name].append(time.perf_counter() - started)
                        outputs[name] = fingerprint(merged)
                identical = all(
                    all(torch.equal(x, y) for x, y in zip(outputs["before"], other, strict=True))
                    for other in outputs.values()
                )
                rows.append({"job": label, "busy": busy, "seconds": times, "identical": identical})
                print(f"  {'competing' if busy else 'alone'} {label}: " + ", ".join(
                    f"{name} {statistics.median(values):.2f} s" for name, values in times.items())
                    + f"; identical outputs: {identical}", flush=True)  # fmt: skip
    return rows


def spread(values: list[float]) -> str:
    """``median s (min–max)``, the spread over the repeats."""
    return f"{statistics.median(values):.2f} s ({min(values):.2f}–{max(values):.2f})"


def markdown(threshold_rows: list[dict[str, object]], rows: list[dict[str, object]], repeats: int, load: str) -> str:
    lines = [f"Merge wall time, median (min–max) of {repeats} interleaved repeats, in this process; competing "
             "process: a second Python process multiplying 1024 x 1024 float32 matrices on every core. The machine "
             f"is shared: load averages (1, 5, 15 min) {load}.", "",
             "| merge | competing process | before: every module on all threads | after: loramerge.threads | one "
             "thread for everything | before / after | identical output |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        seconds = row["seconds"]
        ratio = statistics.median(seconds["before"]) / statistics.median(seconds["after"])
        lines.append(
            f"| {row['job']} | {'yes' if row['busy'] else 'no'} | "
            + " | ".join(spread(seconds[name]) for name in POLICIES)
            + f" | {ratio:.1f}× | {'yes' if row['identical'] else 'NO'} |"
        )
    if threshold_rows:
        every = threshold_rows[0]["threads"]
        lines += ["", f"One module's merge, best of {repeats}, on 1 and on {every} threads (no competing process); "
                  f"work: entries of the largest matrix it builds; the policy runs it on 1 thread below "
                  f"{threads.SMALL_WORK} entries.", "",
                  f"| space | method | module | input ranks | work | 1 thread | {every} threads | "
                  f"1 thread / {every} threads | policy's threads |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in threshold_rows:
            ratio = r["one_thread_s"] / r["all_threads_s"]
            lines.append(f"| {r['space']} | {r['method']} | {r['shape'][0]}×{r['shape'][1]} | "
                         f"{', '.join(map(str, r['ranks']))} | {r['work']} | {r['one_thread_s'] * 1000:.1f} ms | "
                         f"{r['all_threads_s'] * 1000:.1f} ms | {ratio:.2f} | {r['policy_threads']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=32, help="Layers of the 8B-shaped set.")
    parser.add_argument("--skip-threshold", action="store_true")
    args = parser.parse_args()
    started, load_before = time.perf_counter(), load_averages()
    threshold_rows = [] if args.skip_threshold else threshold(args.repeats)
    work = Path(tempfile.mkdtemp(prefix="loramerge-threads-"))
    try:
        rows = measure(workloads(work, args.layers), args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures = {"threshold": threshold_rows, "merges": rows, "small_work": threads.SMALL_WORK,
               "seconds": time.perf_counter() - started, "load_average": {"start": load_before,
                                                                          "end": load_averages()}}  # fmt: skip
    load = f"{figures['load_average']['start']} at the start, {figures['load_average']['end']} at the end"
    text = markdown(threshold_rows, rows, args.repeats, load)
    write_results("threads", figures, text)
    print(text)


if __name__ == "__main__":
    main()
