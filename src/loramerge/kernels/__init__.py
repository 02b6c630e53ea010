"""Pure tensor merge kernels and their registry."""

from loramerge.kernels.registry import KERNELS, PRESETS, KernelSpec, get_kernel, preset_params, run_kernel

__all__ = ["KERNELS", "PRESETS", "KernelSpec", "get_kernel", "preset_params", "run_kernel"]
