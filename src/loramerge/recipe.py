"""YAML recipes (pydantic v2): a superset of mergekit's merge configuration, plus adapter-only recipes.

A recipe is only another way to spell CLI arguments: dense recipes run ``merge_checkpoints``, adapter
recipes ``merge_adapters``. Problems are reported with their YAML path (``slices[0].sources[1].model``).
"""

from __future__ import annotations

from difflib import get_close_matches
from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails

from loramerge.dtypes import DtypeName
from loramerge.errors import BadInput

Scalar = bool | int | float | str
ScalarOrGradient = Scalar | list[Scalar]
Dtype = DtypeName


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Conditional(Strict):
    """``{filter: self_attn, value: [0, 0.5, 1]}``: applies to tensors whose name contains ``filter``."""

    value: ScalarOrGradient
    filter: str | None = None


Setting = Conditional | list[Conditional] | ScalarOrGradient
Parameters = dict[str, Setting]


class ModelEntry(Strict):
    model: str
    parameters: Parameters | None = None


class SliceSource(Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None


class Slice(Strict):
    sources: list[SliceSource]
    base_model: str | None = None
    parameters: Parameters | None = None


class TokenizerSettings(Strict):
    """mergekit's ``tokenizer:`` block: the vocabulary of the output (per-token overrides are refused)."""

    source: str = "union"  # union, base, or a model of the recipe
    pad_to_multiple_of: int | None = Field(default=None, ge=1)
    tokens: dict[str, object] | None = None

    @model_validator(mode="after")
    def _no_overrides(self) -> TokenizerSettings:
        if self.tokens:
            raise ValueError("per-token overrides (tokenizer.tokens) are not supported; leave them out")
        return self


class AdapterEntry(Strict):
    adapter: str
    weight: float = 1.0
    calibration: str | None = None  # prompts the base is run on, for a method that merges with activations


class Output(Strict):
    """What to write: a PEFT adapter (adapter recipes' default), a full model (``dense``), or one kohya or diffusers
    LoRA file (single-file inputs' default: their own format)."""

    format: Literal["adapter", "dense", "kohya", "diffusers"] | None = None
    base: str | None = None  # the base an adapter recipe is folded into (default: the adapters' base model)


class Evaluate(Strict):
    """Judge the merge right after ``loramerge run``: base, each input adapter and the merge."""

    data: str | list[str]  # one evaluation file, or several (a table column each, named by file stem)
    text_field: str | None = None
    prompt_field: str | None = None
    completion_field: str | None = None
    max_samples: int | None = Field(default=None, ge=1)
    base: str | None = None  # default: the recipe's base model, or the adapters' base model


class Recipe(Strict):
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    adapters: list[AdapterEntry] | None = None
    parameters: Parameters | None = None
    dtype: Dtype | None = None
    out_dtype: Dtype | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None
    output: Output | None = None
    evaluate: Evaluate | None = None

    @model_validator(mode="after")
    def _one_input_kind(self) -> Recipe:
        given = [key for key in ("models", "slices", "adapters") if getattr(self, key)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of models, slices or adapters (got {', '.join(given) or 'none'})")
        if self.adapters and (self.tokenizer_source or self.tokenizer or self.chat_template):
            raise ValueError("adapter recipes take no tokenizer_source, tokenizer or chat_template")
        if self.tokenizer_source and self.tokenizer:
            raise ValueError("give tokenizer_source or a tokenizer block, not both")
        if not self.adapters and self.output and (self.output.format not in (None, "dense") or self.output.base):
            raise ValueError("a dense recipe writes a full model; use `loramerge extract` for an adapter of it")
        return self

    @property
    def folds_adapters(self) -> bool:
        return bool(self.adapters and self.output and self.output.format == "dense")

    @property
    def is_adapter_recipe(self) -> bool:
        return bool(self.adapters)


_UNION_LABELS = {"Conditional", "str", "int", "float", "bool"}


def _is_union_label(part: object) -> bool:
    """pydantic names the branch of a union it tried (``list[Conditional]``, ``int``): not part of the YAML path."""
    return isinstance(part, str) and (part in _UNION_LABELS or "[" in part)


def _model_in(annotation: object) -> type[BaseModel] | None:
    """The model a field holds, looking inside ``X | None``, ``list[X]``, ``dict[str, X]`` and unions."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, (_model_in(arg) for arg in get_args(annotation))), None)


def _walk(loc: tuple, model: type[BaseModel]) -> tuple[str, type[BaseModel] | None]:
    """The YAML path of pydantic's location, and the model found there (whose keys a typo is matched to)."""
    path, current = "", model
    for part in loc:
        if _is_union_label(part):
            continue
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        if current is not None and isinstance(part, str) and part in current.model_fields:
            current = _model_in(current.model_fields[part].annotation)
    return path, current


def _did_you_mean(key: str, model: type[BaseModel] | None) -> str:
    close = get_close_matches(key, list(model.model_fields) if model else [], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _wording(detail: ErrorDetails) -> str:
    """pydantic's message in our words: a validator's own sentence without pydantic's "Value error, ", and
    "must be …" with the value given instead of "Input should be …"."""
    if detail["type"] in ("value_error", "assertion_error"):
        return str(detail.get("ctx", {}).get("error", detail["msg"]))
    if detail["type"] == "missing":
        return "a required key is missing"
    text = detail["msg"].replace("Input should be", "must be").split(", unable to parse")[0]
    given = detail.get("input")
    return f"{text} (got {given!r})" if isinstance(given, (bool, int, float, str)) else text


def validation_problem(error: ValidationError, model: type[BaseModel]) -> str:
    """The first problem pydantic found in data for ``model``, as one line: the YAML path, then what is wrong.
    An unknown key is named first, with the key it was probably meant to be: a misspelt key otherwise
    shows up as the intended one "missing"."""
    details = error.errors()
    first = next((d for d in details if d["type"] == "extra_forbidden"), details[0])
    if first["type"] == "extra_forbidden":
        where, parent = _walk(first["loc"][:-1], model)
        key = str(first["loc"][-1])
        return f"{where + ': ' if where else ''}unknown key {key!r}{_did_you_mean(key, parent)}"
    where, _ = _walk(first["loc"], model)
    return f"{where + ': ' if where else ''}{_wording(first)}"


def parse_recipe(data: object, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise BadInput(f"{source}: a recipe is a YAML mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise BadInput(f"{source}: {validation_problem(error, Recipe)}") from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise BadInput(f"recipe {path}: cannot read ({error.strerror or error})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "malformed YAML"
        raise BadInput(f"recipe {path}: malformed YAML{where} ({problem})") from None
    return parse_recipe(data, f"recipe {path}")
