"""The merge defaults, chosen by measurement: ``benchmarks/quality.py`` on the shipped skill adapters
(figures and reasoning in the README, "Which method?"). Kept free of imports so ``--help`` stays fast."""

DEFAULT_METHOD = "svd"
DEFAULT_SPACE = "core"
DEFAULT_DENSITY = 0.5
