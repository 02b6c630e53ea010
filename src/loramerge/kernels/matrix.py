"""Merge kernels that need whole matrices: a stack of task matrices ``T[n, a, b]`` and weights ``w[n]`` in,
one ``a x b`` matrix out. They use singular value decompositions of the tasks or of their sum, so they
run on LoRA cores (the ``core`` space: every basis they need lies in the span of the stacked factors)
or on dense deltas (``full``), never element by element.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from loramerge import catalogue
from loramerge.errors import BadInput
from loramerge.kernels.consensus import broadcast_weights
from loramerge.kernels.methods import weighted_sum
from loramerge.kernels.registry import run_kernel
from loramerge.seeding import reproducible_svd


def numerical_rank(values: torch.Tensor, shape: Sequence[int]) -> int:
    """How many singular values are above round-off (``torch.linalg.matrix_rank``'s default tolerance), so
    that the same matrix in the core and in the full space has the same rank."""
    if not len(values) or values[0] <= 0:
        return 0
    tolerance = values[0] * max(shape) * torch.finfo(values.dtype).eps
    return int((values > tolerance).sum())


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (orthogonal Procrustes): ``P Qᵀ`` for ``M = P S Qᵀ``."""
    left, _, right_t = reproducible_svd(matrix)
    return left @ right_t


def iso_c(tasks: torch.Tensor, weights: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """Iso-C (Marczak et al., "No task left behind: isotropic model merging", ICML 2025): the task
    arithmetic sum with every singular value replaced by their mean (a flat spectrum), times ``alpha``;
    the singular subspaces of the sum are kept."""
    left, values, right_t = reproducible_svd(weighted_sum(tasks, weights, normalize=False))
    rank = numerical_rank(values, tasks.shape[1:])
    if rank == 0:
        return torch.zeros_like(tasks[0])
    return alpha * values[:rank].mean() * (left[:, :rank] @ right_t[:rank])


def tsv_m(tasks: torch.Tensor, weights: torch.Tensor, *, alpha: float, keep: float) -> torch.Tensor:
    """TSV-Merge (Gargiulo et al., "Task Singular Vectors", CVPR 2025): per task, the top singular triplets
    (``keep`` of its rank, rounded up; 0 keeps 1/n); the kept left and right singular vectors of all tasks
    side by side, each stack replaced by its nearest orthogonal matrix, rebuilt with the kept singular
    values (times the task's weight), times ``alpha``."""
    fraction = keep if keep > 0 else 1.0 / len(tasks)
    lefts, values, rights = [], [], []
    for task, weight in zip(tasks, weights.tolist(), strict=True):
        left, sigma, right_t = reproducible_svd(task)
        rank = numerical_rank(sigma, task.shape)
        kept = min(rank, max(1, math.ceil(fraction * rank))) if rank else 0
        lefts.append(left[:, :kept])
        values.append(weight * sigma[:kept])
        rights.append(right_t[:kept].T)
    if not sum(v.numel() for v in values):
        return torch.zeros_like(tasks[0])
    left, right = polar_factor(torch.cat(lefts, dim=1)), polar_factor(torch.cat(rights, dim=1))
    return alpha * (left * torch.cat(values)) @ right.T


def knots(
    tasks: torch.Tensor,
    weights: torch.Tensor,
    *,
    inner: str,
    density: float,
    majority_sign: str,
    elect_on: str,
    divisor: str,
    rescale: str,
    generators: Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """KnOTS (Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025): the SVD of the tasks
    side by side, ``[T_1 … T_n] = U Σ [V_1ᵀ … V_nᵀ]``, aligns them in one shared basis ``U Σ``; the
    task-specific ``V_iᵀ`` are merged with the element-wise method ``inner`` (ties, dare_ties, linear …)
    and the result is ``U Σ V̂ᵀ``. With ``inner = linear`` it is the exact weighted sum."""
    count, rows, columns = tasks.shape
    left, values, right_t = reproducible_svd(torch.cat(list(tasks), dim=1))
    rank = numerical_rank(values, (rows, count * columns))
    if rank == 0:
        return torch.zeros_like(tasks[0])
    aligned = right_t[:rank].reshape(rank, count, columns).transpose(0, 1).contiguous()  # V_iᵀ: n x rank x b
    method = catalogue.method(inner)
    if method.level != "element":
        raise BadInput(f"knots: `inner` must be an element-wise method, got {inner!r}", param="inner")
    params = {"density": density, "majority_sign": majority_sign, "elect_on": elect_on, "divisor": divisor,
              "rescale": rescale if method.random else "none"}  # fmt: skip
    merged = run_kernel(method, aligned, weights, params, generators)
    return (left[:, :rank] * values[:rank]) @ merged


def iso_cts(tasks: torch.Tensor, weights: torch.Tensor, *, alpha: float, common: float) -> torch.Tensor:
    """Iso-CTS (Marczak et al., ICML 2025): the top ``common`` fraction of the sum's singular directions
    (the common subspace), completed by each task's top directions outside it (an equal share of the
    remaining rank per task), both stacks orthogonalised, with a flat spectrum: the mean of the kept
    singular values, times ``alpha``. Ranks are counted on the sum's numerical rank, so the core and the
    full space agree."""
    weighted = tasks * broadcast_weights(weights, tasks)
    left, values, right_t = reproducible_svd(weighted.sum(dim=0))
    rank = numerical_rank(values, tasks.shape[1:])
    if rank == 0:
        return torch.zeros_like(tasks[0])
    kept = min(rank, max(1, int(common * rank)))
    share = (rank - kept) // len(tasks)
    lefts, rights, sigmas = [left[:, :kept]], [right_t[:kept].T], [values[:kept]]
    if share:
        projector = left[:, :kept] @ left[:, :kept].T
        for task in weighted:
            t_left, t_values, t_right_t = reproducible_svd(task - projector @ task)
            t_rank = min(share, numerical_rank(t_values, task.shape))
            lefts.append(t_left[:, :t_rank]), rights.append(t_right_t[:t_rank].T), sigmas.append(t_values[:t_rank])
    flat = torch.cat(sigmas).mean()
    return alpha * flat * polar_factor(torch.cat(lefts, dim=1)) @ polar_factor(torch.cat(rights, dim=1)).T


def wudi(tasks: torch.Tensor, weights: torch.Tensor, *, alpha: float, ridge: float) -> torch.Tensor:
    """WUDI-Merging (Cheng et al., "Whoever Started the Interference Should End It", ICML 2025): the update ``τ``
    minimising ``Σ_i ‖(τ − w_i T_i) T_iᵀ‖²_F / ‖T_i‖²_F``, each task's interference measured on its own row space
    (which stands in for its inputs), times ``alpha``. With ``P_i = T_iᵀ T_i / ‖T_i‖²`` the objective is
    ``Σ_i tr((τ − w_i T_i) P_i (τ − w_i T_i)ᵀ)``, whose gradient vanishes where ``τ C = D``, ``C = Σ_i P_i``,
    ``D = Σ_i w_i T_i P_i``: solved exactly, the minimum-norm solution ``D C⁺`` (the point plain gradient descent
    from the sum converges to; the authors stop 300 Adam steps in). Tasks whose row spaces nearly coincide give
    ``C`` eigenvalues near 0 and a large exact solution: ``ridge`` > 0 solves ``D (C + ridge · λ_max(C) I)⁻¹``
    instead (the loss plus ``ridge · λ_max ‖τ‖²``). A task of weight 0 still counts in ``C``: it asks to be left
    unchanged. An orthonormal change of basis ``T → U T Vᵀ`` maps the solution the same way, so the R x R cores
    suffice."""
    work = tasks.to(torch.float64)
    norms = work.flatten(1).norm(dim=1).square()
    present = norms > 0
    if not bool(present.any()):
        return torch.zeros_like(tasks[0])
    work, norms, scales = work[present], norms[present], weights.to(torch.float64)[present]
    grams = work.transpose(1, 2) @ work / norms.view(-1, 1, 1)  # P_i, b x b each
    target = ((scales.view(-1, 1, 1) * work) @ grams).sum(dim=0)
    values, vectors = torch.linalg.eigh(grams.sum(dim=0))
    # the cut drops round-off (float32 tasks leave ~1e-14 of λ_max there), at a size-independent level so that
    # the core and the full space keep the same eigenvalues; D has no component outside the kept ones
    kept = values > values[-1] * 1e-10
    inverse = (vectors[:, kept] / (values[kept] + ridge * values[-1])) @ vectors[:, kept].T
    return (alpha * target @ inverse).to(tasks.dtype)


def smoothed_spectrum(values: torch.Tensor, smoothing: str, rho: float) -> torch.Tensor:
    """DC-Merge's smoothing of one task's singular values, their sum kept: ``uniform`` (each the mean) or ``linear``
    (a ramp from ``min(rho, σ_1/σ_r)`` down to 1, scaled to the same sum)."""
    if smoothing == "uniform":
        return torch.full_like(values, float(values.mean()))
    ratio = min(rho, float(values[0] / values[-1]))
    ramp = torch.linspace(ratio, 1.0, len(values), dtype=values.dtype)
    return values.sum() * ramp / ramp.sum()


def partial_isometry(matrix: torch.Tensor) -> torch.Tensor:
    """``P Qᵀ`` over the nonzero singular values of ``M = P S Qᵀ``: the polar factor where ``M`` has full column
    rank, and still one well-defined matrix (not an arbitrary completion) where its columns are dependent."""
    left, values, right_t = reproducible_svd(matrix)
    rank = numerical_rank(values, matrix.shape)
    return left[:, :rank] @ right_t[:rank]


def dc_merge(
    tasks: torch.Tensor, weights: torch.Tensor, *, alpha: float, smoothing: str, rho: float, keep: float
) -> torch.Tensor:
    """DC-Merge (Zhang et al., CVPR 2026, arXiv:2603.06242, as the authors' code runs it): each (weighted) task
    truncated to its rank with its singular values smoothed (``smoothed_spectrum``); the tasks' left and right
    singular vectors stacked, each stack replaced by its polar factor (shared bases ``U``, ``V``); each task
    expressed in them (``M_i = Uᵀ T̃_i V``), its largest ``keep`` fraction of entries kept, and at least as many as
    its rank (the authors' 0.1 % is exactly that many in their 8-task, rank-16 setting; fewer would pick among the
    equal entries of a flat spectrum by round-off), merged by TIES' sign election (the mean of the entries
    agreeing with the sign of the sum), only the diagonal blocks of each task's own directions kept, mapped back
    (``U M Vᵀ``) and times ``alpha``. Stacks with dependent columns (tasks sharing directions) use the partial
    isometry over their rank; near-dependent ones amplify round-off, as the polar factor does."""
    lefts, rights, smoothed, ranks = [], [], [], []
    for task, weight in zip(tasks, weights.tolist(), strict=True):
        left, values, right_t = reproducible_svd(weight * task)
        rank = numerical_rank(values, task.shape)
        if rank == 0:
            continue
        lefts.append(left[:, :rank])
        rights.append(right_t[:rank].T)
        smoothed.append((left[:, :rank] * smoothed_spectrum(values[:rank], smoothing, rho)) @ right_t[:rank])
        ranks.append(rank)
    if not ranks:
        return torch.zeros_like(tasks[0])
    shared_left = partial_isometry(torch.cat(lefts, dim=1))
    shared_right = partial_isometry(torch.cat(rights, dim=1))
    projected = torch.stack([shared_left.T @ task @ shared_right for task in smoothed])
    flat = projected.flatten(1).abs()
    counts = torch.tensor([[max(rank, int(keep * flat.shape[1]))] for rank in ranks])
    threshold = flat.sort(dim=1, descending=True).values.gather(1, counts - 1)
    kept = projected * (flat >= threshold).reshape(projected.shape)
    total = kept.sum(dim=0)
    agreeing = torch.sign(kept) == torch.sign(total)
    merged = (kept * agreeing).sum(dim=0) / agreeing.sum(dim=0).clamp_min(1)
    merged = torch.where(total == 0, torch.zeros_like(merged), merged)
    mask = torch.block_diag(*[torch.ones(rank, rank, dtype=merged.dtype) for rank in ranks])
    return alpha * shared_left @ (merged * mask) @ shared_right.T
