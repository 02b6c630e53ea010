"""The adapter types PEFT trains that change weights by a low-rank term, read into one ``LoraModule`` each.

One row per PEFT type: the tensor names it saves per module and how they become ``B``, ``A`` and a scale
(plus DoRA's magnitude and ``lora_bias``). LoHa and LoKr deltas become exact factors here
(``loramerge.lowrank.structured``), so no method, space or kernel knows they exist. Their convolution and
Tucker forms are refused by name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from loramerge.adapters.model import LoraModule
from loramerge.errors import BadInput
from loramerge.io.peft_config import lora_scale, module_rank_and_alpha
from loramerge.lowrank import LowRank
from loramerge.lowrank.structured import full_factors, hadamard_factors, kronecker_factors

Parts = dict[str, torch.Tensor]
VECTOR_PARTS = ("lora_magnitude_vector", "lora_magnitude_vector.weight", "lora_B.bias")  # one entry per output row
Builder = Callable[[str, Parts, Mapping[str, Any], str], LoraModule]


@dataclass(frozen=True)
class PeftType:
    """How one PEFT type saves a module: its tensor-name suffixes and the builder of its ``LoraModule``."""

    name: str
    parts: re.Pattern[str]  # ``<module>.<part>``; the part is the builder's key
    build: Builder
    computed: bool  # factors computed from products (in float32), not the stored tensors themselves


def _pattern(parts: list[str]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(part) for part in sorted(parts, key=len, reverse=True))
    return re.compile(rf"^(?P<module>.+)\.(?P<part>{alternatives})$")


def _two_d(name: str, source: str, parts: Parts, kind: str) -> None:
    for key, tensor in parts.items():
        if not tensor.is_floating_point():
            raise BadInput(f"adapter {source}: module {name} has a non-float tensor {key} ({tensor.dtype})")
        if tensor.dim() != 2 and key not in VECTOR_PARTS:
            raise BadInput(
                f"adapter {source}: module {name} has a {tensor.dim()}-D {key}; only {kind} on Linear and "
                "Embedding layers can be merged (convolutions are not supported)"
            )


def _vector(name: str, source: str, tensor: torch.Tensor | None, rows: int, what: str) -> torch.Tensor | None:
    if tensor is None:
        return None
    if tuple(tensor.shape) != (rows,):
        shape = tuple(tensor.shape)
        raise BadInput(f"adapter {source}: module {name} has a {what} of shape {shape}; expected ({rows},)")
    return tensor


def _build_lora(name: str, parts: Parts, config: Mapping[str, Any], source: str) -> LoraModule:
    embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    A = parts.get("lora_embedding_A" if embedding else "lora_A.weight")
    B = parts.get("lora_embedding_B" if embedding else "lora_B.weight")
    magnitude = parts.get("lora_magnitude_vector", parts.get("lora_magnitude_vector.weight"))
    bias = parts.get("lora_B.bias")
    if A is None or B is None or len(parts) != 2 + (magnitude is not None) + (bias is not None):
        raise BadInput(f"adapter {source}: module {name} needs exactly one lora_A and one lora_B tensor")
    _two_d(name, source, parts, "LoRA")
    if A.shape[0] != B.shape[1]:
        raise BadInput(f"adapter {source}: module {name} has lora_A rank {A.shape[0]} but lora_B rank {B.shape[1]}")
    rank, alpha = module_rank_and_alpha(config, name)
    if rank != A.shape[0]:
        raise BadInput(f"adapter {source}: module {name} has rank {A.shape[0]} but the config gives r={rank}")
    if bool(config.get("use_dora")) != (magnitude is not None):
        has = "has no lora_magnitude_vector" if magnitude is None else "has a lora_magnitude_vector"
        raise BadInput(f"adapter {source}: module {name} {has} but the config has use_dora={config.get('use_dora')}")
    if magnitude is not None and embedding:
        raise BadInput(f"adapter {source}: module {name} is a DoRA embedding; DoRA is merged on Linear layers only")
    if bias is not None and not config.get("lora_bias"):
        raise BadInput(f"adapter {source}: module {name} has a lora_B.bias but the config has lora_bias=false")
    return LoraModule(
        A=A,
        B=B,
        scale=lora_scale(rank, alpha, bool(config.get("use_rslora"))),
        embedding=embedding,
        magnitude=_vector(name, source, magnitude, B.shape[0], "lora_magnitude_vector"),
        bias=_vector(name, source, bias, B.shape[0], "lora_B.bias"),
    )


def _lycoris_scale(name: str, config: Mapping[str, Any]) -> float:
    rank, alpha = module_rank_and_alpha(config, name)
    return alpha / rank  # PEFT's LoHa and LoKr layers: ``scaling = alpha / r`` (no rsLoRA option)


def _refuse_tucker(name: str, source: str, parts: Parts, keys: tuple[str, ...], kind: str) -> None:
    found = [key for key in keys if key in parts]
    if found:
        raise BadInput(
            f"adapter {source}: module {name} is a {kind} with Tucker factors ({', '.join(found)}, from "
            "use_effective_conv2d on a convolution); only its Linear form can be merged"
        )


def _build_loha(name: str, parts: Parts, config: Mapping[str, Any], source: str) -> LoraModule:
    """``Δ = s (W1a W1b) ⊙ (W2a W2b)`` (PEFT's ``LoHaLayer``), as exact factors of rank r²."""
    _refuse_tucker(name, source, parts, ("hada_t1", "hada_t2"), "LoHa")
    needed = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    if sorted(parts) != sorted(needed):
        raise BadInput(f"adapter {source}: module {name} needs exactly {', '.join(needed)}")
    _two_d(name, source, parts, "LoHa")
    first = LowRank(parts["hada_w1_a"].to(torch.float32), parts["hada_w1_b"].to(torch.float32))
    second = LowRank(parts["hada_w2_a"].to(torch.float32), parts["hada_w2_b"].to(torch.float32))
    if first.B.shape[1] != first.A.shape[0] or second.B.shape[1] != second.A.shape[0]:
        raise BadInput(f"adapter {source}: module {name} has LoHa factors of mismatched rank")
    if first.B.shape[0] != second.B.shape[0] or first.A.shape[1] != second.A.shape[1]:
        raise BadInput(f"adapter {source}: module {name} has LoHa products of different shapes")
    factors = hadamard_factors(first, second)
    return LoraModule(A=factors.A, B=factors.B, scale=_lycoris_scale(name, config))


def _lokr_side(name: str, source: str, parts: Parts, side: str) -> LowRank:
    full = parts.get(f"lokr_{side}")
    pair = parts.get(f"lokr_{side}_a"), parts.get(f"lokr_{side}_b")
    halves = sum(p is not None for p in pair)
    if not ((full is not None and halves == 0) or (full is None and halves == 2)):
        raise BadInput(f"adapter {source}: module {name} needs either lokr_{side} or lokr_{side}_a and lokr_{side}_b")
    if full is not None:
        return full_factors(full.to(torch.float32))
    B, A = (p.to(torch.float32) for p in pair)
    if B.shape[1] != A.shape[0]:
        raise BadInput(f"adapter {source}: module {name} has lokr_{side}_a and lokr_{side}_b of mismatched rank")
    return LowRank(B, A)


def _build_lokr(name: str, parts: Parts, config: Mapping[str, Any], source: str) -> LoraModule:
    """``Δ = s kron(W1, W2)`` (PEFT's ``LoKrLayer``), each side full or a product: exact factors of rank
    ``rank(W1) · rank(W2)``."""
    _refuse_tucker(name, source, parts, ("lokr_t2",), "LoKr")
    _two_d(name, source, parts, "LoKr")
    sides = _lokr_side(name, source, parts, "w1"), _lokr_side(name, source, parts, "w2")
    factors = kronecker_factors(*sides)
    return LoraModule(A=factors.A, B=factors.B, scale=_lycoris_scale(name, config), kronecker=sides)


LORA_PARTS = ["lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_embedding_A", "lora_embedding_B",
              "lora_magnitude_vector", "lora_magnitude_vector.weight"]  # fmt: skip
TYPES = {
    "LORA": PeftType("LORA", _pattern(LORA_PARTS), _build_lora, computed=False),
    "LOHA": PeftType(
        "LOHA", _pattern(["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"]), _build_loha, True
    ),
    "LOKR": PeftType(
        "LOKR",
        _pattern(["lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"]),
        _build_lokr,
        True,
    ),
}


def peft_type(config: Mapping[str, Any]) -> PeftType:
    """The row of a validated config's ``peft_type``."""
    return TYPES[str(config.get("peft_type", "LORA")).upper()]
