"""LARV's scales for an adapter merge (``--param larv=tiered``, ``loramerge.lowrank.larv``): one per module,
from the module's update — the weighted sum of the adapters' ``s_i B_i A_i``, what every merger starts from —
against the base's weight, read once per module. The plan multiplies the module's weights by its scale, so each
task vector is scaled before the merger runs, as the paper applies it."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import torch

from loramerge.adapters.dora import BaseReader
from loramerge.catalogue import larv_tiers
from loramerge.kernels.matrix import numerical_rank
from loramerge.lowrank import LowRank
from loramerge.lowrank.larv import commutator_conflict, continuous_scales, effective_rank, layer_scores, tiered_scales
from loramerge.lowrank.svd import factored_svd

_BLOCK = re.compile(r"\.(\d+)\.")  # the decoder block of a module: model.layers.<n>.self_attn.q_proj


def block_index(module: str) -> int | None:
    """The module's block number (its depth), None where its name has none (``lm_head``)."""
    found = _BLOCK.search(f".{module}.")
    return int(found.group(1)) if found else None


def depth_priors(modules: list[str]) -> list[float]:
    """LARV's ``d = (ℓ + 1) / L`` of each module, ``L`` the number of blocks; a module outside the blocks
    counts as the last."""
    blocks = [block_index(name) for name in modules]
    count = 1 + max((b for b in blocks if b is not None), default=0)
    return [1.0 if block is None else (block + 1) / count for block in blocks]


def module_diagnostics(update: LowRank, weight: torch.Tensor) -> tuple[float, float] | None:
    """``(e, c)`` of one module: the effective-rank contrast and the commutator conflict of its update against
    the base's weight; None where the update is zero (its scale does not matter)."""
    left, values, right = factored_svd(update)
    rank = numerical_rank(values, tuple(weight.shape))
    if rank == 0:
        return None
    contrast = effective_rank(torch.linalg.svdvals(weight)) / effective_rank(values[:rank])
    return contrast, commutator_conflict(weight, left[:, :rank], values[:rank], right[:, :rank])


def larv_scales(
    updates: Iterable[tuple[str, LowRank]],
    count: int,
    base: BaseReader,
    params: Mapping[str, object],
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, float]:
    """Every module's scale (none where its update is zero: 1) from its update (``(name, B A)``, ``count`` of
    them), by the gate ``params["larv"]``: ``tiered`` (at ``params["larv_tiers"]``) or ``continuous``."""
    found: dict[str, tuple[float, float]] = {}
    for done, (name, update) in enumerate(updates, start=1):
        diagnostics = module_diagnostics(update, base.weight(name).to(update.A.device))
        if diagnostics is not None:
            found[name] = diagnostics
        if progress is not None:
            progress(done, count, f"{name} (LARV)")
    if not found:
        return {}
    names = list(found)
    scores = layer_scores([found[n][0] for n in names], [found[n][1] for n in names], depth_priors(names))
    if params["larv"] == "tiered":
        scales = tiered_scales(scores, larv_tiers(params["larv_tiers"]))
    else:
        scales = continuous_scales(scores)
    return dict(zip(names, scales.tolist(), strict=True))
