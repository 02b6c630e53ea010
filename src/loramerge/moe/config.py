"""mergekit-moe's config format (``base_model``, ``experts``, ``gate_mode`` …), validated."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loramerge.dtypes import DtypeName
from loramerge.errors import BadInput
from loramerge.recipe import validation_problem

GateMode = Literal["hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random"]


class Expert(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source_model: str  # a model, or ``model+adapter``: the adapter is folded in on the fly
    positive_prompts: list[str] = Field(default_factory=list)
    negative_prompts: list[str] = Field(default_factory=list)
    noise_scale: float | None = None


class MoeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str
    experts: list[Expert] = Field(min_length=1)
    gate_mode: GateMode = "hidden"
    experts_per_token: int = Field(default=2, ge=1)
    dtype: DtypeName | None = None
    architecture: Literal["mixtral"] | None = None
    noise_scale: float | None = None  # accepted at the top level and ignored, as mergekit does

    @model_validator(mode="after")
    def _consistent(self) -> MoeConfig:
        if self.experts_per_token > len(self.experts):
            raise ValueError(f"experts_per_token is {self.experts_per_token} but there are {len(self.experts)} experts")
        if self.gate_mode != "random":
            for i, expert in enumerate(self.experts):
                if not expert.positive_prompts:
                    raise ValueError(f"experts[{i}]: gate_mode {self.gate_mode} needs positive_prompts")
        return self


def load_moe_config(path: str | Path) -> MoeConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file") from None
    except yaml.YAMLError as error:
        raise BadInput(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    try:
        return MoeConfig.model_validate(data)
    except ValidationError as error:
        raise BadInput(f"{path}: {validation_problem(error, MoeConfig)}") from None
