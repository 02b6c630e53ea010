"""Merging DoRA adapters: PEFT's ``add_weighted_adapter`` and loramerge, both against PEFT's own fold.

    python benchmarks/dora_vs_peft.py [--hidden 512] [--layers 2]

A Llama-shaped model built here (random weights, no download) and 1, 2 and 3 DoRA adapters of ranks 8, 4
and 16 on its attention and MLP projections, with magnitudes moved off the base's norms (as training moves
them). The reference is PEFT's code: each adapter folded by ``merge_and_unload``, and
``W0 + Σ w_i (fold_i − W0)`` the exact weighted sum. Each merge's output is folded by PEFT too, and its
error is the relative Frobenius distance of its delta from the reference delta over all changed weights.
PEFT merges with ``combination_type="cat"`` (the exact sum of the low-rank parts; ``linear`` needs equal
ranks); loramerge with ``method="linear"`` and the base's row norms. Times are wall time of the merge call
alone, median of ``--repeats``.

Writes ``benchmarks/results/dora_vs_peft.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import write_results
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as transformers_logging

from loramerge import load_adapter, merge_adapters, save_adapter

RANKS = (8, 4, 16)
WEIGHTS = {1: [1.0], 2: [0.6, 0.4], 3: [0.5, 0.3, 0.4]}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(folder: Path, hidden: int, layers: int) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=256)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def build_dora(base: Path, folder: Path, rank: int, seed: int) -> Path:
    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, use_dora=True, target_modules=TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.1 * torch.randn_like(parameter))
    peft_model.save_pretrained(folder)
    return folder


def weights_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in model.state_dict().items() if k.endswith("proj.weight")}


def folded(base: Path, adapter: Path | None) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return weights_of(PeftModel.from_pretrained(model, adapter).merge_and_unload() if adapter else model)


def error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    """Relative Frobenius distance of the deltas, over every changed weight together."""
    num = sum(((got[k] - start[k]) - (want[k] - start[k])).square().sum() for k in want)
    den = sum((want[k] - start[k]).square().sum() for k in want)
    return float((num / den).sqrt())


def peft_merge(base: Path, adapters: list[Path], weights: list[float]) -> tuple[dict, float]:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{i}")
    started = time.perf_counter()
    model.add_weighted_adapter([f"a{i}" for i in range(len(adapters))], weights, "merged", combination_type="cat")
    seconds = time.perf_counter() - started
    model.set_adapter("merged")
    return weights_of(model.merge_and_unload()), seconds


def ours(base: Path, adapters: list[Path], weights: list[float], scratch: Path) -> tuple[dict, float]:
    loaded = [load_adapter(path) for path in adapters]
    started = time.perf_counter()
    merged = merge_adapters(loaded, weights, "linear", base=str(base))
    seconds = time.perf_counter() - started
    return folded(base, save_adapter(merged, scratch / f"ours-{len(adapters)}", force=True)), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    rows = []
    with tempfile.TemporaryDirectory(prefix="dora-bench-") as scratch:
        root = Path(scratch)
        base = build_base(root / "base", args.hidden, args.layers)
        adapters = [build_dora(base, root / f"dora{i}", rank, seed=i + 1) for i, rank in enumerate(RANKS)]
        start = folded(base, None)
        for count, weights in WEIGHTS.items():
            inputs = adapters[:count]
            want = {k: v.clone() for k, v in start.items()}
            for path, weight in zip(inputs, weights, strict=True):
                for key, value in folded(base, path).items():
                    want[key] += weight * (value - start[key])
            runs = {"peft": [peft_merge(base, inputs, weights) for _ in range(args.repeats)],
                    "loramerge": [ours(base, inputs, weights, root) for _ in range(args.repeats)]}  # fmt: skip
            row = {"adapters": count, "ranks": list(RANKS[:count]), "weights": weights}
            for name, results in runs.items():
                row[f"{name}_error"] = error(results[0][0], want, start)
                row[f"{name}_seconds"] = statistics.median(seconds for _, seconds in results)
            rows.append(row)
            print(row, flush=True)
    lines = [
        f"DoRA adapters on a Llama-shaped model (hidden {args.hidden}, {args.layers} layers, 7 projections per "
        "layer), merged linearly; error: relative Frobenius distance of the folded delta from PEFT's own folds' "
        f"weighted sum. Time: the merge call alone, median of {args.repeats}.",
        "",
        "| DoRA adapters | ranks | weights | PEFT add_weighted_adapter (cat): error | loramerge linear: error | "
        "PEFT time | loramerge time |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ranks, weights = ", ".join(map(str, row["ranks"])), ", ".join(f"{w:g}" for w in row["weights"])
        lines.append(
            f"| {row['adapters']} | {ranks} | {weights} | {row['peft_error']:.3f} | {row['loramerge_error']:.1e} | "
            f"{row['peft_seconds']:.2f} s | {row['loramerge_seconds']:.2f} s |"
        )
    write_results("dora_vs_peft", {"rows": rows, "hidden": args.hidden, "layers": args.layers}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
