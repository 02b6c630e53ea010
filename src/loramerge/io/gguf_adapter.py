"""A LoRA adapter as llama.cpp reads one: a GGUF file of ``general.type = adapter``, ``adapter.type = lora``,
one ``adapter.lora.alpha`` for the file, and for each adapted weight of the base its ``.lora_a`` (r x in) and
``.lora_b`` (out x r) under the base's GGUF tensor name (``blk.0.attn_q.weight.lora_a``), named by the ``gguf``
package's tensor map for the architecture.

llama.cpp scales each module by ``alpha / r`` with ``r`` read from the module's own tensors, so a module's own
scale (rsLoRA, rank or alpha patterns, mixed ranks after a merge) is folded into its ``lora_b``: every delta is
exact. The query and key rows of llama-architecture models are stored permuted for llama.cpp's rotary
embedding (as its converter permutes the base weights), so their ``lora_b`` rows are permuted the same way.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from loramerge.errors import BadInput
from loramerge.io.atomic import atomic_output_file, check_output_file

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # what llama.cpp's own LoRA converter writes
WRITER_KEY = "loramerge.version"  # marks a file loramerge wrote (``force`` replaces no other)
# architectures whose layout is known here; the value says whether q/k rows are permuted (llama.cpp's
# converter permutes them for the rotary embedding of these, and not for the NeoX-style others)
ARCHITECTURES: Mapping[str, bool] = {
    "llama": True,
    "qwen2": False,
    "qwen3": False,
    "gemma": False,
    "gemma2": False,
    "gemma3": False,
}
HF_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
                  "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}  # fmt: skip


@dataclass(frozen=True)
class GgufLayout:
    """What naming and laying out a base's tensors for llama.cpp needs."""

    architecture: str
    blocks: int
    heads: int
    kv_heads: int
    tensors: frozenset[str] | None = None  # a GGUF base's tensor names (None: a model folder's, not listed)
    tied: bool = False  # no separate output weight (tied word embeddings)

    @property
    def permutes_query_key(self) -> bool:
        return ARCHITECTURES[self.architecture]


@dataclass
class GgufAdapterReport:
    """What ``write_gguf_adapter`` wrote and left out."""

    modules: int
    alpha: float
    dropped: list[str] = field(default_factory=list)  # modules llama.cpp's adapters cannot hold
    widened: list[str] = field(default_factory=list)  # tensors q8_0 cannot hold (rows not a multiple of 32): f16


def _checked_architecture(architecture: str, where: str) -> str:
    if architecture not in ARCHITECTURES:
        known = ", ".join(ARCHITECTURES)
        raise BadInput(f"{where}: llama.cpp adapters are written for {known} bases here, not {architecture!r}")
    return architecture


def layout_of(base: str) -> GgufLayout:
    """The layout of a base: a GGUF file (``.gguf``, ``pkg:``) from its metadata, a model folder from its
    ``config.json``."""
    from loramerge.io.gguf import gguf_path, is_gguf_reference

    if is_gguf_reference(base):
        import gguf

        reader = gguf.GGUFReader(gguf_path(base))
        fields = reader.fields
        architecture = _checked_architecture(str(fields["general.architecture"].contents()), f"base {base}")

        def number(key: str) -> int:
            return int(fields[f"{architecture}.{key}"].contents())

        heads = number("attention.head_count")
        kv_heads = number("attention.head_count_kv") if f"{architecture}.attention.head_count_kv" in fields else heads
        tensors = frozenset(tensor.name for tensor in reader.tensors)
        return GgufLayout(architecture, number("block_count"), heads, kv_heads, tensors, "output.weight" not in tensors)
    config_file = Path(base) / "config.json"
    if not config_file.is_file():
        raise BadInput(f"base {base}: a GGUF adapter needs the base's architecture: give a local .gguf or model folder")
    config = json.loads(config_file.read_text())
    config = config.get("text_config", config)
    model_type = config.get("model_type", "")
    architecture = _checked_architecture(HF_MODEL_TYPES.get(model_type, model_type), f"base {base}")
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    tied = bool(config.get("tie_word_embeddings", False))
    return GgufLayout(architecture, int(config["num_hidden_layers"]), heads, kv_heads, None, tied)


@functools.cache
def _tensor_names(architecture: str, blocks: int):
    import gguf

    return gguf.get_tensor_name_map({name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}[architecture], blocks)


def gguf_tensor_name(layout: GgufLayout, module: str) -> str | None:
    """The base's GGUF tensor name of a module (``model.layers.0.self_attn.q_proj`` -> ``blk.0.attn_q.weight``),
    or None where the architecture's map has none."""
    names = _tensor_names(layout.architecture, layout.blocks)
    return names.get_name(module.removeprefix("base_model.model.") + ".weight", try_suffixes=(".weight",))


def llama_cpp_rows(layout: GgufLayout, name: str, rows: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``rows`` (of a query or key weight, or of its ``lora_b``) in the order llama.cpp stores them: each head's
    two halves interleaved, for the architectures whose converter permutes them (``inverse``: back again)."""
    if not layout.permutes_query_key or not name.endswith(("attn_q.weight", "attn_k.weight", "attn_q.bias",
                                                           "attn_k.bias")):  # fmt: skip
        return rows
    heads = layout.heads if ".attn_q." in name else layout.kv_heads
    shape = rows.shape
    split = (heads, shape[0] // heads // 2, 2) if inverse else (heads, 2, shape[0] // heads // 2)
    return rows.reshape(*split, *shape[1:]).swapaxes(1, 2).reshape(shape)


def ggml_type(gguf_type: str):
    """The GGML type of a ``--gguf-type`` name (``f32``, ``f16``, ``bf16``, ``q8_0``, ``q4_0``)."""
    import gguf

    return gguf.GGMLQuantizationType[gguf_type.upper()]


def encoded(tensor: torch.Tensor, gguf_type: str) -> tuple[np.ndarray, object, bool]:
    """A float tensor as GGUF stores it in ``gguf_type`` (``gguf.quants``): the array, its GGML type, and whether
    q8_0 could not hold it (rows not a multiple of its 32-entry block), so that it went to f16 as llama.cpp's
    converter does."""
    import gguf

    kinds = gguf.GGMLQuantizationType
    kind = ggml_type(gguf_type)
    array = tensor.detach().to(torch.float32).cpu().numpy()
    try:
        encoded_array, widened = gguf.quants.quantize(array, kind), False
    except gguf.QuantError:
        encoded_array, kind, widened = gguf.quants.quantize(array, kinds.F16), kinds.F16, True
    return np.ascontiguousarray(encoded_array), kind, widened  # a strided array is written entry by entry


def written_by_loramerge(path: Path) -> bool:
    import gguf

    try:
        return WRITER_KEY in gguf.GGUFReader(path).fields
    except Exception:  # not a GGUF file at all
        return False


def check_gguf_target(target: Path, force: bool, inputs: list[Path] = ()) -> Path:
    """An output ``.gguf`` file: refused where it is a folder, an input, exists (without ``force``), or exists and
    was not written by loramerge."""
    return check_output_file(target, force, inputs, suffix=".gguf", what="GGUF output", ours="GGUF file",
                             written_by_loramerge=written_by_loramerge, ignore_case=True)  # fmt: skip


def check_plain_lora(adapter) -> None:
    """Refuse what a llama.cpp adapter cannot hold: DoRA, ``lora_bias``, per-expert modules."""
    refused = [name for name, m in adapter.modules.items() if m.dora or m.bias is not None or "[" in name]
    if refused:
        more = f" ({len(refused) - 1} more)" if len(refused) > 1 else ""
        raise BadInput(f"{adapter.name}: module {refused[0]}{more}: llama.cpp adapters hold plain LoRA on linear "
                       "weights, not DoRA, lora_bias or per-expert modules")  # fmt: skip


def adapter_tensor_names(adapter, layout: GgufLayout) -> dict[str, str]:
    """Each linear module's GGUF tensor name; a module llama.cpp's base has no tensor for is refused by name."""
    named = {}
    for name, module in adapter.modules.items():
        if module.embedding:
            continue
        tensor = gguf_tensor_name(layout, name)
        missing = tensor is None or (layout.tensors is not None and tensor not in layout.tensors)
        if missing or (tensor == "output.weight" and layout.tied):
            why = "its output weight is the tied embedding" if tensor == "output.weight" else "it has no such tensor"
            raise BadInput(f"module {name}: llama.cpp cannot apply it to this {layout.architecture} base ({why})")
        named[name] = tensor
    return named


def write_gguf_adapter(
    adapter,
    base: str,
    target: Path,
    *,
    gguf_type: str = "f32",
    force: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> GgufAdapterReport:
    """Write ``adapter`` (a ``LoraAdapter``) as a llama.cpp LoRA adapter for ``base``, atomically (a staging file
    renamed into place). Embedding modules and ``modules_to_save`` are dropped (llama.cpp's adapters hold
    linear weights), and named in the report; DoRA, ``lora_bias`` and per-expert modules are refused."""
    from importlib.metadata import version

    import gguf

    if gguf_type not in GGUF_TYPES:
        raise BadInput(f"`gguf_type` must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}", param="gguf_type")
    target = check_gguf_target(target, force)
    layout = layout_of(base)
    check_plain_lora(adapter)
    dropped = sorted(adapter.dense) + sorted(name for name, m in adapter.modules.items() if m.embedding)
    kept = {name: m for name, m in adapter.modules.items() if not m.embedding}
    named = adapter_tensor_names(adapter, layout)
    if not kept:
        raise BadInput("the adapter has no linear module llama.cpp can apply")
    first = next((m for m in kept.values() if m.scale != 0), next(iter(kept.values())))
    # the first module's lora_b is written as it is (float32, as the file stores alpha); 1 if every scale is 0
    alpha = float(np.float32(first.scale * first.rank)) or 1.0
    writer_type = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}[layout.architecture]
    report = GgufAdapterReport(len(kept), alpha, dropped)
    with atomic_output_file(target) as staging:
        writer = gguf.GGUFWriter(staging, gguf.MODEL_ARCH_NAMES[writer_type])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_string(WRITER_KEY, version("loramerge"))
        for done, (name, module) in enumerate(sorted(kept.items()), start=1):
            tensor_name = named[name]
            lora_b = module.B.to(torch.float32) * (module.scale * module.rank / alpha)
            for suffix, tensor in ((".lora_a", module.A), (".lora_b", llama_cpp_rows(layout, tensor_name, lora_b))):
                array, kind, widened = encoded(tensor, gguf_type)
                if widened:
                    report.widened.append(tensor_name + suffix)
                writer.add_tensor(tensor_name + suffix, array, raw_dtype=kind)
            if progress is not None:
                progress(done, len(kept) + 1, name)  # the last step: the bytes, written after every tensor is encoded
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    if progress is not None:
        progress(len(kept) + 1, len(kept) + 1, str(target))
    return report
