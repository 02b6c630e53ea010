"""Planner and executor for merging LoRA adapters module by module in low-rank space (docs/algebra.md)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from loramerge.adapters.checks import (
    check_base_models,
    check_layouts,
    check_parameter_targets,
    check_shapes,
    check_weights,
)
from loramerge.adapters.dora import (
    BaseReader,
    BaseWeights,
    base_products,
    combined_row_scale,
    dora_module,
    own_terms,
    with_row_scales,
)
from loramerge.adapters.layer_scales import larv_scales, numbered_blocks
from loramerge.adapters.model import LoraAdapter, LoraModule
from loramerge.adapters.options import MergeOptions, parse_options
from loramerge.adapters.param_targets import config_ranks
from loramerge.catalogue import Method
from loramerge.errors import BadInput
from loramerge.io.model_card import MergeRecord, merged_adapter_card
from loramerge.io.peft_config import merged_lora_config
from loramerge.io.portable_base import portable_base
from loramerge.io.sizes import human_bytes
from loramerge.kernels import run_by_row_blocks, run_kernel, runs_by_rows
from loramerge.kernels.methods import weighted_sum
from loramerge.lowrank import (
    LowRank,
    concat,
    core_basis,
    from_core,
    project_to_core,
    truncate_dense,
    truncate_dense_randomized,
    truncate_rank,
    use_randomized,
)
from loramerge.lowrank.structured import Basis, kronecker_core
from loramerge.seeding import tensor_generators, tensor_seed
from loramerge.threads import module_threads

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ModulePlan:
    name: str
    shape: tuple[int, int]
    embedding: bool
    inputs: tuple[int, ...]  # positions of the adapters that hold the module; the others contribute zero
    input_ranks: tuple[int, ...]
    output_rank: int


@dataclass
class MergePlan:
    adapters: list[LoraAdapter]
    weights: list[float]
    options: MergeOptions
    modules: list[ModulePlan]
    dense: dict[str, tuple[int, ...]]
    out_dtype: torch.dtype
    warnings: list[str] = field(default_factory=list)
    base: BaseReader | None = None  # the base's weights, read once per module where DoRA or LARV needs them
    # per adapter, its modules' input Gram matrices on its calibration prompts (RegMean), by module name
    grams: list[Mapping[str, torch.Tensor]] | None = None
    calibration: list[str] | None = None  # the files of prompts ``grams`` were taken on, per adapter
    # LARV's scale of every module's task vectors (``larv`` option), computed when the plan runs
    layer_scales: dict[str, float] | None = None

    @property
    def dora(self) -> bool:
        """Whether the output is a DoRA adapter (any input is)."""
        return any(adapter.needs_base for adapter in self.adapters)

    @property
    def output_parameters(self) -> int:
        vectors = sum(m.shape[0] for m in self.modules) * (self.dora + self.bias)
        lora = sum(m.output_rank * sum(m.shape) for m in self.modules) + vectors
        return lora + sum(self.adapters[idx[0]].dense[name].numel() for name, idx in self.dense.items())

    @property
    def bias(self) -> bool:
        """Whether the output carries ``lora_bias`` (any input does)."""
        return any(adapter.config.get("lora_bias") for adapter in self.adapters)

    @property
    def output_bytes(self) -> int:
        return self.output_parameters * torch.finfo(self.out_dtype).bits // 8

    def describe(self) -> str:
        """One line: inputs, method and parameters, output ranks, dtype and size (nothing is read)."""
        return (
            f"{self.describe_merge()}, {str(self.out_dtype).removeprefix('torch.')}, {human_bytes(self.output_bytes)}"
        )

    def describe_merge(self) -> str:
        """Inputs, method and parameters, output ranks: what the merge does, whatever it is written as."""
        options = self.options
        ranks = sorted({m.output_rank for m in self.modules})
        parts = [f"method={options.method}"]
        if options.strategy not in ("concat", "module"):
            parts.append(f"space={options.space}")
        if options.strategy == "full":
            parts.append(f"full_svd={options.full_svd}")
        if options.uses_density:
            parts.append(f"density={options.effective_density:g}")
        if options.method_entry.consensus:
            parts.append(f"majority_sign={options.kernel_arguments.get('majority_sign')}")
        parts += [f"{name}={value}" for name, value in sorted(options.params.items())]
        parts += [f"weights={','.join(f'{w:g}' for w in self.weights)}", f"seed={options.seed}"]
        kinds = sorted({adapter.kind for adapter in self.adapters})
        inputs = _count(len(self.adapters), "adapter") + (f" ({', '.join(kinds)})" if kinds != ["LoRA"] else "")
        output = f", a DoRA adapter (row norms of {self.base.ref})" if self.dora and self.base else ""
        return f"{inputs}, {_count(len(self.modules), 'module')}, {' '.join(parts)}, output ranks {ranks}{output}"

    def record(self) -> MergeRecord:
        """What this merge does, for its model card: the inputs and parameters as a recipe would hold them."""
        inputs = [(adapter.name, weight) for adapter, weight in zip(self.adapters, self.weights, strict=True)]
        options = self.options.model_dump(exclude_defaults=False, exclude={"device", "strict"})
        entries = [{"adapter": name, "weight": weight} for name, weight in inputs]
        for entry, file in zip(entries, self.calibration or [None] * len(entries), strict=True):
            if file is not None:
                entry["calibration"] = file
        parameters = {
            "adapters": entries,
            **{key: value for key, value in options.items() if value is not None and value != {}},
        }
        if self.options.method_entry.consensus and "majority_sign" in self.options.kernel_arguments:
            parameters["majority_sign"] = self.options.kernel_arguments["majority_sign"]  # the catalogue's default
        ranks = sorted({m.output_rank for m in self.modules})
        return MergeRecord(self.options.method, inputs, len(self.modules), ranks, parameters)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def output_rank(options: MergeOptions, shape: tuple[int, int], ranks: Sequence[int]) -> int:
    """The rank a module's merge produces; the executor checks it gets exactly this."""
    bound, total = min(shape), sum(ranks)
    strategy = options.strategy
    exact = strategy == "concat" or (strategy == "module" and options.method_entry.exact_rank)
    if exact or strategy == "factors":  # exact rank unless --rank asks for less
        produced = total if exact else ranks[0]
        return produced if options.rank is None or options.rank >= produced else min(options.rank, bound)
    keeps_rank = options.method_entry.exact_rank  # iso_c, tsv_m, knots: up to Σ r_i
    requested = options.rank or (total if keeps_rank else max(ranks))
    return min(requested, bound) if strategy == "full" else min(requested, total, bound)


def _plan_modules(adapters: Sequence[LoraAdapter], options: MergeOptions) -> list[ModulePlan]:
    names = sorted({name for adapter in adapters for name in adapter.modules})
    plans = []
    for name in names:
        inputs = tuple(i for i, adapter in enumerate(adapters) if name in adapter.modules)
        first = adapters[inputs[0]].modules[name]
        ranks = tuple(adapters[i].modules[name].rank for i in inputs)
        if options.strategy == "factors" and len(set(ranks)) > 1:
            raise BadInput(
                f"module {name}: `space='factors'` needs equal ranks, got {list(ranks)}; "
                "use `space='core'` or `space='full'`"
            )
        rank = output_rank(options, first.shape, ranks)
        plans.append(ModulePlan(name, first.shape, first.embedding, inputs, ranks, rank))
    return plans


def _lone_adapter_warning(count: int, options: MergeOptions) -> list[str]:
    """A merge of one adapter is a copy for the linear methods; the others still transform it, which a user
    merging one adapter (to convert its dtype, say) would not expect."""
    effect = options.method_entry.lone
    if count != 1 or effect is None or (options.uses_density and options.effective_density == 1):
        return []
    return [f"one adapter: {options.method} {effect}, so the output differs from the input; "
            "use `method='linear'` to copy it"]  # fmt: skip


def _plan_warnings(options: MergeOptions, count: int) -> list[str]:
    given = options.model_fields_set
    notes = _lone_adapter_warning(count, options)
    if "density" in given and not options.uses_density:
        notes.append(f"`density` is ignored by method {options.method}")
    if "space" in given and options.strategy in ("concat", "module"):
        module = options.strategy == "module"
        why = "it works on the factors themselves" if module else "its result is exact in any space"
        notes.append(f"`space` is ignored by method {options.method} ({why})")
    return notes


def plan_merge(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float] | None = None,
    options: MergeOptions | None = None,
    base: str | BaseReader | None = None,
    grams: Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> MergePlan:
    """Check the inputs and decide every module's output rank; no tensor math yet. ``base`` (a model loramerge
    reads) is needed where an input is DoRA (its row norms come from the base's weights) and by ``larv`` (its
    diagnostics). ``grams`` (one mapping per adapter: module name -> the mean Gram matrix of its inputs,
    ``loramerge.evaluate.activations``) is needed by the methods that merge with activations (RegMean)."""
    if not adapters:
        raise BadInput("give at least one adapter to merge")
    options = options or MergeOptions()
    weights = check_weights(adapters, [1.0] * len(adapters) if weights is None else weights)
    check_parameter_targets(adapters)  # before the shapes: wrappers nest by the set of wrapped parameters
    check_shapes(adapters)
    check_layouts(adapters)
    warnings = check_base_models(adapters, options.strict) + _plan_warnings(options, len(adapters))
    dense = {
        name: tuple(i for i, adapter in enumerate(adapters) if name in adapter.dense)
        for name in sorted({name for adapter in adapters for name in adapter.dense})
    }
    out_dtype = options.torch_dtype() or _common_dtype(adapters)
    modules = _plan_modules(adapters, options)
    _check_rank(options, modules)
    plan = MergePlan(list(adapters), weights, options, modules, dense, out_dtype, warnings)
    embedding = next((module.name for module in modules if module.embedding), None)
    if plan.bias and embedding is not None:
        raise BadInput(
            f"module {embedding}: an embedding LoRA cannot be part of a lora_bias output (PEFT refuses lora_bias on "
            "embeddings); merge the lora_bias adapters and the embedding ones separately"
        )
    if options.layer_scaled:
        plan.base = _larv_base(plan, base)
    elif plan.dora:
        plan.base = _dora_base(plan, base)
    if options.method_entry.calibrated:
        _check_calibrated(plan)
        if grams is not None:
            with_grams(plan, grams)
    return plan


def _check_calibrated(plan: MergePlan) -> None:
    """What a method that merges with activations refuses, before any activation is taken."""
    method = plan.options.method
    if plan.dora:
        raise BadInput(f"method {method} merges LoRA directions, not DoRA's normalised ones; merge DoRA adapters "
                       "with another method")  # fmt: skip
    if any(weight < 0 for weight in plan.weights):
        raise BadInput(f"method {method} weighs each adapter's inputs: its weights must not be negative")
    embedded = next((module.name for module in plan.modules if module.embedding), None)
    if embedded:
        raise BadInput(f"module {embedded}: method {method} merges linear layers, not an embedding")


def with_grams(
    plan: MergePlan, grams: Sequence[Mapping[str, torch.Tensor]], files: Sequence[str] | None = None
) -> MergePlan:
    """Give a plan the adapters' input Gram matrices (``loramerge.calibration_grams``: every adapter's, for every
    module any adapter adapts), checked against every module; ``files``, the prompts they were taken on, are
    recorded in the model card."""
    method = plan.options.method
    if len(grams) != len(plan.adapters):
        raise BadInput(f"method {method}: {len(grams)} calibration sets for {len(plan.adapters)} adapters; give one "
                       "per adapter, in the adapters' order")  # fmt: skip
    for module in plan.modules:
        for i, adapter in enumerate(plan.adapters):
            gram = grams[i].get(module.name)
            if gram is None or tuple(gram.shape) != (module.shape[1],) * 2:
                found = "none" if gram is None else f"a {tuple(gram.shape)} one"
                raise BadInput(f"module {module.name}: needs a {module.shape[1]} x {module.shape[1]} input Gram "
                               f"matrix for adapter {adapter.name}, got {found}")  # fmt: skip
    if files is not None and len(files) != len(grams):
        raise BadInput(f"method {method}: {len(files)} calibration files for {len(grams)} calibration sets")
    plan.grams = list(grams)
    plan.calibration = [str(file) for file in files] if files is not None else None  # as the adapters are named
    return plan


def _dora_base(plan: MergePlan, base: str | BaseReader | None) -> BaseReader:
    """The base of a DoRA merge, checked against every module before any work."""
    first = next(adapter for adapter in plan.adapters if adapter.needs_base)
    if base is None:
        raise BadInput(
            f"adapter {first.name} is a DoRA adapter: merging it needs the base model's weights (its row norms); "
            "give the base model (`base`)"
        )
    if plan.bias:
        other = next(adapter for adapter in plan.adapters if adapter.config.get("lora_bias"))
        raise BadInput(
            f"adapters {first.name} (DoRA) and {other.name} (lora_bias) cannot merge into one adapter: PEFT "
            "refuses DoRA with lora_bias; merge them into separate adapters"
        )
    _refuse_embeddings(plan, "an embedding LoRA cannot be part of a DoRA output")
    return _checked_base(plan, base, first.fan_in_fan_out)


def _larv_base(plan: MergePlan, base: str | BaseReader | None) -> BaseReader:
    """The base LARV's diagnostics read, checked against every module before any work."""
    gate, _ = plan.options.larv
    if plan.dora:
        raise BadInput(f"larv={gate} scales LoRA updates, not DoRA's normalised directions; merge DoRA adapters "
                       "without it")  # fmt: skip
    _refuse_embeddings(plan, f"larv={gate} scales linear layers, not an embedding")
    blocks = numbered_blocks(module.name for module in plan.modules)
    if len(blocks) < 2:
        raise BadInput(f"larv={gate} scales each block of a layer stack (model.layers.N) by its depth: the adapters' "
                       f"modules lie in {len(blocks)} numbered block(s)")  # fmt: skip
    if base is None:
        raise BadInput(f"larv={gate} compares each module's update with the base model's weight: give the base "
                       "model (`base`)")  # fmt: skip
    return _checked_base(plan, base, plan.adapters[0].fan_in_fan_out)


def _refuse_embeddings(plan: MergePlan, why: str) -> None:
    embedded = next((module.name for module in plan.modules if module.embedding), None)
    if embedded:
        raise BadInput(f"module {embedded}: {why}")


def _checked_base(plan: MergePlan, base: str | BaseReader, fan_in_fan_out: bool) -> BaseReader:
    """A reader of the base's weights whose every module has the adapters' shape."""
    reader = BaseWeights(base, fan_in_fan_out) if isinstance(base, str) else base
    for module in plan.modules:
        shape = reader.shape(module.name)
        if shape != module.shape:
            raise BadInput(
                f"module {module.name}: the base {reader.ref} has a {shape} weight, the adapters' delta is "
                f"{module.shape}; is this the adapters' base?"
            )
    return reader


def _check_rank(options: MergeOptions, modules: list[ModulePlan]) -> None:
    """A ``--rank`` no module can reach is a typo, not a request; smaller modules cap it silently."""
    if options.rank is None or not modules:
        return
    widest = max(modules, key=lambda m: min(m.shape))
    if options.rank > min(widest.shape):
        raise BadInput(
            f"`rank={options.rank}` is larger than any module allows: at most {min(widest.shape)} "
            f"(module {widest.name}, {widest.shape[0]}x{widest.shape[1]})"
        )


def _common_dtype(adapters: Sequence[LoraAdapter]) -> torch.dtype:
    dtypes = {adapter.dtype for adapter in adapters}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _factor_space(plan: MergePlan, module: ModulePlan, pieces: list[LoraModule], weights: list[float]) -> LowRank:
    """PEFT's ``add_weighted_adapter``: the kernel on the A's and on the B's with ``sqrt(|w s|)``."""
    options = plan.options
    method = options.method_entry
    coefficients = [w * piece.scale for w, piece in zip(weights, pieces, strict=True)]
    roots = torch.tensor([math.sqrt(abs(c)) for c in coefficients])
    signed = torch.tensor([math.copysign(math.sqrt(abs(c)), c) for c in coefficients])
    device = options.device

    def factor(piece: LoraModule, side: str) -> torch.Tensor:
        tensor = getattr(piece, side).to(device, torch.float32)
        if side == "B" and piece.row_scale is not None:  # DoRA's direction term: diag(g) s B A
            tensor = piece.row_scale.to(device, torch.float32).unsqueeze(1) * tensor
        return tensor

    def merged(side: str, root_weights: torch.Tensor) -> torch.Tensor:
        tensors = torch.stack([factor(piece, side) for piece in pieces])
        gens = tensor_generators(options.seed, f"{module.name}.lora_{side}", module.inputs, device)
        return run_kernel(method, tensors, root_weights.to(device), options.kernel_params, gens)

    return LowRank(B=merged("B", roots), A=merged("A", signed))


def merge_full_space(
    method: Method,
    terms: Sequence[LowRank],
    weights: torch.Tensor,
    params: dict[str, object],
    generators: Sequence[torch.Generator] | None,
) -> torch.Tensor:
    """The kernel on the dense deltas ``B_i A_i`` (the ``full`` space). A piecewise kernel runs on row
    blocks of the deltas, each made from its rows of ``B``: the blocks stay in cache, and no more than
    one whole delta is dense at a time (to find its cutoff), instead of all of them at once."""
    if not runs_by_rows(method, params):
        return run_kernel(method, torch.stack([term.dense() for term in terms]), weights, params, generators)
    rows, columns = terms[0].B.shape[0], terms[0].A.shape[1]
    buffers: list[torch.Tensor] = []

    def tasks_of(block: slice) -> torch.Tensor:
        if not buffers:
            buffers.append(torch.empty(len(terms), block.stop - block.start, columns, device=terms[0].B.device))
        tasks = buffers[0][:, : block.stop - block.start]
        for task, term in zip(tasks, terms, strict=True):
            torch.matmul(term.B[block], term.A, out=task)
        return tasks

    merged = torch.empty(rows, columns, device=terms[0].B.device)
    return run_by_row_blocks(method, tasks_of, weights, params, (term.dense() for term in terms), merged)


def _core_space(
    plan: MergePlan, pieces: Sequence[LoraModule], terms: Sequence[LowRank]
) -> tuple[Basis, torch.Tensor, Basis]:
    """The shared bases ``U``, ``V`` and the stacked cores ``Uᵀ B_i A_i V`` (Core Space merging): from the
    Kronecker sides where every input is LoKr with one split, the method does not depend on the basis and
    that basis is at most twice as wide as the summed ranks (its cores stay small), else by QR of the stacked
    factors."""
    if plan.options.method_entry.any_basis and all(
        piece.kronecker is not None and piece.row_scale is None for piece in pieces
    ):
        device = plan.options.device
        pairs = [tuple(LowRank(side.B.to(device), side.A.to(device)) for side in piece.kronecker) for piece in pieces]
        shapes = {tuple((side.B.shape[0], side.A.shape[1]) for side in pair) for pair in pairs}
        if len(shapes) == 1:  # one Kronecker split for all (PEFT's factorization of the same module)
            found = kronecker_core(pairs, [piece.scale for piece in pieces], 2 * sum(term.rank for term in terms))
            if found is not None:
                return found
    U, V = core_basis(terms)
    return U, torch.stack([project_to_core(term, U, V) for term in terms]), V


def module_weights(plan: MergePlan, module: ModulePlan) -> list[float]:
    """The weights of the module's inputs, times LARV's scale of its block where the plan has one."""
    scale = plan.layer_scales.get(module.name, 1.0) if plan.layer_scales else 1.0
    return [plan.weights[i] * scale for i in module.inputs]


def merge_module(plan: MergePlan, module: ModulePlan, pieces: Sequence[LoraModule] | None = None) -> LowRank:
    """One module's merged ``B @ A`` (float32, scale folded in), as the options ask; ``pieces`` replace the
    inputs' modules (DoRA modules with their row scales set)."""
    options = plan.options
    pieces = list(pieces) if pieces is not None else [plan.adapters[i].modules[module.name] for i in module.inputs]
    weights = module_weights(plan, module)
    terms = [piece.factors(device=options.device) for piece in pieces]
    rank = module.output_rank
    strategy = options.strategy
    if strategy == "module":
        result = options.method_entry.fn(terms, weights, rank=rank, **options.kernel_arguments,
                                         **_activation_arguments(plan, module))  # fmt: skip
    elif strategy in ("concat", "factors"):
        result = concat(terms, weights) if strategy == "concat" else _factor_space(plan, module, pieces, weights)
        if options.rank is not None and options.rank < result.rank:
            result = truncate_rank(result, options.rank)
    else:
        method = options.method_entry
        weight_tensor = torch.tensor(weights, device=options.device)
        gens = tensor_generators(options.seed, f"{module.name}/{strategy}", module.inputs, options.device)
        if strategy == "core":
            U, cores, V = _core_space(plan, pieces, terms)
            result = from_core(U, run_kernel(method, cores, weight_tensor, options.kernel_params, gens), V, rank)
        else:
            merged = merge_full_space(method, terms, weight_tensor, options.kernel_params, gens)
            if use_randomized(options.full_svd, module.shape, rank):
                result = truncate_dense_randomized(merged, rank, tensor_seed(options.seed, f"{module.name}/svd", 0))
            else:
                result = truncate_dense(merged, rank)
    if result.rank != module.output_rank:
        raise AssertionError(f"module {module.name}: planned rank {module.output_rank}, got {result.rank}")
    return result


def _activation_arguments(plan: MergePlan, module: ModulePlan) -> dict[str, object]:
    """A method that merges with activations gets the Gram matrices of the module's inputs (``grams``) and the
    weights and Gram matrices of the adapters without it (``absent``)."""
    if not plan.options.method_entry.calibrated:
        return {}
    if plan.grams is None:
        raise BadInput(f"method {plan.options.method} merges with each adapter's activations: give the base model "
                       "and one calibration file of prompts per adapter (`calibration`)")  # fmt: skip
    absent = [(plan.weights[j], plan.grams[j][module.name]) for j in range(len(plan.adapters))
              if j not in module.inputs]  # fmt: skip
    return {"grams": [plan.grams[i][module.name] for i in module.inputs], "absent": absent}


def merged_module(plan: MergePlan, module: ModulePlan) -> LoraModule:
    """One module of the output: the merged factors, DoRA's magnitude (the base's row scalings combined with
    the merge's weights, ``loramerge.adapters.dora``) and ``lora_bias`` (summed with the same weights)."""
    pieces = [plan.adapters[i].modules[module.name] for i in module.inputs]
    weights = module_weights(plan, module)  # lora_bias is part of the task vector LARV scales
    if not plan.dora:
        merged = merge_module(plan, module, pieces)
        result = LoraModule(A=merged.A, B=merged.B, scale=1.0, embedding=module.embedding)
    else:
        assert plan.base is not None
        weight = plan.base.weight(module.name).to(plan.options.device)
        terms = own_terms(pieces, weight.device)
        products = base_products(weight, terms)  # the one pass over the base weight the norms need
        pieces = with_row_scales(pieces, terms, products)
        direction = merge_module(plan, module, pieces)
        row_scale = combined_row_scale(pieces, weights, module.shape[0]).to(weight.device)
        result = dora_module(direction, row_scale, weight, products)
    if plan.bias:
        bias = torch.zeros(module.shape[0])
        for piece, weight_i in zip(pieces, weights, strict=True):
            if piece.bias is not None:
                bias += weight_i * piece.bias_delta().cpu()
        result = replace(result, bias=bias)
    return result


def _to_dtype(module: LoraModule, dtype: torch.dtype) -> LoraModule:
    def cast(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to("cpu", dtype)

    return replace(module, A=cast(module.A), B=cast(module.B), magnitude=cast(module.magnitude), bias=cast(module.bias))


def merge_dense(plan: MergePlan, name: str) -> torch.Tensor:
    """``modules_to_save`` copies: kept when identical, else their weighted mean (they are weights, not deltas)."""
    indices = plan.dense[name]
    tensors = [plan.adapters[i].dense[name] for i in indices]
    if all(torch.equal(tensors[0], other) for other in tensors[1:]):
        return tensors[0]
    weights = torch.tensor([plan.weights[i] for i in indices])
    if weights.sum().abs() > 1e-12:
        weights = weights / weights.sum()
    return weighted_sum(torch.stack([t.to(torch.float32) for t in tensors]), weights, normalize=False).to(
        tensors[0].dtype
    )


def _larv_scales(plan: MergePlan, progress: Progress | None) -> dict[str, float]:
    """LARV's scale of each module, from its weighted sum of the adapters' updates and the base's weight."""
    assert plan.base is not None
    options = plan.options

    def updates() -> Iterator[tuple[str, LowRank]]:
        for module in plan.modules:
            terms = [plan.adapters[i].modules[module.name].factors(device=options.device) for i in module.inputs]
            yield module.name, concat(terms, [plan.weights[i] for i in module.inputs])

    return larv_scales(updates(), len(plan.modules), plan.base, *options.larv, progress)


def execute_plan(plan: MergePlan, progress: Progress | None = None) -> LoraAdapter:
    """Run a plan: every module in low-rank space, every carried dense tensor, the config and card."""
    if plan.options.layer_scaled and plan.layer_scales is None:
        plan.layer_scales = _larv_scales(plan, progress)
    modules: dict[str, LoraModule] = {}
    for done, module in enumerate(plan.modules, start=1):
        try:
            # a DoRA module reads and multiplies its out x in base weight: dense work, like the full space's
            strategy = "full" if plan.dora else plan.options.strategy
            with module_threads(strategy, module.shape, module.input_ranks, plan.options.device):
                modules[module.name] = _to_dtype(merged_module(plan, module), plan.out_dtype)
        except BadInput as error:  # a kernel refusing its parameters (della's density ± epsilon, say)
            raise BadInput(f"module {module.name}: {error}") from None
        if progress is not None:
            progress(done, len(plan.modules), module.name)
    dense = {name: merge_dense(plan, name).to(plan.out_dtype) for name in plan.dense}
    configs = [adapter.config for adapter in plan.adapters]
    named = next((a for a in plan.adapters if a.base_ref), None)  # the base and its local reference: one input's
    base_model, local_base = portable_base(named.base_model if named else None)
    local_base = local_base or (named.local_base if named else None)
    to_save = {m for config in configs for m in (config.get("modules_to_save") or [])}
    ranks, parameter_rank = config_ranks({m.name: m.output_rank for m in plan.modules})
    config = merged_lora_config(configs, ranks, base_model, sorted(to_save), plan.dora, plan.bias, parameter_rank)
    merged = LoraAdapter(modules=modules, config=config, dense=dense, source="merged", local_base=local_base)
    merged.card = merged_adapter_card(plan.record(), base_model)
    return merged


def merge_adapters(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float] | None = None,
    method: str | None = None,
    *,
    base: str | None = None,
    grams: Sequence[Mapping[str, torch.Tensor]] | None = None,
    progress: Progress | None = None,
    **params: object,
) -> LoraAdapter:
    """Merge adapters of one base model; ``params`` are the ``MergeOptions`` fields (density, rank, space…).
    ``method`` defaults to ``loramerge.catalogue.DEFAULT_METHOD``; ``base`` (a model folder, Hub id, GGUF file or
    4-bit checkpoint) is needed where an input is DoRA and by ``params={"larv": ...}``; ``grams``
    (``loramerge.calibration_grams``) by RegMean."""
    options = parse_options(method=method, **params)
    return execute_plan(plan_merge(adapters, weights, options, base, grams), progress)
