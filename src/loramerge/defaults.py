"""The merge defaults, chosen by measurement: ``benchmarks/quality.py`` on the shipped skill adapters
(figures and reasoning in the README, "Which method?"). Kept free of imports so ``--help`` stays fast."""

DEFAULT_METHOD = "ties"
DEFAULT_SPACE = "full"
DEFAULT_DENSITY = 0.8
