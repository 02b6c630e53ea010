"""Pure tensor merge kernels and how they are run (the methods themselves are in ``loramerge.catalogue``)."""

from loramerge.kernels.registry import (
    preset_params,
    row_blocks,
    run_by_row_blocks,
    run_kernel,
    runs_by_rows,
    with_cutoffs,
)

__all__ = [
    "preset_params",
    "row_blocks",
    "run_by_row_blocks",
    "run_kernel",
    "runs_by_rows",
    "with_cutoffs",
]
