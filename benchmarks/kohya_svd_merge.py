"""Merging two SDXL-shaped kohya LoRAs: loramerge against the diffusion world's own way, a dense delta per module
and its SVD, as kohya's ``networks/svd_merge_lora.py`` does it (written here as a plain baseline), side by side.

    python benchmarks/kohya_svd_merge.py [--every 1] [--rank 32]

Two kohya files (rank 32, alphas 16 and 32, float16) on every attention, feed-forward, projection and resnet
module of SDXL's UNet (784 modules, 45 of them 3x3 convolutions; names and shapes from diffusers' SDXL UNet built
on the meta device), merged with weights 0.7 and 0.5 into rank 32, each way in a fresh process:

- **loramerge**: ``loramerge merge a.safetensors b.safetensors --method svd --rank 32`` (the best rank-32
  approximation of the exact sum, computed from the factors: a QR of the stacked factors and an SVD of a small
  core, never the out x in delta) and ``--method cat`` (the exact sum, rank 64).
- **dense SVD** (kohya's way): per module the dense ``Σ w_i · alpha_i / r_i · up_i @ down_i`` (a convolution
  flattened), ``torch.linalg.svd``, the top 32 directions, both factors clamped at the 0.99 quantile of their
  entries (as svd_merge_lora.py does), written as a kohya file.

Reported: wall time and peak RSS of each process, and each output's relative error against the exact weighted sum
(float64, module by module: the Frobenius norm of the difference over the sum's, overall and worst). The target:
loramerge at least 10x faster than the dense SVD, at a lower peak. ``--every N`` keeps every N-th module (a shorter
run; the module count is reported).

Writes ``benchmarks/results/kohya_svd_merge.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from _common import load_averages, run_measured, write_results
from safetensors.torch import load_file, save_file

WEIGHTS = (0.7, 0.5)
SDXL_UNET = {"sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
             "block_out_channels": (320, 640, 1280),
             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
             "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
             "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816}  # fmt: skip


def sdxl_modules(every: int) -> dict[str, tuple[int, ...]]:
    """kohya name -> weight shape of SDXL's attention and resnet linears and convolutions."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    found = {f"lora_unet_{name.replace('.', '_')}": tuple(module.weight.shape) for name, module in unet.named_modules()
             if isinstance(module, layers) and ("attentions" in name or "resnets" in name)}  # fmt: skip
    return {name: shape for index, (name, shape) in enumerate(sorted(found.items())) if index % every == 0}


def kohya_file(path: Path, modules: dict[str, tuple[int, ...]], rank: int, alpha: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in modules.items():
        rows, columns = shape[0], shape[1]
        kernel = shape[2:]
        down = torch.randn(rank, columns, *kernel, generator=generator) / (columns * max(1, len(kernel))) ** 0.5
        up = torch.randn(rows, rank, *((1, 1) if kernel else ()), generator=generator) / rank**0.5
        state.update({f"{name}.lora_down.weight": down.half(), f"{name}.lora_up.weight": up.half(),
                      f"{name}.alpha": torch.tensor(alpha)})  # fmt: skip
    save_file(state, path)


def module_delta(state: dict[str, torch.Tensor], name: str, dtype: torch.dtype) -> torch.Tensor:
    """``alpha / r · up @ down`` of one kohya module, as a matrix (a convolution flattened)."""
    down, up = state[f"{name}.lora_down.weight"].to(dtype), state[f"{name}.lora_up.weight"].to(dtype)
    alpha = float(state.get(f"{name}.alpha", torch.tensor(float(down.shape[0]))))
    return alpha / down.shape[0] * (up.flatten(1) @ down.flatten(1))


def dense_svd_merge(inputs: list[Path], output: Path, rank: int) -> None:
    """kohya's svd_merge_lora.py, as a plain baseline: the dense weighted sum per module, its SVD, the top ``rank``
    directions with both factors clamped at the 0.99 quantile of their entries."""
    states = [load_file(path) for path in inputs]
    names = sorted({key.split(".")[0] for state in states for key in state})
    merged = {}
    for name in names:
        shape = states[0][f"{name}.lora_down.weight"].shape
        delta = sum(w * module_delta(state, name, torch.float32) for w, state in zip(WEIGHTS, states, strict=True))
        left, values, right = torch.linalg.svd(delta, full_matrices=False)
        keep = min(rank, *delta.shape)
        up, down = left[:, :keep] * values[:keep], right[:keep]
        bound = torch.quantile(torch.cat([up.flatten(), down.flatten()]).abs()[:16_000_000], 0.99)
        up, down = up.clamp(-bound, bound), down.clamp(-bound, bound)
        merged[f"{name}.lora_up.weight"] = up.reshape(up.shape[0], keep, *((1, 1) if len(shape) == 4 else ()))
        merged[f"{name}.lora_down.weight"] = down.reshape(keep, *shape[1:])
        merged[f"{name}.alpha"] = torch.tensor(float(keep))
    save_file({key: value.half().contiguous() if key.endswith("weight") else value for key, value in merged.items()},
              output)  # fmt: skip


def errors(inputs: list[Path], output: Path) -> tuple[float, float]:
    """The output's relative Frobenius error against the exact weighted sum: overall, and the worst module's."""
    states, merged = [load_file(path) for path in inputs], load_file(output)
    names = sorted({key.split(".")[0] for key in merged})
    squared_error = squared_norm = worst = 0.0
    for name in names:
        exact = sum(w * module_delta(state, name, torch.float64) for w, state in zip(WEIGHTS, states, strict=True))
        difference = (module_delta(merged, name, torch.float64) - exact).norm().item()
        norm = exact.norm().item()
        squared_error, squared_norm = squared_error + difference**2, squared_norm + norm**2
        worst = max(worst, difference / norm)
    return (squared_error / squared_norm) ** 0.5, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=int, default=1, help="keep every N-th module")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--baseline", nargs=3, help=argparse.SUPPRESS)  # child: A B OUT
    args = parser.parse_args()
    if args.baseline:
        torch.set_num_threads(2)
        dense_svd_merge([Path(p) for p in args.baseline[:2]], Path(args.baseline[2]), args.rank)
        return
    modules = sdxl_modules(args.every)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        inputs = [root / "a.safetensors", root / "b.safetensors"]
        kohya_file(inputs[0], modules, args.rank, 16.0, seed=1)
        kohya_file(inputs[1], modules, args.rank, 32.0, seed=2)
        weights = ",".join(map(str, WEIGHTS))
        runs = {
            "loramerge svd (rank 32)": [sys.executable, "-m", "loramerge.cli", "merge", *map(str, inputs), "--method",
                                        "svd", "--rank", str(args.rank), "--weights", weights, "-o",
                                        str(root / "svd.safetensors")],
            "loramerge cat (exact, rank 64)": [sys.executable, "-m", "loramerge.cli", "merge", *map(str, inputs),
                                               "--method", "cat", "--weights", weights, "-o",
                                               str(root / "cat.safetensors")],
            "dense SVD, kohya's way (rank 32)": [sys.executable, __file__, "--rank", str(args.rank), "--baseline",
                                                 *map(str, inputs), str(root / "dense.safetensors")],
        }  # fmt: skip
        outputs = dict(zip(runs, ("svd", "cat", "dense"), strict=True))
        figures = {}
        for label, command in runs.items():
            seconds, rss, code = run_measured(command)
            if code != 0:
                raise SystemExit(f"{label} failed ({code})")
            overall, worst = errors(inputs, root / f"{outputs[label]}.safetensors")
            figures[label] = {"seconds": seconds, "peak_rss_mib": rss, "relative_error": overall,
                              "worst_module_error": worst}  # fmt: skip
    ours, theirs = figures["loramerge svd (rank 32)"], figures["dense SVD, kohya's way (rank 32)"]
    speedup = theirs["seconds"] / ours["seconds"]
    rows = [f"| {label} | {f['seconds']:.1f} s | {f['peak_rss_mib']:.0f} MiB | {f['relative_error']:.3g} | "
            f"{f['worst_module_error']:.3g} |" for label, f in figures.items()]  # fmt: skip
    markdown = "\n".join([
        f"Two SDXL-shaped kohya LoRAs (rank {args.rank}, float16, {len(modules)} modules: attention, feed-forward, "
        "projections, resnet convolutions) merged with weights 0.7 and 0.5, each in a fresh process:",
        "",
        "| merge | wall time | peak RSS | relative error vs the exact sum | worst module |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"loramerge's rank-{args.rank} SVD merge is **{speedup:.1f}x** faster than the dense SVD at "
        f"{ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}x its peak memory (target: at least 10x faster, at a "
        "lower peak).",
    ])  # fmt: skip
    write_results("kohya_svd_merge", {"modules": len(modules), "rank": args.rank, "every": args.every, "runs": figures,
                                      "speedup": speedup, "load_averages": load_averages()}, markdown)  # fmt: skip
    print(markdown)


if __name__ == "__main__":
    main()
