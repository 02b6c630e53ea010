"""bitsandbytes 4-bit weights (nf4 / fp4, with or without double quantization) in the serialization
``transformers`` writes and reads: ``W`` packed as uint8 plus ``W.absmax``, ``W.quant_map``,
``W.nested_absmax``, ``W.nested_quant_map`` and ``W.quant_state.bitsandbytes__<type>``.

bitsandbytes does the (de)quantization; this module only names the tensors. Imported lazily: the
rest of loramerge runs without bitsandbytes installed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

import torch

from loramerge.errors import BadInput

if TYPE_CHECKING:
    from loramerge.io.checkpoint import Checkpoint

QuantType = Literal["nf4", "fp4"]
STATE_MARK = ".quant_state.bitsandbytes__"
_AUX_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
BLOCKSIZE = 64


def _bnb_functional():
    try:
        import bitsandbytes.functional as functional
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise BadInput("4-bit weights need bitsandbytes: pip install bitsandbytes") from error
    return functional


def quantized_weights(names: Iterable[str]) -> dict[str, list[str]]:
    """Packed 4-bit weight name -> the names of its companion tensors (from the quant-state keys)."""
    names = set(names)
    found: dict[str, list[str]] = {}
    for name in names:
        if STATE_MARK in name:
            weight = name.split(STATE_MARK)[0]
            found[weight] = [name] + [weight + suffix for suffix in _AUX_SUFFIXES if weight + suffix in names]
    return found


def stored_shape(checkpoint: Checkpoint, name: str, quantized: dict[str, list[str]]) -> tuple[int, ...]:
    """The shape of a weight as the model uses it: from its quant state where it is packed 4-bit."""
    if name not in quantized:
        return checkpoint.layout(name)[0]
    state = next(companion for companion in quantized[name] if STATE_MARK in companion)
    return tuple(json.loads(bytes(checkpoint.get(state).tolist()))["shape"])


def read_weight(checkpoint: Checkpoint, name: str, quantized: dict[str, list[str]]) -> torch.Tensor:
    """A tensor as stored, or, where it is packed 4-bit, the float32 weight it stands for."""
    tensor = checkpoint.get(name)
    if name not in quantized:
        return tensor
    return dequantize(tensor, {companion: checkpoint.get(companion) for companion in quantized[name]}, name)


def dequantize(weight: torch.Tensor, companions: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The float32 weight a packed 4-bit tensor stands for."""
    functional = _bnb_functional()
    state_dict = {key.removeprefix(name + "."): tensor for key, tensor in companions.items()}
    try:
        state = functional.QuantState.from_dict(state_dict, device=weight.device)
        return functional.dequantize_4bit(weight, state).to(torch.float32)
    except Exception as error:  # bitsandbytes raises plain exceptions on malformed states
        raise BadInput(f"tensor {name}: cannot dequantize its 4-bit state ({error})") from error


def quantize(weight: torch.Tensor, name: str, quant_type: QuantType, double_quant: bool) -> dict[str, torch.Tensor]:
    """``name`` and its companions, quantized as transformers saves a ``Linear4bit`` weight."""
    functional = _bnb_functional()
    packed, state = functional.quantize_4bit(
        weight.to(torch.float32).contiguous(), blocksize=BLOCKSIZE, quant_type=quant_type,
        compress_statistics=double_quant,
    )  # fmt: skip
    tensors = {name: packed}
    tensors.update({f"{name}.{key}": value for key, value in state.as_dict(packed=True).items()})
    return tensors


def round_trip(weight: torch.Tensor, quant_type: QuantType, double_quant: bool) -> torch.Tensor:
    """What a 4-bit load of ``weight`` computes with: quantized, then dequantized (QLoRA's view)."""
    functional = _bnb_functional()
    packed, state = functional.quantize_4bit(
        weight.to(torch.float32).contiguous(), blocksize=BLOCKSIZE, quant_type=quant_type,
        compress_statistics=double_quant,
    )  # fmt: skip
    return functional.dequantize_4bit(packed, state).to(torch.float32)


def quantization_config(quant_type: QuantType, double_quant: bool, compute_dtype: str) -> dict[str, object]:
    """The ``quantization_config`` block of ``config.json`` that makes transformers load it back."""
    return {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": compute_dtype, "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }  # fmt: skip


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """The weights transformers quantizes: the 2-D weights of the decoder layers' linear modules
    (embeddings, norms and the output head stay in full precision)."""
    from loramerge.io.layers import layer_index

    return name.endswith(".weight") and len(shape) == 2 and layer_index(name) is not None
