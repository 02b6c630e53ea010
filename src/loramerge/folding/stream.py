"""``loramerge fold``: stream a base checkpoint and add an adapter's deltas into its weights.

Never loads the whole model: one base tensor at a time is read (and dequantized, for bitsandbytes
4-bit bases), the delta ``s · B A`` added in float32, and the result written either dense or
re-quantized to 4-bit in the serialization ``transformers`` loads back.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from loramerge.adapters.model import LoraAdapter
from loramerge.adapters.options import DTYPES
from loramerge.adapters.param_targets import experts_by_wrapper, experts_shape, parameter_layouts
from loramerge.errors import BadInput
from loramerge.folding.math import FoldTarget, adapter_targets, folded_tensor, weight_shape
from loramerge.io import bnb4bit
from loramerge.io.atomic import check_output_target
from loramerge.io.checkpoint import Checkpoint, open_checkpoint
from loramerge.io.model_card import folded_model_card
from loramerge.io.output import output_folder
from loramerge.io.sizes import parse_size

Progress = Callable[[int, int, str], None]


def check_fold(adapter: LoraAdapter, base: Checkpoint, quantized: dict[str, list[str]]) -> dict[str, FoldTarget]:
    """Every adapter module must land on a base tensor of the right shape; returns key -> target."""
    wrappers = list(experts_by_wrapper(adapter.modules))
    targets = adapter_targets(adapter, parameter_layouts(base.config, adapter.config, wrappers, base.source))
    for key, target in targets.items():
        name = target.module or target.copy or target.bias or target.wrapper
        if key not in base.files:
            if target.bias is not None and target.module is None and target.copy is None:
                raise BadInput(
                    f"module {name}: the adapter has a lora_bias but the base {base.source} has no bias there "
                    f"({key}); the adapter is not for this base"
                )
            raise BadInput(f"module {name}: the base {base.source} has no tensor {key}")
        shape = bnb4bit.stored_shape(base, key, quantized)
        if target.module is not None:
            expected = weight_shape(adapter.modules[target.module], adapter.fan_in_fan_out)
        elif target.copy is not None:
            expected = tuple(adapter.dense[target.copy].shape)
        elif target.layout is not None:
            expected = experts_shape(target.experts, target.layout)
        else:
            expected = (adapter.modules[name].shape[0],)
        if expected != shape:
            raise BadInput(f"module {name}: the adapter needs a {expected} weight, the base has {shape}")
    return targets


def _float_dtype(base: Checkpoint, names: list[str], quantized: dict[str, list[str]]) -> torch.dtype:
    for name in names:
        if name not in quantized:
            dtype = base.layout(name)[1]
            if dtype.is_floating_point:
                return dtype
    return torch.float32


def fold(
    adapter: LoraAdapter,
    base_ref: str,
    output: str | Path,
    *,
    dtype: str | None = None,
    quantize: bnb4bit.QuantType | None = None,
    double_quant: bool = True,
    from_dequantized: bnb4bit.QuantType | None = None,
    shard_size: str | int | None = None,
    force: bool = False,
    progress: Progress | None = None,
    card_note: str = "",
) -> Path:
    """Write ``base + adapter`` as a full model: dense (``dtype``) or 4-bit (``quantize``).

    ``from_dequantized`` folds into the weights a 4-bit load of a full-precision base computes with (what a
    QLoRA adapter saw in training) instead of the original weights.
    """
    base = open_checkpoint(base_ref)
    names = base.names
    quantized = bnb4bit.quantized_weights(names)
    companions = {name for group in quantized.values() for name in group}
    targets = check_fold(adapter, base, quantized)
    out_dtype = DTYPES[dtype] if dtype else _float_dtype(base, names, quantized)
    # by default shards as large as the base's largest: the one shard held in memory costs no more than reading
    max_bytes = parse_size(shard_size) if shard_size else max(path.stat().st_size for path in set(base.files.values()))
    target = check_output_target(Path(output), force, [base.folder, *([adapter.path] if adapter.path else [])])
    written = [name for name in names if name not in companions]
    with output_folder(target, force=force) as folder:
        writer = folder.buffered_shards(max_bytes)
        for done, name in enumerate(written, start=1):
            tensor = bnb4bit.read_weight(base, name, quantized)
            if name not in quantized and from_dequantized and bnb4bit.quantizable(name, tuple(tensor.shape)):
                tensor = bnb4bit.round_trip(tensor, from_dequantized, double_quant)
            if name in targets:
                tensor = folded_tensor(adapter, targets[name], name, tensor.to(torch.float32))
            if quantize and (name in quantized or bnb4bit.quantizable(name, tuple(tensor.shape))):
                for key, value in bnb4bit.quantize(tensor, name, quantize, double_quant).items():
                    writer.write(key, value)
            else:
                writer.write(name, tensor.to(out_dtype) if tensor.is_floating_point() else tensor)
            if progress is not None:
                progress(done, len(written), name)
        writer.close()
        folder.side_files(base.folder)
        config = {key: value for key, value in base.config.items() if key != "quantization_config"}
        dtype_name = str(out_dtype).removeprefix("torch.")
        if quantize:
            config["quantization_config"] = bnb4bit.quantization_config(quantize, double_quant, dtype_name)
        folder.model_config(config, dtype=dtype_name)
        record = {"base": base_ref, "adapter": adapter.source or "merged", "dtype": dtype_name,
                  "quantize": quantize, "double_quant": double_quant if quantize else None,
                  "from_dequantized": from_dequantized}  # fmt: skip
        card_yaml = yaml.safe_dump({k: v for k, v in record.items() if v is not None}, sort_keys=False)
        folder.card(folded_model_card(base_ref, adapter, card_yaml, card_note))
    return target
