"""LoRA on ``nn.Parameter``s (PEFT's ``target_parameters``, its ``ParamWrapper``): MoE experts' 3-D weights.

PEFT saves one ``lora_A`` (``E·r x in``) and one ``lora_B`` (``out x E·r``) per wrapped parameter, ``E`` the
number of experts (1 for a 2-D parameter); expert ``e``'s delta is ``s · B[:, e::E] @ A[e·r:(e+1)·r]``
(PEFT's ``ParamWrapper.get_delta_weight``: ``A`` reshaped to ``(E, r, in)``, ``B`` to ``(out, r, E)``). Several
parameters of one module nest: the wrapper of the parameter registered last is outermost, saved as
``<module>.lora_A.weight``; the next as ``<module>.base_layer.lora_A.weight``, and so on.

Each expert becomes its own ``LoraModule``, named ``<wrapper>[e]``, so every method merges per expert and no
kernel knows about experts; ``join_experts`` puts them back into PEFT's layout, every wrapper at one rank
(zero-padded: exact), so one ``r`` in the output config serves them all.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from loramerge.adapters.model import LoraModule
from loramerge.errors import BadInput
from loramerge.io.peft_config import lora_scale, module_rank_and_alpha

WRAPPER_LEVEL = ".base_layer"
_EXPERT = re.compile(r"^(?P<wrapper>.+)\[(?P<expert>\d+)\]$")


def expert_name(wrapper: str, expert: int) -> str:
    return f"{wrapper}[{expert}]"


def split_expert_name(name: str) -> tuple[str, int] | None:
    """``("<wrapper>", e)`` for an expert's module name, None for any other module."""
    match = _EXPERT.match(name)
    return (match["wrapper"], int(match["expert"])) if match else None


def unwrapped(wrapper: str) -> str:
    """The module a (possibly nested) wrapper wraps: ``experts.base_layer`` -> ``experts``."""
    while wrapper.endswith(WRAPPER_LEVEL):
        wrapper = wrapper.removesuffix(WRAPPER_LEVEL)
    return wrapper


def depth(wrapper: str) -> int:
    """0 for the outermost wrapper of a module, 1 for the one inside it, …"""
    return (len(wrapper) - len(unwrapped(wrapper))) // len(WRAPPER_LEVEL)


def candidate_parameters(module: str, config: Mapping[str, Any]) -> list[str]:
    """The parameter names of ``module`` that the config's ``target_parameters`` can match (PEFT's rule:
    ``<module>.<param>`` equals an entry or ends with ``.<entry>``)."""
    found = []
    for entry in config.get("target_parameters") or []:
        parameter = entry.rpartition(".")[2]
        key = f"{module}.{parameter}"
        if (key == entry or key.endswith("." + entry)) and parameter not in found:
            found.append(parameter)
    return found


def is_wrapper(name: str, config: Mapping[str, Any]) -> bool:
    """Whether a saved module is a wrapped parameter: a nested wrapper, or a module ``target_parameters`` can
    match that ``target_modules`` does not (PEFT refuses to do both to one module)."""
    if not config.get("target_parameters") or not candidate_parameters(unwrapped(name), config):
        return False
    if depth(name) > 0:
        return True
    from types import SimpleNamespace

    from peft.tuners.tuners_utils import check_target_module_exists  # PEFT's own matching of target_modules

    fields = ("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern",
              "target_parameters")  # fmt: skip
    matched = check_target_module_exists(SimpleNamespace(**{key: config.get(key) for key in fields}), name)
    return not (matched is True or isinstance(matched, re.Match))


def wrapper_ranks(rows: Mapping[str, int], config: Mapping[str, Any], source: str) -> dict[str, tuple[int, float]]:
    """Each wrapper's ``(r, alpha)``. Which parameter a nesting level holds is not in the file (it follows the
    model's registration order), so where ``rank_pattern``/``alpha_pattern`` give the parameters different
    values, the one assignment under which every level has the same number of experts (``rows / r``) decides."""
    result: dict[str, tuple[int, float]] = {}
    by_module: dict[str, list[str]] = {}
    for wrapper in rows:
        by_module.setdefault(unwrapped(wrapper), []).append(wrapper)
    for module, wrappers in sorted(by_module.items()):
        wrappers.sort(key=depth)
        parameters = candidate_parameters(module, config)
        if len(wrappers) > len(parameters):
            raise BadInput(
                f"adapter {source}: module {module} has {len(wrappers)} wrapped parameters but target_parameters "
                f"names {len(parameters)} of it ({', '.join(parameters)})"
            )
        settings = {p: module_rank_and_alpha(config, f"{module}.{p}") for p in parameters}
        if len(set(settings.values())) == 1:  # one setting for all: nothing to tell apart (expert_modules checks)
            result.update(dict.fromkeys(wrappers, settings[parameters[0]]))
            continue
        fits = {
            tuple(settings[p] for p in order)
            for order in itertools.permutations(parameters, len(wrappers))
            if all(rows[w] % settings[p][0] == 0 for w, p in zip(wrappers, order, strict=True))
            and len({rows[w] // settings[p][0] for w, p in zip(wrappers, order, strict=True)}) == 1
        }
        if len(fits) != 1:
            why = "no assignment fits their shapes" if not fits else "their nesting order cannot be read from the file"
            raise BadInput(
                f"adapter {source}: cannot tell the rank and alpha of each wrapped parameter of module {module} "
                f"({', '.join(parameters)}): {why}"
            )
        result.update(zip(wrappers, fits.pop(), strict=True))
    return result


def expert_modules(
    wrapper: str, parts: Mapping[str, torch.Tensor], rank: int, alpha: float, config: Mapping[str, Any], source: str
) -> dict[str, LoraModule]:
    """One ``LoraModule`` per expert of a wrapped parameter."""
    A, B = parts.get("lora_A.weight"), parts.get("lora_B.weight")
    if A is None or B is None or len(parts) != 2:
        raise BadInput(
            f"adapter {source}: module {wrapper} (a wrapped parameter) needs exactly one lora_A and one lora_B "
            "tensor (PEFT has no DoRA nor lora_bias on target_parameters)"
        )
    if A.dim() != 2 or B.dim() != 2 or not A.is_floating_point() or not B.is_floating_point():
        raise BadInput(f"adapter {source}: module {wrapper} needs 2-D float lora_A and lora_B tensors")
    if A.shape[0] != B.shape[1] or A.shape[0] % rank:
        raise BadInput(
            f"adapter {source}: module {wrapper} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; a wrapped "
            f"parameter of rank {rank} needs experts x {rank} rows in lora_A and as many columns in lora_B"
        )
    experts = A.shape[0] // rank
    scale = lora_scale(rank, alpha, bool(config.get("use_rslora")))
    per_expert_B = B.reshape(B.shape[0], rank, experts)
    return {
        expert_name(wrapper, e): LoraModule(A=A[e * rank : (e + 1) * rank], B=per_expert_B[:, :, e], scale=scale)
        for e in range(experts)
    }


def experts_by_wrapper(modules: Mapping[str, LoraModule]) -> dict[str, list[LoraModule]]:
    """Each wrapped parameter's experts, in expert order, by wrapper name (sorted)."""
    found: dict[str, dict[int, LoraModule]] = {}
    for name, module in modules.items():
        if (split := split_expert_name(name)) is not None:
            found.setdefault(split[0], {})[split[1]] = module
    return {wrapper: [group[e] for e in sorted(group)] for wrapper, group in sorted(found.items())}


def join_experts(modules: Mapping[str, LoraModule]) -> tuple[dict[str, LoraModule], int | None]:
    """The experts' modules put back into PEFT's layout, one per wrapper, every wrapper at the largest expert
    rank (zero rows and columns added: the deltas are unchanged), and that rank; other modules as they are.
    Every expert must carry scale 1 (a merge's output)."""
    plain = {name: module for name, module in modules.items() if split_expert_name(name) is None}
    experts = experts_by_wrapper(modules)
    if not experts:
        return plain, None
    rank = max(module.rank for group in experts.values() for module in group)
    for wrapper, ordered in experts.items():
        if any(module.scale != 1.0 for module in ordered):
            raise ValueError(f"module {wrapper}: experts must have scale 1 to be joined")
        A = torch.cat([_pad(module.A, rank, 0) for module in ordered])
        B = torch.stack([_pad(module.B, rank, 1) for module in ordered], dim=2)  # out x r x E
        plain[wrapper] = LoraModule(A=A, B=B.reshape(B.shape[0], -1), scale=1.0)
    return plain, rank


def _pad(tensor: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    missing = rank - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)


@dataclass(frozen=True)
class ParameterLayout:
    """Where a wrapper's experts land in the base: the checkpoint tensor ``<module>.<param>``, its shape in the
    model, and whether each expert's ``out x in`` delta goes in transposed (PEFT's ``ParamWrapper``: a 3-D
    parameter of a module with ``is_transposed`` is stored ``experts x in x out``)."""

    key: str
    shape: tuple[int, ...]
    transposed: bool


def parameter_layouts(
    model_config: Mapping[str, Any], adapter_config: Mapping[str, Any], wrappers: list[str], ref: str
) -> dict[str, ParameterLayout]:
    """The layout of each wrapper, read from the model class built on the meta device from ``model_config``
    (no weights): which parameter each nesting level holds follows the module's registration order, as PEFT
    nests them."""
    if not wrappers:
        return {}
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {key: value for key, value in model_config.items() if key != "quantization_config"}
    try:
        config = AutoConfig.for_model(fields.pop("model_type", ""), **fields)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError) as error:
        raise BadInput(f"base {ref}: cannot build its model class to place wrapped parameters ({error})") from None
    layouts = {}
    for wrapper in wrappers:
        module_name = unwrapped(wrapper)
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise BadInput(f"module {wrapper}: the base {ref} has no module {module_name}") from None
        wanted = candidate_parameters(module_name, adapter_config)
        matched = [(name, p) for name, p in module.named_parameters(recurse=False) if name in wanted]
        if depth(wrapper) >= len(matched):
            raise BadInput(f"module {wrapper}: the base {ref} has no such wrapped parameter of {module_name}")
        name, parameter = matched[len(matched) - 1 - depth(wrapper)]  # the last registered is outermost
        transposed = parameter.dim() == 3 and bool(getattr(module, "is_transposed", False))
        layouts[wrapper] = ParameterLayout(f"{module_name}.{name}", tuple(parameter.shape), transposed)
    return layouts


def experts_shape(experts: Sequence[LoraModule], layout: ParameterLayout) -> tuple[int, ...]:
    """The shape of the parameter a wrapper's experts fit."""
    rows, columns = experts[0].shape
    one = (columns, rows) if layout.transposed else (rows, columns)
    return (len(experts), *one) if len(layout.shape) == 3 else one


def expert_deltas(experts: Sequence[LoraModule], layout: ParameterLayout) -> torch.Tensor:
    """The dense delta of a wrapped parameter from its experts, in its own layout (float32): ``E x out x in``, or
    ``E x in x out`` where transposed; 2-D for a 2-D parameter."""
    deltas = torch.stack([module.delta().T if layout.transposed else module.delta() for module in experts])
    return deltas if len(layout.shape) == 3 else deltas[0]


def config_ranks(ranks: Mapping[str, int]) -> tuple[dict[str, int], int | None]:
    """A merge's module ranks as its config holds them: the plain modules' by name, and the one rank every
    wrapped parameter is written at (``join_experts``: the largest expert's), None without experts."""
    plain = {name: rank for name, rank in ranks.items() if split_expert_name(name) is None}
    experts = [rank for name, rank in ranks.items() if split_expert_name(name) is not None]
    return plain, max(experts, default=None)
