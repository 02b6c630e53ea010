"""How many CPU threads one module's merge runs on.

torch splits every CPU op over its whole thread pool and waits for all the pool's threads at the end of
each op. A core-space merge is thousands of small ops (QRs of stacked factors, R x R cores, thin
products), each far shorter than a scheduler time slice: when another process holds a core, every op
waits for a descheduled thread: the demo's 0.27 s merge took 3.28 s beside one busy process
(``benchmarks/threads.py``), 7-10 s on a busier machine (issue 22). On one
thread a small op never waits and, alone on the machine, loses little, because it is too small to gain
much from a second core. The full space builds dense ``out x in`` deltas, which gain more from every
core: a module is left on the caller's thread count when its largest matrix reaches ``SMALL_WORK`` entries.

The thread count never changes a result's bits: the decompositions already run on one thread
(``seeding.thread_independent``) and ``tests/test_determinism.py`` compares 1 and 2 threads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

import torch

# Entries of a module's largest matrix below which it runs on one thread (4 M: a 2048 x 2048 dense delta).
# Measured on 2 cores (benchmarks/results/threads.md): alone, a second thread sped a low-rank module up by
# 1.00-1.16x (up to four rank-64 adapters of a 14336 x 4096 module, 3.7 M entries) and a full-space one by
# 1.11-1.31x; beside a busy process, every thread made whole merges 3.4-4.6x slower. Small work is not worth
# that risk; an 8B model's full-space modules (4096 x 4096 and up) keep every thread.
SMALL_WORK = 2**22


def module_work(strategy: str, shape: tuple[int, int], input_ranks: Sequence[int]) -> int:
    """Entries of the largest matrix a module's merge builds: the dense delta in the full space, else the
    stacked factors (longer side x the sum of the input ranks)."""
    if strategy == "full":
        return shape[0] * shape[1]
    return max(shape) * sum(input_ranks)


def threads_for(work: int) -> int | None:
    """One thread for small work; ``None`` (keep the caller's count) for work that gains from more."""
    return 1 if work < SMALL_WORK else None


@contextmanager
def cpu_threads(count: int | None, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block on ``count`` torch CPU threads and restore the caller's count after; ``None``, a
    non-CPU device or an unchanged count leave the threads alone."""
    previous = torch.get_num_threads()
    if count is None or torch.device(device).type != "cpu" or count == previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def module_threads(
    strategy: str, shape: tuple[int, int], input_ranks: Sequence[int], device: torch.device | str = "cpu"
) -> AbstractContextManager[None]:
    """The thread count for one module's merge, as a context (``cpu_threads(threads_for(module_work(…)))``)."""
    return cpu_threads(threads_for(module_work(strategy, shape, input_ranks)), device)
