"""Evaluation: data files, models to score, and loss / exact match / generation."""

from loramerge.evaluate.data import Sample, load_samples
from loramerge.evaluate.exact_match import (
    EvalResult,
    Role,
    evaluate,
    generate_text,
    greedy_batch,
    greedy_completion,
    match_from_scores,
    score_batch,
)
from loramerge.evaluate.models import load_model

__all__ = [
    "EvalResult",
    "Role",
    "Sample",
    "evaluate",
    "generate_text",
    "greedy_batch",
    "greedy_completion",
    "load_model",
    "load_samples",
    "match_from_scores",
    "score_batch",
]
