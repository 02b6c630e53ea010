"""Validated options of an adapter merge (the CLI flags, the Python keywords and recipes share them)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loramerge import catalogue
from loramerge.catalogue import DEFAULT_DENSITY, DEFAULT_METHOD, DEFAULT_SPACE
from loramerge.devices import check_device
from loramerge.dtypes import DtypeName, torch_dtypes
from loramerge.errors import BadInput
from loramerge.kernels import preset_params
from loramerge.recipe import validation_problem

DTYPES = torch_dtypes()
Space = Literal["core", "full", "factors"]
Strategy = Literal["module", "concat", "core", "full", "factors"]


class MergeOptions(BaseModel):
    """How to merge. ``rank`` None means: exact (Σ r_i) for cat, linear and the whole-matrix methods,
    the largest input rank otherwise."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = DEFAULT_METHOD
    space: Space = DEFAULT_SPACE
    density: float | None = Field(default=None, gt=0.0, le=1.0)
    rank: int | None = Field(default=None, ge=1)
    majority_sign: Literal["total", "frequency"] | None = None  # None: the catalogue's
    preset: Literal["peft", "mergekit"] = "peft"
    seed: int = 0
    full_svd: Literal["auto", "exact", "randomized"] = "auto"
    dtype: DtypeName | None = None
    strict: bool = False
    device: str = "cpu"
    params: dict[str, float | str] = Field(default_factory=dict)  # the method's own parameters (alpha, keep, …)

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if method not in catalogue.adapter_methods():
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(catalogue.adapter_methods())}")
        return method

    @model_validator(mode="after")
    def _method_fits(self) -> MergeOptions:
        method = self.method_entry
        own = method.adapter_parameters - set(type(self).model_fields)
        checks = {parameter.name: parameter.check for parameter in method.parameters}
        for name, value in self.params.items():
            if name not in own:
                known = ", ".join(sorted(own)) or "none"
                raise ValueError(f"method {self.method} has no parameter {name!r} (its parameters: {known})")
            problem = checks[name](value) if checks[name] else None
            if problem:
                raise ValueError(f"method {self.method}: parameter {name}={value!r} {problem}")
        if "larv_tiers" in self.params and self.params.get("larv") != "tiered":
            raise ValueError(f"method {self.method}: parameter larv_tiers applies to larv=tiered only")
        if method.level == "matrix" and self.space == "factors":
            raise ValueError(f"method {self.method} needs whole matrices: use `space='core'` or `space='full'`")
        return self

    @property
    def method_entry(self) -> catalogue.Method:
        """The catalogue's entry of ``method``."""
        return catalogue.method(self.method)

    @property
    def kernel_params(self) -> dict[str, object]:
        """What the method's kernel is given: the preset's conventions, the density, the majority sign if
        given, the method's own parameters (the catalogue supplies the rest)."""
        method = self.method_entry
        params = preset_params(self.preset, method) if method.level != "module" else {}
        params["density"] = self.effective_density
        if self.majority_sign is not None:
            params["majority_sign"] = self.majority_sign
        params.update(self.params)
        return params

    @property
    def effective_density(self) -> float:
        if self.density is not None:
            return self.density
        own = self.method_entry.adapter_density  # della's density ± epsilon must stay in (0, 1)
        return DEFAULT_DENSITY if own is None else own

    @property
    def kernel_arguments(self) -> dict[str, object]:
        """Every parameter the method's function receives: the catalogue's defaults overridden by
        ``kernel_params`` (a module-level method is called with these)."""
        method = self.method_entry
        return {**method.kernel_defaults, **{k: v for k, v in self.kernel_params.items() if k in method.params}}

    @property
    def layer_scaled(self) -> bool:
        """Whether LARV scales each block's task vectors before the merge (it reads the base's weights)."""
        return self.params.get("larv", "none") != "none"

    @property
    def larv(self) -> tuple[str, tuple[float, float, float]]:
        """LARV's gate and its tiers (the catalogue's default where not given)."""
        tiers = self.params.get("larv_tiers", catalogue.LARV_DEFAULT_TIERS)
        return str(self.params.get("larv", "none")), catalogue.larv_tiers(tiers)

    @property
    def uses_density(self) -> bool:
        return "density" in self.method_entry.params

    @property
    def elementwise(self) -> bool:
        """Whether the space matters: the kernel is not linear in its inputs (or factors were asked for)."""
        method = self.method_entry
        return method.level != "module" and (not method.linear or self.space == "factors")

    @property
    def strategy(self) -> Strategy:
        """How each module is computed: a module-level method on the factors (``svd``, ``cat``), the exact
        concatenation (linear kernels), or a kernel run in one of the three spaces."""
        if self.method_entry.level == "module":
            return "module"
        return self.space if self.elementwise else "concat"

    def torch_dtype(self) -> torch.dtype | None:
        return DTYPES[self.dtype] if self.dtype else None


def parse_options(**values: object) -> MergeOptions:
    """Build options from keywords, turning validation errors into one clear line."""
    if isinstance(values.get("device"), str):
        check_device(values["device"])
    try:
        return MergeOptions(**{key: value for key, value in values.items() if value is not None})
    except ValidationError as error:
        raise BadInput(validation_problem(error, MergeOptions)) from None
