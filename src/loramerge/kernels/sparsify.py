"""Sparsification of one task tensor: magnitude trim (TIES) and random drop (DARE)."""

from __future__ import annotations

from typing import Literal

import torch

Rescale = Literal["density", "l1", "none"]


def magnitude_trim(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``int(density * numel)`` entries by absolute value, zero the rest.

    The "trim" step of TIES-Merging (Yadav et al., NeurIPS 2023, arXiv:2306.01708).
    """
    if density >= 1.0:
        return tensor
    keep = int(density * tensor.numel())
    flat = tensor.reshape(-1)
    mask = torch.zeros_like(flat)
    if keep > 0:
        mask[torch.topk(flat.abs(), k=keep, largest=True).indices] = 1
    return (flat * mask).reshape(tensor.shape)


def random_drop(
    tensor: torch.Tensor, density: float, generator: torch.Generator | None, rescale: Rescale = "density"
) -> torch.Tensor:
    """Keep each entry with probability ``density`` and rescale the survivors.

    DARE, "Drop And REscale" (Yu et al., ICML 2024, arXiv:2311.03099). ``rescale="density"`` divides by
    the keep probability (the paper, PEFT); ``"l1"`` matches the L1 norm of the input (mergekit).
    """
    if density >= 1.0:
        return tensor
    draws = torch.rand(tensor.shape, generator=generator, device=tensor.device, dtype=torch.float32)
    kept = tensor * (draws < density).to(tensor.dtype)
    if rescale == "density":
        return kept / density
    if rescale == "l1":
        kept_norm = kept.abs().sum()
        return kept * (tensor.abs().sum() / kept_norm) if kept_norm > 0 else kept
    return kept
