"""The settings of ``finetune``, in a module of their own so that the CLI takes its defaults from here
without importing the training stack (transformers, datasets, PEFT) when it starts."""

from __future__ import annotations

from dataclasses import dataclass

from loramerge.errors import BadInput


@dataclass(frozen=True)
class FinetuneOptions:
    steps: int = 100
    # chosen by benchmarks/finetune_lr.py (table in docs/finetune.md): the best mean held-out exact match on
    # the demo among 1e-4 … 1e-3; from 5e-4 up, held-out arithmetic falls 10-12 points below it
    learning_rate: float = 3e-4
    batch_size: int = 16
    seed: int = 0
    warmup_ratio: float = 0.1  # of the steps, given to transformers as a step count (its fraction form is 5.x only)
    load_in_4bit: bool = False
    device: str = "cpu"
    rank: int | None = None  # truncate every module to at most this rank first (default: keep the ranks)
    dtype: str | None = None  # float32 | float16 | bfloat16 of the written adapter (default: the input adapter's)

    def __post_init__(self) -> None:
        from loramerge.adapters.options import DTYPES  # pydantic and the catalogue: only when options are built

        if self.steps < 1 or self.batch_size < 1 or not self.learning_rate > 0:
            raise BadInput("`steps`, `batch_size` and `learning_rate` must be positive")
        if self.rank is not None and self.rank < 1:
            raise BadInput(f"`rank` must be positive, got {self.rank}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise BadInput(f"`dtype` must be float32, float16 or bfloat16, got {self.dtype!r}")
