"""Pure tensor merge kernels and their registry."""

from loramerge.kernels.registry import (
    KERNELS,
    PRESETS,
    KernelSpec,
    get_kernel,
    preset_params,
    row_blocks,
    run_by_row_blocks,
    run_kernel,
    runs_by_rows,
    with_cutoffs,
)

__all__ = [
    "KERNELS",
    "PRESETS",
    "KernelSpec",
    "get_kernel",
    "preset_params",
    "row_blocks",
    "run_by_row_blocks",
    "run_kernel",
    "runs_by_rows",
    "with_cutoffs",
]
