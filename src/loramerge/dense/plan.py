"""Planner for merging dense checkpoints: one entry per output tensor, with its inputs and parameters.

Follows mergekit's rules so its users get its numbers: ``models:`` become one slice over every layer
(the base is added as a source when missing), layer tensors take ``t = idx / (n - 1)`` within their
slice (``t = 1`` for a one-layer slice), non-layer tensors ``t = 0`` and the sources of the first
(embeddings) or last (final norm, head) slice; model-level parameters beat slice-level, then global.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from loramerge import catalogue
from loramerge.adapters.options import DTYPES
from loramerge.catalogue import Inputs, Method, dense_methods
from loramerge.dense.parameters import resolve
from loramerge.dense.sources import ModelSource, open_source
from loramerge.dense.vocabulary import Vocabulary, build_vocabulary, read_tokenizer
from loramerge.errors import BadInput
from loramerge.io.layers import count_layers, is_post_layer, is_vocabulary_tensor, layer_group, layer_index, with_layer
from loramerge.io.model_card import DenseRecord
from loramerge.kernels.methods import ZERO_SUM
from loramerge.kernels.registry import mergekit_params
from loramerge.recipe import Parameters, Recipe


def on_deltas(method: Method, base: str | None) -> bool:
    """Whether the method merges task vectors (model minus base) rather than the models' own tensors."""
    return method.inputs == Inputs.TASK_VECTORS or (method.inputs == Inputs.EITHER and base is not None)


def _parameter_defaults(method: Method) -> dict[str, object]:
    return {parameter.name: parameter.default for parameter in method.parameters}


_CONVENTIONS = ("elect_on", "majority_sign")


def _summary(params: list[dict]) -> str:
    keys = sorted({key for p in params for key in p})
    parts = []
    for key in keys:
        values = [p.get(key) for p in params]
        shown = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in values]
        parts.append(f"{key}={shown[0]}" if len(set(shown)) == 1 else f"{key}={shown[0]}…{shown[-1]}")
    return " ".join(parts)


@dataclass(frozen=True)
class Source:
    """One input of a slice: a model, its layer range and its own parameters."""

    ref: str
    layers: tuple[int, int]
    parameters: Parameters | None
    where: str  # YAML path, for errors


@dataclass(frozen=True)
class SliceInputs:
    """One output slice: its sources, the base of its task vectors, its own parameters."""

    sources: list[Source]
    base: str | None
    parameters: Parameters | None

    def scopes(self, recipe: Recipe, source: Source | None = None) -> list[Parameters | None]:
        """Parameter settings by precedence: the source's own, the slice's, the recipe's."""
        own = [source.parameters] if source is not None else []
        return [*own, self.parameters, recipe.parameters]


@dataclass
class TensorPlan:
    output: str
    inputs: list[tuple[str, str]]  # (model ref, tensor name) of the merged inputs, base excluded
    base: tuple[str, str] | None
    per_input: list[dict[str, object]]
    shared: dict[str, object]
    t: float
    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32  # of the output tensor

    @property
    def numel(self) -> int:
        """Entries of the output tensor."""
        return math.prod(self.shape)


@dataclass
class CheckpointPlan:
    recipe: Recipe
    method: Method
    sources: dict[str, ModelSource]
    tensors: list[TensorPlan]
    base: str | None
    reference: str  # the model whose config, tokenizer and tensor names the output follows
    output_layers: int
    warnings: list[str] = field(default_factory=list)
    allow_nonfinite: bool = False  # else a NaN or Inf in any input tensor stops the merge, naming it
    vocabulary: Vocabulary | None = None  # tokenizer_source union/base/model: vocabulary rows aligned by token

    def describe(self) -> list[str]:
        """One line per tensor group (layer index as ``*``): count, inputs, parameters over the layers."""
        groups: dict[str, list] = defaultdict(list)
        for tensor in self.tensors:
            groups[layer_group(tensor.output)].append(tensor)
        lines = [f"plan: {self.method.name}, {self.output_layers} layers, {len(self.tensors)} tensors"]
        for group, tensors in groups.items():
            shared = _summary([{k: v for k, v in t.shared.items() if k not in _CONVENTIONS} for t in tensors])
            per_input = "; ".join(
                f"{ref}: {_summary([t.per_input[i] for t in tensors]) or '-'}"
                for i, (ref, _) in enumerate(tensors[0].inputs)
            )
            lines.append(f"  {group} x{len(tensors)}  [{shared}]  {per_input}")
        return lines

    @property
    def output_bytes(self) -> int:
        """The output's size, from the planned shapes and dtypes (no tensor is read)."""
        return sum(math.prod(tensor.shape) * tensor.dtype.itemsize for tensor in self.tensors)

    def record(self, recipe_yaml: str) -> DenseRecord:
        """What this merge does, for its model card."""
        return DenseRecord(self.method.name, self.base, list(self.sources), self.output_layers, len(self.tensors),
                           recipe_yaml)  # fmt: skip


def _open_sources(recipe: Recipe, allow_nonfinite: bool) -> dict[str, ModelSource]:
    refs: dict[str, str] = {}
    if recipe.base_model:
        refs.setdefault(recipe.base_model, "base_model")
    for i, entry in enumerate(recipe.models or []):
        refs.setdefault(entry.model, f"models[{i}].model")
    for i, piece in enumerate(recipe.slices or []):
        if piece.base_model:
            refs.setdefault(piece.base_model, f"slices[{i}].base_model")
        for j, source in enumerate(piece.sources):
            refs.setdefault(source.model, f"slices[{i}].sources[{j}].model")
    opened = {}
    for ref, where in refs.items():
        try:
            opened[ref] = open_source(ref, allow_nonfinite)
        except BadInput as error:
            raise BadInput(f"{where}: {error}") from None
    return opened


def _layers_of(source: ModelSource) -> int:
    return source.checkpoint.num_layers or count_layers(source.names)


def _slices(recipe: Recipe, sources: dict[str, ModelSource]) -> list[SliceInputs]:
    if recipe.models:
        listed = [Source(e.model, (0, _layers_of(sources[e.model])), e.parameters, f"models[{i}]")
                  for i, e in enumerate(recipe.models)]  # fmt: skip
        if recipe.base_model and recipe.base_model not in {s.ref for s in listed}:
            listed.append(Source(recipe.base_model, (0, _layers_of(sources[recipe.base_model])), None, "base_model"))
        return [SliceInputs(listed, recipe.base_model, None)]
    result = []
    for i, piece in enumerate(recipe.slices or []):
        listed = []
        for j, source in enumerate(piece.sources):
            where = f"slices[{i}].sources[{j}]"
            start, end = source.layer_range
            available = _layers_of(sources[source.model])
            if not 0 <= start < end <= available:
                raise BadInput(
                    f"{where}.layer_range: {[start, end]} is out of bounds; {source.model} has {available} layers"
                )
            listed.append(Source(source.model, (start, end), source.parameters, where))
        lengths = {s.layers[1] - s.layers[0] for s in listed}
        if len(lengths) > 1:
            raise BadInput(f"slices[{i}].sources: every source needs the same number of layers, got {sorted(lengths)}")
        result.append(SliceInputs(listed, piece.base_model or recipe.base_model, piece.parameters))
    return result


def _check_method(recipe: Recipe, method: Method, slices) -> None:
    unknown_where = [("parameters", recipe.parameters)]
    for i, entry in enumerate(recipe.models or []):
        unknown_where.append((f"models[{i}].parameters", entry.parameters))
    for i, piece in enumerate(recipe.slices or []):
        unknown_where.append((f"slices[{i}].parameters", piece.parameters))
        unknown_where += [(f"slices[{i}].sources[{j}].parameters", s.parameters) for j, s in enumerate(piece.sources)]
    allowed = method.recipe_parameters
    for where, params in unknown_where:
        for key in params or {}:
            if key not in allowed:
                known = ", ".join(sorted(allowed))
                raise BadInput(f"{where}.{key}: unknown parameter for {method.name} (known: {known})")
    for i, piece in enumerate(slices):
        where = "models" if recipe.models else f"slices[{i}]"
        refs, base = [s.ref for s in piece.sources], piece.base
        needs_base = method.inputs in (Inputs.TASK_VECTORS, Inputs.BASE_AND_MODEL)
        if needs_base and not base:
            raise BadInput(f"base_model: merge_method {method.name} needs a base_model")
        if needs_base and base not in refs and recipe.slices:
            raise BadInput(f"{where}.sources: the base_model {base} must be one of the sources")
        inputs = len(refs) - (1 if on_deltas(method, base) and base in refs else 0)
        if inputs < method.min_inputs or (method.max_inputs is not None and inputs > method.max_inputs):
            most = method.max_inputs if method.max_inputs is not None else "any"
            raise BadInput(f"{where}: {method.name} takes {method.min_inputs} to {most} inputs, got {inputs}")


def _kernel_params(method: Method, shared: dict[str, object]) -> dict[str, object]:
    """mergekit's parameters as kernel parameters (the ``mergekit`` preset)."""
    params = mergekit_params(method, shared.get("normalize"), shared.get("rescale"))
    if "t" in shared:
        params["t"] = float(shared["t"])
    return params


def _check_fractions(output: str, ref: str, params: dict[str, object]) -> None:
    """``density`` is the fraction of entries kept: outside (0, 1] it means nothing."""
    density = params.get("density")
    if density is not None and not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise BadInput(f"tensor {output}: density of {ref} is {density!r}; it must be in (0, 1]")


def _check_weights(output: str, weights: list[object], divides_by_sum: bool) -> None:
    """All-zero weights merge to nothing; a normalising sum of zero would divide by zero (NaN out)."""
    given = [float(w) for w in weights if isinstance(w, (int, float))]
    if not given or len(given) != len(weights):
        return
    if all(w == 0 for w in given):
        raise BadInput(f"tensor {output}: the weights are all zero ({given}); the merge would be empty")
    if divides_by_sum and abs(sum(given)) < ZERO_SUM:
        raise BadInput(f"tensor {output}: the weights {given} sum to zero, so normalize: true cannot divide by it")


def _plan_tensor(
    output: str, name_for: Callable[[Source], str], piece: SliceInputs, recipe: Recipe, t: float, method: Method
) -> TensorPlan:
    shared = {}
    defaults = _parameter_defaults(method)
    for key in sorted(name for name in method.recipe_parameters if name not in method.per_input_parameters):
        value = resolve(key, piece.scopes(recipe), output, t, defaults[key])
        if value is not None:
            shared[key] = value
    required = {parameter.name for parameter in method.parameters if parameter.required}
    for key in sorted(required - set(shared) - set(method.per_input_parameters)):
        raise BadInput(f"tensor {output}: {method.name} needs parameter {key}")
    base = piece.base
    deltas = on_deltas(method, base)
    inputs, per_input = [], []
    base_input = None
    for source in piece.sources:
        name = name_for(source)
        if deltas and source.ref == base:
            base_input = (source.ref, name)
            continue
        own = {key: resolve(key, piece.scopes(recipe, source), name, t, defaults[key])
               for key in method.per_input_parameters}  # fmt: skip
        for key in sorted(required & {k for k, v in own.items() if v is None}):
            raise BadInput(f"{source.where}: {method.name} needs parameter {key} for model {source.ref}")
        inputs.append((source.ref, name))
        per_input.append(own)
    if deltas and base_input is None:
        base_input = (base, name_for(Source(base, piece.sources[0].layers, None, "base_model")))
    for (ref, _), params in zip(inputs, per_input, strict=True):
        _check_fractions(output, ref, params)
    divides_by_sum = bool(shared.get("normalize")) and not method.consensus  # consensus divides per entry
    _check_weights(output, [params.get("weight") for params in per_input], divides_by_sum)
    # slerp: t = 0 is the base; nearswap, arcee_fusion: the base and the other model
    if method.inputs == Inputs.BASE_AND_MODEL:
        order = sorted(range(len(inputs)), key=lambda i: inputs[i][0] != base)
        inputs, per_input = [inputs[i] for i in order], [per_input[i] for i in order]
    return TensorPlan(output, inputs, base_input, per_input, {**shared, **_kernel_params(method, shared)}, t)


def plan_checkpoint_merge(recipe: Recipe, allow_nonfinite: bool = False) -> CheckpointPlan:
    """Check a dense recipe and list every output tensor with its inputs and resolved parameters."""
    if recipe.merge_method not in dense_methods():
        raise BadInput(f"merge_method: unknown method {recipe.merge_method!r}; known: {', '.join(dense_methods())}")
    method = catalogue.method(recipe.merge_method)
    sources = _open_sources(recipe, allow_nonfinite)
    slices = _slices(recipe, sources)
    _check_method(recipe, method, slices)
    reference = slices[0].base or slices[0].sources[0].ref
    non_layer = [n for n in sources[reference].names if layer_index(n) is None]
    # embeddings and the like come from the first slice's sources, the final norm and head from the last's
    tensors = [
        _plan_tensor(n, lambda s, n=n: n, slices[0], recipe, 0.0, method) for n in non_layer if not is_post_layer(n)
    ]
    out_layer = 0
    for piece in slices:
        first = piece.sources[0]
        template = [n for n in sources[first.ref].names if layer_index(n) == first.layers[0]]
        count = first.layers[1] - first.layers[0]
        for offset in range(count):
            t = offset / (count - 1) if count > 1 else 1.0  # mergekit's rule, one-layer slices included
            for name in template:
                in_layer = lambda s, n=name, o=offset: with_layer(n, s.layers[0] + o)  # noqa: E731
                tensors.append(_plan_tensor(with_layer(name, out_layer), in_layer, piece, recipe, t, method))
            out_layer += 1
    tensors += [
        _plan_tensor(n, lambda s, n=n: n, slices[-1], recipe, 0.0, method) for n in non_layer if is_post_layer(n)
    ]
    vocabulary = _vocabulary(recipe, sources, reference)
    _set_layouts(recipe, sources, reference, tensors, vocabulary)
    return CheckpointPlan(recipe, method, sources, tensors, recipe.base_model, reference, out_layer,
                          allow_nonfinite=allow_nonfinite, vocabulary=vocabulary)  # fmt: skip


def _vocabulary(recipe: Recipe, sources: dict[str, ModelSource], reference: str) -> Vocabulary | None:
    """mergekit's vocabulary alignment, when the recipe asks for it: ``union`` always; ``base`` or a model
    of the recipe when every model has a tokenizer.json (else the core's rows are kept, as before)."""
    settings = recipe.tokenizer
    choice = settings.source if settings else recipe.tokenizer_source
    if choice is None or (choice not in ("union", "base") and choice not in sources):
        return None  # the reference's tokenizer (or a folder's) is copied, vocabulary rows cut to its size
    lacking = any(not (source.checkpoint.folder / "tokenizer.json").is_file() for source in sources.values())
    if choice != "union" and settings is None and lacking:
        return None
    core = choice if choice in sources else reference
    tokenizers = {ref: read_tokenizer(ref, source.checkpoint.folder) for ref, source in sources.items()}
    return build_vocabulary(tokenizers, core, choice == "union", settings.pad_to_multiple_of if settings else None)


def _set_layouts(
    recipe: Recipe,
    sources: dict[str, ModelSource],
    reference: str,
    tensors: list[TensorPlan],
    vocabulary: Vocabulary | None,
) -> None:
    """Output shape and dtype of every tensor, from file headers only: vocabulary tensors take the
    aligned vocabulary's rows, else the reference model's; the dtype is ``out_dtype``, else ``dtype``,
    else the inputs'."""
    chosen = recipe.out_dtype or recipe.dtype
    for tensor in tensors:
        ref, name = tensor.base or tensor.inputs[0]
        shape, dtype = sources[ref].checkpoint.layout(name)
        if vocabulary is not None and is_vocabulary_tensor(tensor.output):
            shape = (vocabulary.padded_size, *shape[1:])
        elif is_vocabulary_tensor(tensor.output) and tensor.output in sources[reference].checkpoint.files:
            rows = sources[reference].checkpoint.layout(tensor.output)[0][0]
            shape = (min(rows, shape[0]), *shape[1:])
        tensor.shape, tensor.dtype = shape, DTYPES[chosen] if chosen else dtype
