"""The adapter merge methods and the merge defaults. The defaults were chosen by measurement:
``benchmarks/quality.py`` on the shipped skill adapters (figures and reasoning in the README, "Which
method?"). Kept free of imports so ``--help`` stays fast."""

LOWRANK_METHODS = ("cat", "svd")
ADAPTER_KERNELS = (
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune",
    "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
)  # fmt: skip
METHODS = (*LOWRANK_METHODS, *ADAPTER_KERNELS)

DEFAULT_METHOD = "ties"
DEFAULT_SPACE = "core"
DEFAULT_DENSITY = 0.95
