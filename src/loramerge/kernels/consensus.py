"""Sign election and disjoint merge, the consensus steps of TIES-Merging."""

from __future__ import annotations

from typing import Literal

import torch

from loramerge.errors import BadInput

MajoritySign = Literal["total", "frequency"]
Divisor = Literal["count", "weight", "none"]


def broadcast_weights(weights: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
    """View ``weights[n]`` so that it multiplies ``tasks[n, ...]`` row by row."""
    return weights.reshape(weights.shape + (1,) * (tasks.dim() - 1)).to(tasks.dtype)


def elect_sign_mask(tasks: torch.Tensor, method: MajoritySign) -> torch.Tensor:
    """Mask of the entries whose sign agrees with the elected sign.

    TIES-Merging "elect" step (Yadav et al., NeurIPS 2023): ``total`` elects the sign of the sum of the
    values, ``frequency`` the sign held by most tasks. Ties go to +. Zeros never agree.
    """
    signs = tasks.sign()
    if method == "total":
        strength = tasks.sum(dim=0)
    elif method == "frequency":
        strength = signs.sum(dim=0)
    else:
        raise BadInput(f"unknown majority_sign {method!r}")
    elected = torch.where(strength >= 0, 1.0, -1.0).to(tasks.dtype)
    return signs == elected


def disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, divisor: Divisor) -> torch.Tensor:
    """Sum the agreeing entries and divide as the convention asks.

    TIES-Merging "disjoint merge" (Yadav et al., NeurIPS 2023). ``count`` divides by the number of
    agreeing tasks (the paper, PEFT); ``weight`` by the sum of their weights (mergekit ``normalize``);
    ``none`` keeps the sum.
    """
    merged = (weighted * mask).sum(dim=0)
    if divisor == "count":
        return merged / mask.sum(dim=0).clamp(min=1).to(merged.dtype)
    if divisor == "weight":
        total = (broadcast_weights(weights, weighted) * mask).sum(dim=0)
        return merged / torch.where(total.abs() < 1e-8, torch.ones_like(total), total)
    return merged


def elected_sign(voters: torch.Tensor, method: MajoritySign) -> torch.Tensor:
    """The elected sign per entry, +1 or -1 (ties go to +): of the sum of the values (``total``) or of the
    sign held by most tasks (``frequency``). TIES-Merging "elect" step (Yadav et al., NeurIPS 2023)."""
    if method == "total":
        strength = voters.sum(dim=0)
    elif method == "frequency":
        strength = voters.sign().sum(dim=0)
    else:
        raise BadInput(f"unknown majority_sign {method!r}")
    return strength.ge(0).to(voters.dtype).mul_(2).sub_(1)


def consensus_merge(
    sparse: torch.Tensor, weights: torch.Tensor, majority_sign: MajoritySign, weighted_vote: bool, divisor: Divisor
) -> torch.Tensor:
    """``disjoint_merge(w * sparse, elect_sign_mask(voters), …)`` in fewer passes and without boolean
    masks: ``(voter * elected).clamp(min=0)`` is ``|voter|`` where the voter agrees and 0 elsewhere, so
    sums of agreeing entries are sums of those magnitudes times the elected sign (exact: multiplying
    by ±1 commutes with rounding). Voters are the tasks (``weighted_vote`` False) or the weighted
    tasks. Used on every row block of a full-space or dense merge, where the pass count is the cost."""
    scale = broadcast_weights(weights, sparse)
    voters = sparse * scale if weighted_vote else sparse
    elected = elected_sign(voters, majority_sign)
    agreeing = (voters * elected).clamp_(min=0)
    merged = (agreeing.sum(dim=0) if weighted_vote else (agreeing * scale).sum(dim=0)).mul_(elected)
    if divisor == "none":
        return merged
    votes = agreeing.sign_()  # 1 where the entry agrees, 0 elsewhere
    if divisor == "count":
        return merged.div_(votes.sum(dim=0).clamp_(min=1))
    total = (votes * scale).sum(dim=0)
    return merged.div_(torch.where(total.abs() < 1e-8, torch.ones_like(total), total))
