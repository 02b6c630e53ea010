"""Dense merges of synthetic Llama-shaped float16 models: loramerge vs mergekit-yaml vs the I/O floor.

    python benchmarks/dense_vs_mergekit.py [--sizes 0.5,1,2] [--methods ties,linear] [--skip-mergekit]

For each size, three sharded float16 models (vocab 32000, hidden 2048, intermediate 5504, layers to
reach the size). ``ties`` merges models 1 and 2 onto model 0 as the base; ``linear`` averages all three;
``sce`` (top 50 % of varying entries) and ``nuslerp`` (equal weights, task vectors) merge 1 and 2 onto 0.
Each job runs in a fresh process; wall time and that process's peak RSS are printed, with the ratios
to mergekit and to a plain pass that reads every input tensor and writes the output's bytes, and written
to ``benchmarks/results/dense_vs_mergekit.json`` and ``.md`` (``--name`` picks another name, for a second
table).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from _common import load_averages, run_measured, write_results
from safetensors.torch import save_file

VOCAB, HIDDEN, INTERMEDIATE = 32000, 2048, 5504
SHARD_BYTES = 500 * 10**6
FLOOR = """
import sys, json
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
inputs, out = [Path(p) for p in sys.argv[1:-1]], Path(sys.argv[-1])
out.mkdir(parents=True, exist_ok=True)
index = json.loads((inputs[0] / "model.safetensors.index.json").read_text())["weight_map"]
handles = {}
def get(folder, name):
    path = folder / index[name]
    if path not in handles:
        handles[path] = safe_open(path, framework="pt")
    return handles[path].get_tensor(name)
shard, size, count = {}, 0, 0
for name in index:
    tensors = [get(folder, name).clone() for folder in inputs]  # clone: really read every input's bytes
    shard[name] = tensors[0]
    size += tensors[0].numel() * 2
    if size > 5 * 10**9:
        save_file(shard, out / f"shard{count}.safetensors"); shard, size, count = {}, 0, count + 1
save_file(shard, out / f"shard{count}.safetensors")
"""


def layer_shapes() -> dict[str, tuple[int, ...]]:
    return {
        "self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
        "self_attn.v_proj.weight": (HIDDEN, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE), "input_layernorm.weight": (HIDDEN,),
        "post_attention_layernorm.weight": (HIDDEN,),
    }  # fmt: skip


def layers_for(gigabytes: float) -> int:
    fixed = 2 * VOCAB * HIDDEN + HIDDEN
    per_layer = sum(torch.Size(shape).numel() for shape in layer_shapes().values())
    return max(1, round((gigabytes * 1e9 / 2 - fixed) / per_layer))


def write_model(folder: Path, layers: int, seed: int, base: Path | None) -> int:
    """A sharded float16 Llama checkpoint; a fine-tune-like copy of ``base`` (plus noise) when given."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in layer_shapes().items()})
    shapes.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    folder.mkdir(parents=True)
    shard, size, files, weight_map, total = {}, 0, [], {}, 0
    base_index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"] if base else {}

    def flush():
        nonlocal shard, size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        files.append(name)
        shard, size = {}, 0

    for name, shape in shapes.items():
        if base is not None:
            from safetensors import safe_open

            with safe_open(base / base_index[name], framework="pt") as handle:
                tensor = handle.get_tensor(name).float()
            tensor += 0.002 * torch.randn(shape, generator=generator)
        else:
            tensor = 0.02 * torch.randn(shape, generator=generator)
        shard[name] = tensor.half()
        size += shard[name].numel() * 2
        total += shard[name].numel() * 2
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": 16,
              "num_key_value_heads": 16, "vocab_size": VOCAB, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float16"}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return total


def recipe(method: str, models: list[Path]) -> dict:
    if method == "linear":
        return {"merge_method": "linear", "dtype": "float16",
                "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models]}  # fmt: skip
    if method == "sce":
        return {"merge_method": "sce", "base_model": str(models[0]), "dtype": "float16",
                "parameters": {"select_topk": 0.5}, "models": [{"model": str(m)} for m in models[1:]]}  # fmt: skip
    if method == "nuslerp":
        return {"merge_method": "nuslerp", "base_model": str(models[0]), "dtype": "float16",
                "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models[1:]]}  # fmt: skip
    return {"merge_method": "ties", "base_model": str(models[0]), "dtype": "float16",
            "parameters": {"normalize": True},
            "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}}
                       for m in models[1:]]}  # fmt: skip


def mergekit_version() -> str:
    try:
        return importlib.metadata.version("mergekit")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def markdown(rows: list[dict[str, object]], version: str) -> str:
    lines = ["Three synthetic Llama-shaped float16 models per size (500 MB shards); each job a fresh process; the "
             "floor: a plain pass that reads every input tensor and writes the output's bytes.", "",
             f"| model size | job | loramerge | mergekit-yaml {version} | time ratio | I/O floor | loramerge / floor |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        theirs, ratio = "–", "–"
        if r.get("mergekit_s") is not None:
            theirs = f"{r['mergekit_s']:.1f} s, {r['mergekit_rss_mib']:.0f} MiB"
            ratio = f"**{r['ours_s'] / r['mergekit_s']:.2f}**"
        lines.append(f"| {r['size_gb']:.2f} GB | {r['method']} | {r['ours_s']:.1f} s, {r['ours_rss_mib']:.0f} MiB | "
                     f"{theirs} | {ratio} | {r['floor_s']:.1f} s | {r['ours_s'] / r['floor_s']:.2f}× |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="0.5,1,2")
    parser.add_argument("--methods", default="ties,linear")
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--name", default="dense_vs_mergekit", help="Results file name (benchmarks/results/NAME.*).")
    args = parser.parse_args()
    mergekit = shutil.which("mergekit-yaml", path=str(Path(sys.executable).parent)) or shutil.which("mergekit-yaml")
    work = Path(tempfile.mkdtemp(prefix="loramerge-dense-", dir=args.workdir))
    rows: list[dict[str, object]] = []
    load_before = load_averages()
    try:
        for gigabytes in (float(s) for s in args.sizes.split(",")):
            rows += merge_size(gigabytes, args.methods.split(","), work, None if args.skip_mergekit else mergekit)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    version = mergekit_version()
    figures = {"rows": rows, "mergekit": version, "load_average": {"start": load_before, "end": load_averages()}}
    text = markdown(rows, version)
    write_results(args.name, figures, text)
    print(text)


def merge_size(gigabytes: float, methods: list[str], work: Path, mergekit: str | None) -> list[dict[str, object]]:
    """Three models of about ``gigabytes`` each; the floor, then each method by loramerge and mergekit."""
    layers = layers_for(gigabytes)
    models = [work / f"{gigabytes}gb-m{i}" for i in range(3)]
    size = write_model(models[0], layers, 0, None)
    for i, folder in enumerate(models[1:], start=1):
        write_model(folder, layers, i, models[0])
    print(f"\n== 3 models x {size / 1e9:.2f} GB float16 ({layers} layers, sharded {SHARD_BYTES / 1e6:.0f} MB)")
    floor_s, floor_rss, _ = run_measured([sys.executable, "-c", FLOOR, *map(str, models), str(work / "floor")])
    shutil.rmtree(work / "floor")
    print(f"  I/O floor (read 3 inputs, write 1): {floor_s:6.1f} s, peak RSS {floor_rss:6.0f} MiB")
    rows = []
    for method in methods:
        path = work / f"{method}.yml"
        path.write_text(yaml.safe_dump(recipe(method, models)))
        ours = [sys.executable, "-m", "loramerge.cli", "run", str(path), "-o", str(work / "ours"), "--force"]
        ours_s, ours_rss, code = run_measured(ours)
        assert code == 0, f"loramerge run failed ({code})"
        shutil.rmtree(work / "ours")
        row = {"size_gb": size / 1e9, "layers": layers, "method": method, "floor_s": floor_s,
               "floor_rss_mib": floor_rss, "ours_s": ours_s, "ours_rss_mib": ours_rss}  # fmt: skip
        if mergekit:
            theirs = [mergekit, str(path), str(work / "theirs"), "--no-copy-tokenizer"]
            row["mergekit_s"], row["mergekit_rss_mib"], code = run_measured(theirs)
            assert code == 0, f"mergekit-yaml failed ({code})"
            shutil.rmtree(work / "theirs")
        print(f"  {method:6s} loramerge {ours_s:6.1f} s, {ours_rss:6.0f} MiB | mergekit "
              f"{row.get('mergekit_s', float('nan')):6.1f} s", flush=True)  # fmt: skip
        rows.append(row)
    for folder in models:
        shutil.rmtree(folder)
    return rows


if __name__ == "__main__":
    main()
