"""Validated options of an adapter merge (the CLI flags, the Python keywords and recipes share them)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loramerge import catalogue
from loramerge.catalogue import DEFAULT_DENSITY, DEFAULT_METHOD, DEFAULT_SPACE
from loramerge.errors import BadInput
from loramerge.kernels import KERNELS, preset_params

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
Space = Literal["core", "full", "factors"]
Strategy = Literal["module", "concat", "core", "full", "factors"]


class MergeOptions(BaseModel):
    """How to merge. ``rank`` None means: exact for cat/linear, the largest input rank otherwise."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = DEFAULT_METHOD
    space: Space = DEFAULT_SPACE
    density: float | None = Field(default=None, gt=0.0, le=1.0)
    rank: int | None = Field(default=None, ge=1)
    majority_sign: Literal["total", "frequency"] = "total"
    preset: Literal["peft", "mergekit"] = "peft"
    seed: int = 0
    full_svd: Literal["auto", "exact", "randomized"] = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    strict: bool = False
    device: str = "cpu"

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if method not in catalogue.adapter_methods():
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(catalogue.adapter_methods())}")
        return method

    @property
    def kernel_params(self) -> dict[str, object]:
        params = preset_params(self.preset, KERNELS[self.method]) if self.method in KERNELS else {}
        params.update(density=self.effective_density, majority_sign=self.majority_sign)
        return params

    @property
    def effective_density(self) -> float:
        return DEFAULT_DENSITY if self.density is None else self.density

    @property
    def uses_density(self) -> bool:
        return self.method in KERNELS and "density" in KERNELS[self.method].params

    @property
    def elementwise(self) -> bool:
        """Whether the space matters: the kernel is not linear in its inputs (or factors were asked for)."""
        return self.method in KERNELS and (not KERNELS[self.method].linear or self.space == "factors")

    @property
    def strategy(self) -> Strategy:
        """How each module is computed: a module-level method on the factors (``svd``, ``cat``), the exact
        concatenation (linear kernels), or a kernel run in one of the three spaces."""
        if catalogue.get(self.method).level == "module":
            return "module"
        return self.space if self.elementwise else "concat"

    def torch_dtype(self) -> torch.dtype | None:
        return DTYPES[self.dtype] if self.dtype else None


def parse_options(**values: object) -> MergeOptions:
    """Build options from keywords, turning validation errors into one clear line."""
    try:
        return MergeOptions(**{key: value for key, value in values.items() if value is not None})
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "options"
        raise BadInput(f"{where}: {first['msg']} (got {first.get('input')!r})") from None
