"""``fold --format gguf``: an adapter folded into a GGUF base, written as a complete llama.cpp model.

The base file gives everything that is not a weight (architecture metadata, tokenizer, chat template) and the
tensor names; each tensor the adapter changes is dequantized, brought to transformers' row order, folded in
float32 exactly as the safetensors fold does (``loramerge.folding.math``), brought back and encoded in the
type asked for with ``gguf.quants``. Tensors it does not change are copied byte for byte where the type stays,
re-encoded otherwise. One tensor is in memory at a time: the file is written header first, then tensor by
tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from loramerge.adapters.model import LoraAdapter
from loramerge.errors import BadInput
from loramerge.folding.math import adapter_targets, folded_tensor, weight_shape
from loramerge.io.atomic import atomic_output_file
from loramerge.io.gguf_adapter import (
    WRITER_KEY,
    check_gguf_target,
    ggml_type,
    gguf_tensor_name,
    layout_of,
    llama_cpp_rows,
)

DENSE_GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
Progress = Callable[[int, int, str], None]


def _file_type(gguf_type: str):
    """``general.file_type`` of a model whose weights are ``gguf_type``."""
    import gguf

    files = gguf.LlamaFileType
    return {"f32": files.ALL_F32, "f16": files.MOSTLY_F16, "bf16": files.MOSTLY_BF16, "q8_0": files.MOSTLY_Q8_0,
            "q4_0": files.MOSTLY_Q4_0}[gguf_type]  # fmt: skip


def _gguf_targets(adapter: LoraAdapter, layout, tensors: dict) -> dict[str, tuple[str, object]]:
    """GGUF tensor name -> (the transformers key, what the adapter does to it); every target must exist."""
    if any("[" in name for name in adapter.modules):
        raise BadInput("per-expert modules (target_parameters) are not folded into GGUF bases")
    found = {}
    for key, target in adapter_targets(adapter).items():
        name = gguf_tensor_name(layout, key.removesuffix(".weight").removesuffix(".bias"))
        name = name.removesuffix(".weight") + ".bias" if name and key.endswith(".bias") else name
        if name is None or name not in tensors:
            raise BadInput(f"tensor {key}: the GGUF base has no tensor for it ({name or 'no llama.cpp name'})")
        if target.module is not None:
            module = adapter.modules[target.module]
            expected = weight_shape(module, adapter.fan_in_fan_out)
            shape = tuple(int(n) for n in reversed(tensors[name].shape))
            if expected != shape:
                raise BadInput(f"module {target.module}: the adapter needs a {expected} weight, the base has {shape}")
        found[name] = (key, target)
    return found


def _out_type(name: str, tensor, gguf_type: str):
    """The GGML type a tensor is written in: 1-D tensors (norms, biases) stay float32, as llama.cpp's converter
    keeps them; a weight whose rows a quantized type cannot cut into blocks is refused, not silently widened."""
    import gguf

    if len(tensor.shape) < 2:
        return gguf.GGMLQuantizationType.F32
    kind = ggml_type(gguf_type)
    block = gguf.GGML_QUANT_SIZES[kind][0]
    if int(tensor.shape[0]) % block:  # GGUF lists a tensor's row length first
        raise BadInput(f"tensor {name}: rows of {int(tensor.shape[0])} values are no multiple of {gguf_type}'s block "
                       f"of {block}; write the model as `gguf_type='f16'` (or bf16, f32)")  # fmt: skip
    return kind


def _copy_metadata(reader, writer, file_type) -> None:
    """The base's metadata, but for what the output decides itself (type, alignment, the writer's marks)."""
    import gguf

    skipped = ("general.architecture", "general.file_type", "general.alignment", WRITER_KEY)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in skipped:
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY and (len(field.types) != 2 or not field.data):
            raise BadInput(f"base metadata {key}: an empty or nested array, which the gguf package cannot write")
        sub = field.types[1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)
    if "general.alignment" in reader.fields:
        writer.add_custom_alignment(int(reader.fields["general.alignment"].contents()))
    writer.add_uint32("general.file_type", int(file_type))


def _fold_inputs(adapter: LoraAdapter, base_ref: str):
    """The GGUF base's reader, layout and, per tensor name, what the adapter does to it; refused before any work
    unless the base is one whole GGUF file with a tensor of the right shape for every module."""
    import gguf

    from loramerge.io.gguf import gguf_path, is_gguf_reference

    if not is_gguf_reference(base_ref):
        raise BadInput(f"base {base_ref}: a GGUF model is written from a GGUF base (its metadata and tokenizer); "
                       "for a model folder, llama.cpp's convert_hf_to_gguf.py converts the folded model")  # fmt: skip
    reader = gguf.GGUFReader(gguf_path(base_ref))
    if "split.count" in reader.fields and int(reader.fields["split.count"].contents()) > 1:
        raise BadInput(f"base {base_ref}: a GGUF split in several files; join its parts into one "
                       "file first (llama.cpp's gguf-split)")  # fmt: skip
    layout = layout_of(base_ref)
    return reader, layout, _gguf_targets(adapter, layout, {tensor.name: tensor for tensor in reader.tensors})


def check_gguf_fold(adapter: LoraAdapter, base_ref: str, gguf_type: str) -> None:
    """What folding ``adapter`` into the GGUF base in ``gguf_type`` needs, checked before any work."""
    reader, _, _ = _fold_inputs(adapter, base_ref)
    for tensor in reader.tensors:
        _out_type(tensor.name, tensor, gguf_type)


def fold_to_gguf(
    adapter: LoraAdapter,
    base_ref: str,
    output: str | Path,
    *,
    gguf_type: str = "f16",
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Write ``base + adapter`` as a llama.cpp model file (``output``, ``*.gguf``) in ``gguf_type``."""
    from importlib.metadata import version

    import gguf

    from loramerge.io.gguf import gguf_path

    if gguf_type not in DENSE_GGUF_TYPES:
        raise BadInput(
            f"`gguf_type` must be one of {', '.join(DENSE_GGUF_TYPES)}, got {gguf_type!r}", param="gguf_type"
        )
    reader, layout, targets = _fold_inputs(adapter, base_ref)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    target = check_gguf_target(Path(output), force, [Path(gguf_path(base_ref))])
    kinds = {name: _out_type(name, tensor, gguf_type) for name, tensor in tensors.items()}
    with atomic_output_file(target) as staging:
        writer = gguf.GGUFWriter(staging, layout.architecture)
        _copy_metadata(reader, writer, _file_type(gguf_type))
        writer.add_string(WRITER_KEY, version("loramerge"))
        for name, tensor in tensors.items():
            shape = [int(n) for n in reversed(tensor.shape)]  # numpy's order: rows, then columns
            kind = kinds[name]
            byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, kind)
            nbytes = int(np.prod(byte_shape))
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for done, (name, tensor) in enumerate(tensors.items(), start=1):
            writer.write_tensor_data(_tensor_bytes(adapter, layout, name, tensor, kinds[name], targets.get(name)))
            if progress is not None:
                progress(done, len(tensors), name)
        writer.close()
    return target


def _tensor_bytes(adapter, layout, name: str, tensor, kind, fold) -> np.ndarray:
    """One output tensor's bytes: the base tensor (with the adapter folded in, where ``fold`` says so) in ``kind``."""
    import gguf

    if fold is None and tensor.tensor_type == kind:
        return np.ascontiguousarray(tensor.data).view(np.uint8)
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    values = values.reshape([int(n) for n in reversed(tensor.shape)])
    if fold is not None:
        key, target = fold
        weight = torch.tensor(values, dtype=torch.float32)  # a copy: the base file is mapped read-only
        as_transformers = llama_cpp_rows(layout, name, weight, inverse=True)
        folded = folded_tensor(adapter, target, key, as_transformers)
        values = llama_cpp_rows(layout, name, folded).numpy()
    return np.ascontiguousarray(gguf.quants.quantize(values.astype(np.float32), kind)).view(np.uint8)
