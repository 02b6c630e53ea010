"""Spherical merges of whole tensors: NuSLERP, Multi-SLERP and the Karcher mean, as mergekit 0.1.5 defines
them (its documentation, checked black-box against ``mergekit-yaml`` in tests/test_mergekit_methods.py).

Each takes a stack of tensors (task vectors when a base is given, else the models' own tensors) and
returns one tensor of the same shape.
"""

from __future__ import annotations

import torch

from loramerge.errors import BadInput

_UNIT_FLOOR = 1e-7  # NuSLERP's smallest norm a vector is divided by


def _interpolate(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """Shoemake's slerp coefficients on the raw vectors (the last dimension), lerp where they are exactly
    (anti)parallel. Only the coefficients are per vector: the result is one ``a v0 + b v1`` pass."""
    norms = v0.norm(dim=-1, keepdim=True).clamp_min(_UNIT_FLOOR) * v1.norm(dim=-1, keepdim=True).clamp_min(_UNIT_FLOOR)
    cosine = ((v0 * v1).sum(dim=-1, keepdim=True) / norms).clamp(-1.0, 1.0)
    theta = torch.acos(cosine)
    sine = torch.sin(theta)
    parallel = cosine.abs() == 1.0
    safe = torch.where(parallel, torch.ones_like(sine), sine)
    first = torch.where(parallel, 1 - t, torch.sin((1 - t) * theta) / safe)
    second = torch.where(parallel, t, torch.sin(t * theta) / safe)
    return v0 * first + v1 * second


def nuslerp(
    tasks: torch.Tensor, weights: torch.Tensor, *, nuslerp_flatten: bool, nuslerp_row_wise: bool
) -> torch.Tensor:
    """mergekit's NuSLERP (Shoemake's slerp, SIGGRAPH 1985, with weights): ``t = w_1 / (w_0 + w_1)``
    (0.5 when the weights sum to about zero; not clamped), over the whole tensor (``nuslerp_flatten``),
    each vector along the last dimension, or along the first (``nuslerp_row_wise``)."""
    if len(tasks) != 2:
        raise BadInput(f"nuslerp takes exactly 2 models, got {len(tasks)}")
    w0, w1 = (float(w) for w in weights)
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    v0, v1 = tasks[0], tasks[1]
    if nuslerp_flatten or v0.dim() < 2:
        return _interpolate(v0.reshape(-1), v1.reshape(-1), t).reshape(v0.shape)
    if nuslerp_row_wise:  # mergekit's name: vectors along the first dimension (the columns of a matrix)
        return _interpolate(v0.movedim(0, -1), v1.movedim(0, -1), t).movedim(-1, 0)
    return _interpolate(v0, v1, t)


def multislerp(tasks: torch.Tensor, weights: torch.Tensor, *, normalize_weights: bool, eps: float) -> torch.Tensor:
    """mergekit's Multi-SLERP (Goddard): the weighted mean of the unit directions, normalised, times the
    weighted mean norm (and ``cos(eps)``, from its tangent step, which vanishes). Two exactly opposed
    inputs fall back to the weighted sum."""
    if len(tasks) == 1:
        return tasks[0].clone()
    if normalize_weights and abs(float(weights.sum())) < 1e-12:
        raise BadInput(f"multislerp: the weights {weights.tolist()} sum to zero, so they cannot be normalised")
    w = weights / weights.sum() if normalize_weights else weights
    flat = tasks.reshape(len(tasks), -1)
    norms = flat.norm(dim=1)
    mean_direction = (w[:, None] * flat / (norms[:, None] + eps)).sum(dim=0)
    length = mean_direction.norm()
    if length < eps:
        if len(tasks) > 2:
            raise BadInput("multislerp: the weighted mean of the directions is zero")
        return (w[:, None] * flat).sum(dim=0).reshape(tasks[0].shape)
    scale = torch.cos(torch.tensor(eps)) * (w * norms).sum() / length
    return (mean_direction * scale).reshape(tasks[0].shape)


def karcher(tasks: torch.Tensor, weights: torch.Tensor, *, max_iter: int, tol: float) -> torch.Tensor:
    """The Karcher mean (Karcher, Comm. Pure Appl. Math. 1977; Wang et al., arXiv:2603.04972) of the
    inputs' directions on the unit sphere, by fixed-point iteration of log and exp maps, times their mean
    norm. Unweighted, as in mergekit; inputs with norm ≤ ``tol`` count only in the norm."""
    flat = tasks.reshape(len(tasks), -1)
    if len(flat) == 1:
        return tasks[0].clone()
    norms = flat.norm(dim=1)
    mean_norm = norms.mean()
    valid = norms > tol
    if not valid.any():
        return torch.zeros_like(tasks[0])
    units = flat[valid] / norms[valid, None]
    start = units.mean(dim=0)
    mu = units[0] if start.norm() < tol else start / start.norm()
    for _ in range(int(max_iter)):
        cosines = (units @ mu).clamp(-1.0, 1.0)
        theta = torch.acos(cosines)
        sine = torch.sin(theta)
        factor = torch.where(theta > 0, theta / torch.where(sine == 0, torch.ones_like(sine), sine), 0.0)
        step = ((units - cosines[:, None] * mu) * factor[:, None]).mean(dim=0)
        size = step.norm()
        if size < tol:
            break
        mu = torch.cos(size) * mu + torch.sin(size) * step / size
        mu = mu / mu.norm()
    return (mu * mean_norm).reshape(tasks[0].shape)
