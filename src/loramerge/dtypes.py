"""The dtypes loramerge writes, named once: the spelling recipes, options and flags accept, and the torch
dtype each stands for (``torch_dtypes`` imports torch only when called)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch

DtypeName = Literal["float32", "float16", "bfloat16"]
DTYPE_NAMES: tuple[str, ...] = get_args(DtypeName)


def torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {name: getattr(torch, name) for name in DTYPE_NAMES}
