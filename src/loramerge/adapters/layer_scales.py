"""LARV's scales for an adapter merge (``--param larv=tiered``, ``loramerge.lowrank.larv``): one per block of the
layer stack (``model.layers.N``, the paper's layer), from the diagnostics of its modules' updates — each the
weighted sum of the adapters' ``s_i B_i A_i``, what every merger starts from — against the base's weights, each
read once. The plan multiplies a module's weights by its block's scale, so each task vector is scaled before the
merger runs, as the paper applies it."""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from loramerge.adapters.dora import BaseReader, BaseWeights
from loramerge.kernels.matrix import numerical_rank
from loramerge.lowrank import LowRank
from loramerge.lowrank.larv import commutator_conflict, continuous_scales, effective_rank, layer_scores, tiered_scales
from loramerge.lowrank.svd import factored_svd
from loramerge.seeding import thread_independent

_BLOCK = re.compile(r"\.(\d+)\.")  # the decoder block of a module: model.layers.<n>.self_attn.q_proj


def block_index(module: str) -> int | None:
    """The module's block number (its depth), None where its name has none (``lm_head``)."""
    found = _BLOCK.search(f".{module}.")
    return int(found.group(1)) if found else None


def numbered_blocks(modules: Iterable[str]) -> set[int]:
    """The blocks of a layer stack the modules lie in."""
    return {block for block in map(block_index, modules) if block is not None}


# The base weights' effective ranks, by what each weight is read from: a dense SVD per module, and a quantity of
# the base alone, so a search or a benchmark merging the same base again computes each once per process.
_BASE_RANKS: dict[tuple[object, ...], float] = {}


def base_effective_rank(weight: torch.Tensor, identity: tuple[object, ...] | None = None) -> float:
    """``r_eff`` of a base weight (its singular values on one thread: LAPACK's blocking follows the thread count,
    and so would the bits), kept by ``identity`` where the reader gives one."""
    if identity is not None and identity in _BASE_RANKS:
        return _BASE_RANKS[identity]
    with thread_independent(weight):
        found = effective_rank(torch.linalg.svdvals(weight))
    if identity is not None:
        _BASE_RANKS[identity] = found
    return found


def module_diagnostics(
    update: LowRank, weight: torch.Tensor, base_rank: float | None = None
) -> tuple[float, float] | None:
    """``(e, c)`` of one module: the effective-rank contrast and the commutator conflict of its update against
    the base's weight (whose effective rank ``base_rank`` is, where known); None where the update is zero (its
    scale does not matter)."""
    left, values, right = factored_svd(update)
    rank = numerical_rank(values, tuple(weight.shape))
    if rank == 0:
        return None
    contrast = (base_effective_rank(weight) if base_rank is None else base_rank) / effective_rank(values[:rank])
    return contrast, commutator_conflict(weight, left[:, :rank], values[:rank], right[:, :rank])


def block_scales(diagnostics: Mapping[str, tuple[float, float]], gate: str, tiers: Sequence[float]) -> dict[str, float]:
    """One scale per block: its modules' mean ``e`` and ``c``, its depth ``d = (ℓ + 1) / L`` (``L`` the deepest
    adapted block plus one; modules outside the blocks count as the last), the score, the gate. The continuous
    gate sees the scores over their median: a LoRA update's effective rank is far below a full fine-tune's, so
    its raw scores sit far above the gate's midpoint of 1 and every scale would be 1.5."""
    blocks: dict[int | None, list[tuple[float, float]]] = {}
    for name, found in diagnostics.items():
        blocks.setdefault(block_index(name), []).append(found)
    count = 1 + max((block for block in blocks if block is not None), default=0)
    keys = list(blocks)
    contrasts = [statistics.fmean(e for e, _ in blocks[key]) for key in keys]
    conflicts = [statistics.fmean(c for _, c in blocks[key]) for key in keys]
    depths = [1.0 if key is None else (key + 1) / count for key in keys]
    scores = layer_scores(contrasts, conflicts, depths)
    if gate == "tiered":
        scales = tiered_scales(scores, tiers)
    else:
        scales = continuous_scales(scores / torch.quantile(scores, 0.5))
    by_block = dict(zip(keys, scales.tolist(), strict=True))
    return {name: by_block[block_index(name)] for name in diagnostics}


def larv_scales(
    updates: Iterable[tuple[str, LowRank]],
    count: int,
    base: BaseReader,
    gate: str,
    tiers: Sequence[float],
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, float]:
    """Every module's scale from its update (``(name, B A)``, ``count`` of them) and its base weight, by
    ``gate`` (``tiered`` at ``tiers``, or ``continuous``); a module whose update is zero is left out (scale 1)."""
    found: dict[str, tuple[float, float]] = {}
    for done, (name, update) in enumerate(updates, start=1):
        weight = base.weight(name).to(update.A.device)
        identity = base.identity(name) if isinstance(base, BaseWeights) else None  # a live model's may change
        diagnostics = module_diagnostics(update, weight, base_effective_rank(weight, identity))
        if diagnostics is not None:
            found[name] = diagnostics
        if progress is not None:
            progress(done, count, f"{name} (LARV)")
    return block_scales(found, gate, tiers) if found else {}
