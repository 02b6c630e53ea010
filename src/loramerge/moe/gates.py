"""Router rows of a mixture of experts, one row per expert, as mergekit-moe computes them (its
documentation, checked black-box against ``mergekit-moe`` in tests/test_moe.py).

- ``hidden`` / ``hidden_last``: the base model (bfloat16) reads each expert's prompts (raw text, left
  padded with BOS); per layer, the residual stream entering the layer at the last position, averaged
  over the positive prompts, minus the same over the negative ones, normalised.
- ``hidden_avg``: the same with the mean over all positions (padding included, as mergekit does).
- ``cheap_embed``: the mean input embedding of all positive prompt tokens, normalised, minus that of the
  negative ones, normalised; normalised again; the same rows in every layer.
- ``random`` / ``uniform_random``: N(0, 1), or U(±1/√H), one ``(E, H)`` draw per layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def unit_rows(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=-1, keepdim=True)


def prompt_direction(positive: torch.Tensor, negative: torch.Tensor | None) -> torch.Tensor:
    """``mean(positive) - mean(negative)`` over the first dimension (in the states' dtype), normalised."""
    direction = positive.sum(dim=0) / positive.shape[0]
    if negative is not None:
        direction = direction - negative.sum(dim=0) / negative.shape[0]
    return direction / direction.norm()


def cheap_embed_row(embeddings: torch.Tensor, positive: Sequence[int], negative: Sequence[int]) -> torch.Tensor:
    """mergekit's ``cheap_embed``: pooled mean embeddings of the prompt tokens, each side normalised."""
    table = embeddings.float()
    pooled = table[list(positive)].mean(dim=0)
    direction = pooled / pooled.norm()
    if negative:
        against = table[list(negative)].mean(dim=0)
        direction = direction - against / against.norm()
    return direction / direction.norm()


def random_rows(
    layers: int, experts: int, hidden: int, generator: torch.Generator, uniform: bool
) -> list[torch.Tensor]:
    """One ``(experts, hidden)`` draw per layer, in layer order, from ``generator``."""
    if uniform:
        bound = hidden**-0.5
        return [torch.empty(experts, hidden).uniform_(-bound, bound, generator=generator) for _ in range(layers)]
    return [torch.randn(experts, hidden, generator=generator) for _ in range(layers)]
