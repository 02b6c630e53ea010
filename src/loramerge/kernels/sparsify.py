"""Sparsification of one task tensor, the first step of the task-vector kernels: magnitude trim (TIES),
random drop (DARE), outlier cut (Breadcrumbs) and magnitude-ranked drop (DELLA). Each returns the kept
entries, rescaled as asked; the catalogue holds the defaults."""

from __future__ import annotations

from typing import Literal

import torch

from loramerge.errors import BadInput

Rescale = Literal["density", "l1", "none"]


def rescale_kept(tensor: torch.Tensor, kept: torch.Tensor, rescale: Rescale, keep_probability) -> torch.Tensor:
    """``density``: divide by the keep probability (DARE, DELLA papers); ``l1``: match the input's L1 norm
    (mergekit); ``none``: as kept."""
    if rescale == "density":
        return kept / keep_probability
    if rescale == "l1":
        before, after = tensor.abs().sum(), kept.abs().sum()
        return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)
    return kept


def kth_largest(magnitudes: torch.Tensor, k: int) -> float:
    """The ``k``-th largest (1 = the largest) of non-negative values, exactly.

    A two-level radix select on the float32 bit patterns (monotonic for non-negative floats): count
    the top 16 bits, then select within the one bucket that holds the answer. Linear time and about
    five times faster than ``torch.kthvalue`` on the tens of millions of entries of an embedding.
    """
    flat = magnitudes.reshape(-1).to(torch.float32).contiguous()
    if flat.numel() < 1 << 16:
        return torch.kthvalue(flat, flat.numel() - k + 1).values.item()
    high = flat.view(torch.int32) >> 16
    from_top = torch.bincount(high, minlength=1 << 15).flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, k))
    above = int(from_top[position - 1]) if position else 0
    candidates = flat[high == (1 << 15) - 1 - position]
    return torch.kthvalue(candidates, candidates.numel() - (k - above) + 1).values.item()


def trim_cutoff(tensor: torch.Tensor, density: float) -> float:
    """The magnitude of the ``int(density * numel)``-th largest entry: what magnitude_trim keeps down to."""
    keep = int(density * tensor.numel())
    if keep <= 0:
        return float("inf")
    return kth_largest(tensor.abs(), keep)


def magnitude_trim(
    tensor: torch.Tensor, *, density: float, rescale: Rescale, cutoff: float | None = None
) -> torch.Tensor:
    """Keep the top ``int(density * numel)`` entries by absolute value, zero the rest (entries tied at
    the cut are all kept). ``cutoff`` (from ``trim_cutoff`` of the whole tensor) lets a caller trim a
    tensor piece by piece.

    The "trim" step of TIES-Merging (Yadav et al., NeurIPS 2023, arXiv:2306.01708).
    """
    if density >= 1.0:
        return tensor
    cutoff = trim_cutoff(tensor, density) if cutoff is None else cutoff
    kept = tensor * (tensor.abs() >= cutoff).to(tensor.dtype)
    return rescale_kept(tensor, kept, rescale, density)


def outlier_cutoffs(tensor: torch.Tensor, density: float, gamma: float) -> tuple[float, float]:
    """Magnitudes bounding what outlier_trim keeps: above the smallest entries, below the outliers."""
    count = tensor.numel()
    keep = int(density * count)
    if keep <= 0:
        return float("inf"), float("-inf")
    smallest = max(0, count - keep - int(gamma * count))
    magnitudes = tensor.abs()
    return kth_largest(magnitudes, count - smallest), kth_largest(magnitudes, count - smallest - keep + 1)


def outlier_trim(
    tensor: torch.Tensor, *, density: float, gamma: float, rescale: Rescale, cutoff: tuple[float, float] | None = None
) -> torch.Tensor:
    """Drop the largest ``gamma`` fraction (outliers) and the smallest entries, keeping ``density``.

    Model Breadcrumbs (Davari & Belilovsky, ECCV 2024, arXiv:2312.06795). When the two cuts overlap the
    outlier cut shrinks so that ``int(density * numel)`` entries survive.
    """
    if density >= 1.0:
        return tensor
    low, high = outlier_cutoffs(tensor, density, gamma) if cutoff is None else cutoff
    magnitudes = tensor.abs()
    kept = tensor * ((magnitudes >= low) & (magnitudes <= high)).to(tensor.dtype)
    return rescale_kept(tensor, kept, rescale, density)


def random_drop(
    tensor: torch.Tensor, *, density: float, rescale: Rescale, generator: torch.Generator | None
) -> torch.Tensor:
    """Keep each entry with probability ``density`` and rescale the survivors.

    DARE, "Drop And REscale" (Yu et al., ICML 2024, arXiv:2311.03099).
    """
    if density >= 1.0:
        return tensor
    draws = torch.rand(tensor.shape, generator=generator, device=tensor.device, dtype=torch.float32)
    kept = tensor * (draws < density).to(tensor.dtype)
    return rescale_kept(tensor, kept, rescale, density)


def ranked_drop(
    tensor: torch.Tensor, *, density: float, epsilon: float, rescale: Rescale, generator: torch.Generator | None
) -> torch.Tensor:
    """Keep each entry with a probability that grows with its magnitude rank within its row,
    from ``density - epsilon`` (smallest) to ``density + epsilon`` (largest).

    DELLA's MagPrune (Deep et al., 2024, arXiv:2406.11617).
    """
    if density >= 1.0:
        return tensor
    if density - epsilon <= 0 or density + epsilon >= 1:
        raise BadInput(f"della needs 0 < density - epsilon and density + epsilon < 1 (got {density}, {epsilon})")
    rows = tensor.reshape(1, -1) if tensor.dim() < 2 else tensor.reshape(tensor.shape[0], -1)
    ranks = rows.abs().float().argsort(dim=1, stable=True).argsort(dim=1).float()
    spread = ranks.max(dim=1, keepdim=True).values.clamp(min=1)
    probability = (density - epsilon) + (ranks / spread) * 2 * epsilon
    draws = torch.rand(rows.shape, generator=generator, device=tensor.device, dtype=torch.float32)
    kept = (rows * (draws < probability).to(rows.dtype)).reshape(tensor.shape)
    return rescale_kept(tensor, kept, rescale, probability.reshape(tensor.shape))
