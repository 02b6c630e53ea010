"""Factored linear algebra for LoRA: exact sums, QR + small-core SVD, shared core bases."""

from loramerge.lowrank.factored import LowRank, concat, frobenius_inner
from loramerge.lowrank.svd import (
    concat_merge,
    core_basis,
    from_core,
    project_to_core,
    svd_merge,
    truncate_dense,
    truncate_dense_randomized,
    truncate_rank,
    use_randomized,
)

__all__ = [
    "LowRank",
    "concat",
    "concat_merge",
    "core_basis",
    "frobenius_inner",
    "from_core",
    "project_to_core",
    "svd_merge",
    "truncate_dense",
    "truncate_dense_randomized",
    "truncate_rank",
    "use_randomized",
]
