"""Single-file LoRAs of the diffusion world (``src/loramerge/adapters/single_file.py``): kohya and diffusers files
merged with no base model and written back, checked by diffusers itself. A tiny SD-1.5-shaped pipeline is built
from configs in the test (no download); diffusers' own ``load_lora_weights`` and ``fuse_lora`` read each input and
each merge, and the fused weights must move by the weighted sum of what the inputs move them by: attention and
feed-forward linears, SD 1.5's 1x1 ``proj_in`` convolution and a 3x3 resnet convolution (kohya's LoCon), with
different ranks and alphas.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import save_file

from cli_helpers import assert_clean_failure, run
from diffusion_helpers import (
    MODULES,
    WEIGHTS,
    assert_weighted_sum,
    fused_deltas,
    kohya_lora_file,
    pipeline,
    saved_as_diffusers,
)

diffusers = pytest.importorskip("diffusers")


def kohya_file(path, seed: int, rank: int, alpha: float):
    """A kohya LoRA of ``MODULES`` (``lora_unet_…lora_down/lora_up/alpha``) as sd-scripts writes one."""
    return kohya_lora_file(path, {"lora_unet_" + name.replace(".", "_"): spec for name, spec in MODULES.items()},
                           seed, rank, alpha)  # fmt: skip


def diffusers_file(folder, kohya):
    """The kohya file as diffusers itself saves a LoRA: loaded into the pipeline, then ``save_lora_weights``."""
    pipe = pipeline()
    pipe.load_lora_weights(str(kohya), adapter_name="x")
    return saved_as_diffusers(pipe, "unet", folder)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("single_file")
    kohya = [kohya_file(root / "a.safetensors", 1, rank=4, alpha=2.0),
             kohya_file(root / "b.safetensors", 2, rank=8, alpha=8.0)]  # fmt: skip
    (root / "da").mkdir()
    (root / "db").mkdir()
    converted = [diffusers_file(root / "da", kohya[0]), diffusers_file(root / "db", kohya[1])]
    return {"kohya": kohya, "diffusers": converted, "deltas": [fused_deltas(path) for path in kohya]}


@pytest.mark.parametrize("inputs, fmt", [("kohya", "kohya"), ("diffusers", "diffusers"), ("mixed", "kohya")])
def test_a_linear_merge_is_what_diffusers_fuses_from_the_inputs(files, tmp_path, inputs, fmt):
    paths = files["kohya"] if inputs == "kohya" else files["diffusers"]
    if inputs == "mixed":
        paths = [files["kohya"][0], files["diffusers"][1]]
    out = tmp_path / "merged.safetensors"
    result = run("merge", *paths, "--method", "linear", "--weights", ",".join(map(str, WEIGHTS)), "-o", out)
    assert result.exit_code == 0, result.output
    assert (out.read_bytes()[:200].count(b"lora_unet_") > 0) == (fmt == "kohya")  # the default: the inputs' format
    merged = fused_deltas(out)
    first, second = files["deltas"]
    assert set(merged) == set(first) and len(merged) == len(MODULES)
    assert_weighted_sum(merged, first, second)


@pytest.mark.parametrize("inputs, fmt", [("diffusers", None), ("kohya", "kohya"), ("mixed", "kohya")])
def test_a_recipe_writes_what_merge_writes(files, tmp_path, inputs, fmt):
    """An adapter recipe of single files writes the file ``loramerge merge`` writes (default: the inputs' format)."""
    from safetensors.torch import load_file

    paths = files["kohya"] if inputs == "kohya" else files["diffusers"]
    if inputs == "mixed":
        paths = [files["kohya"][0], files["diffusers"][1]]
    entries = [{"adapter": str(path), "weight": weight} for path, weight in zip(paths, WEIGHTS, strict=True)]
    recipe = {"merge_method": "ties", "parameters": {"density": 0.5}, "adapters": entries}
    if fmt:
        recipe["output"] = {"format": fmt}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    result = run("run", tmp_path / "r.yml", "-o", tmp_path / "recipe.safetensors")
    assert result.exit_code == 0, result.output
    weights = ",".join(map(str, WEIGHTS))
    result = run("merge", *paths, "--method", "ties", "--density", "0.5", "--weights", weights, "-o",
                 tmp_path / "merge.safetensors")  # fmt: skip
    assert result.exit_code == 0, result.output
    by_recipe, by_merge = load_file(tmp_path / "recipe.safetensors"), load_file(tmp_path / "merge.safetensors")
    assert by_recipe.keys() == by_merge.keys() and all(torch.equal(by_recipe[k], by_merge[k]) for k in by_merge)
    assert any(key.startswith("lora_unet_") for key in by_recipe) == (fmt == "kohya")


def test_other_methods_and_what_is_refused(files, tmp_path):
    out = tmp_path / "ties.safetensors"
    result = run("merge", *files["kohya"], "--method", "ties", "--density", "0.5", "-o", out)
    assert result.exit_code == 0, result.output
    assert set(fused_deltas(out)) == set(files["deltas"][0])
    target = tmp_path / "x.safetensors"
    cases = [
        (["--format", "diffusers"], "names its modules kohya's way, which cannot be turned into diffusers module"),
        (["-o", tmp_path / "folder"], "a single-file LoRA is one file named *.safetensors"),
    ]
    for extra, message in cases:
        argv = ["merge", *files["kohya"], "-o", target, *extra]
        output = extra[extra.index("-o") + 1] if "-o" in extra else target
        assert_clean_failure(run(*argv), message, output)
    dora = tmp_path / "dora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 3), "lora_unet_x.lora_up.weight": torch.ones(4, 2),
               "lora_unet_x.dora_scale": torch.ones(4, 1)}, dora)  # fmt: skip
    assert_clean_failure(run("merge", dora, "-o", target), "is a DoRA adapter: merging it needs the base model", target)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.ones(1)}, foreign)
    result = run("merge", *files["kohya"], "-o", foreign, "--force")
    assert result.exit_code == 2 and "not a LoRA file loramerge wrote" in result.stderr


def _loha(rand, rows, columns, kernel, tucker):
    """LoHa factors (rank 4, alpha 2) and the delta by LyCORIS' formula: ``(w1a w1b) ⊙ (w2a w2b) · alpha / r``, for a
    convolution with flat factors (in · kh · kw columns), or (``tucker``) each side rebuilt from its core as
    LyCORIS' ``HadaWeightTucker`` does."""
    rank, alpha = 4, 2.0
    if tucker:
        # factors of 0.3, not 0.1: a product of two Tucker rebuilds is otherwise too small to measure on fused weights
        shapes = {"t1": (rank, rank, *kernel), "w1_a": (rank, rows), "w1_b": (rank, columns),
                  "t2": (rank, rank, *kernel), "w2_a": (rank, rows), "w2_b": (rank, columns)}  # fmt: skip
        parts = {f"hada_{key}": 3 * rand(*shape) for key, shape in shapes.items()}
        p = {k: v.double() for k, v in parts.items()}
        sides = [torch.einsum("i j k l, j r, i p -> p r k l", p[f"hada_t{i}"], p[f"hada_w{i}_b"], p[f"hada_w{i}_a"])
                 for i in (1, 2)]  # fmt: skip
        return parts, sides[0] * sides[1] * alpha / rank, alpha
    flat = columns * (kernel[0] * kernel[1] if kernel else 1)  # LyCORIS stores a convolution's factors flat
    parts = {"hada_w1_a": rand(rows, rank), "hada_w1_b": rand(rank, flat), "hada_w2_a": rand(rows, rank),
             "hada_w2_b": rand(rank, flat)}  # fmt: skip
    p = {k: v.double().flatten(1) for k, v in parts.items()}
    delta = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]) * alpha / rank
    return parts, delta.reshape(rows, columns, *(kernel or ())), alpha


def _lokr(rand, rows, columns, kernel, full, tucker):
    """LoKr factors and the delta by LyCORIS' formula: ``kron(w1, w2) · alpha / r`` (w1 of 4 x 4; w2 = w2a w2b, or
    full, where alpha is ignored; a convolution's w2 is 4-D, or rebuilt from its Tucker core)."""
    rank, alpha = 2, 3.0
    right = (rows // 4, columns // 4)
    parts = {"lokr_w1": rand(4, 4)}
    if tucker:
        parts.update(lokr_t2=rand(rank, rank, *kernel), lokr_w2_a=rand(rank, right[0]), lokr_w2_b=rand(rank, right[1]))
        p = {k: v.double() for k, v in parts.items()}
        w2 = torch.einsum("i j k l, i p, j r -> p r k l", p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
        scale = alpha / rank
    elif full:
        parts["lokr_w2"] = rand(*right, *(kernel or ()))
        w2, scale = parts["lokr_w2"].double(), 1.0
    else:
        parts.update(lokr_w2_a=rand(right[0], rank), lokr_w2_b=rand(rank, right[1]))
        w2, scale = parts["lokr_w2_a"].double() @ parts["lokr_w2_b"].double(), alpha / rank
    w1 = parts["lokr_w1"].double()
    return parts, torch.kron(w1[:, :, None, None] if w2.dim() == 4 else w1, w2.contiguous()) * scale, alpha


def _locon_tucker(rand, rows, columns, kernel):
    """kohya's LoCon with a Tucker core (``lora_mid``), and its delta as LyCORIS' ``make_weight`` rebuilds it."""
    rank, alpha = 4, 1.0
    parts = {"lora_down.weight": rand(rank, columns, 1, 1), "lora_mid.weight": rand(rank, rank, *kernel),
             "lora_up.weight": rand(rows, rank, 1, 1)}  # fmt: skip
    p = {k: v.double() for k, v in parts.items()}
    delta = torch.einsum("i j k l, p i, j r -> p r k l", p["lora_mid.weight"], p["lora_up.weight"].flatten(1),
                         p["lora_down.weight"].flatten(1))  # fmt: skip
    return parts, delta * alpha / rank, alpha


def lycoris_file(path, kind: str, seed: int):
    """A LyCORIS file of ``kind`` on every module of ``MODULES`` (the 1x1 and 3x3 convolutions included, the 3x3 one
    Tucker-factored where the kind has that form), and each module's delta by LyCORIS' formula, in float64."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.1

    state, deltas = {}, {}
    for name, ((rows, columns), kernel) in MODULES.items():
        tucker = kernel == (3, 3)
        if kind == "loha":
            parts, delta, alpha = _loha(rand, rows, columns, kernel, tucker)
        elif kind == "locon_tucker":
            if not tucker:
                continue
            parts, delta, alpha = _locon_tucker(rand, rows, columns, kernel)
        else:
            parts, delta, alpha = _lokr(rand, rows, columns, kernel, kind == "lokr_full", tucker and kind == "lokr")
        stem = "lora_unet_" + name.replace(".", "_")
        state.update({f"{stem}.{key}": value for key, value in parts.items()})
        state[f"{stem}.alpha"] = torch.tensor(alpha)
        deltas[name + ".weight"] = delta.reshape(rows, columns, *(kernel or ()))
    save_file(state, path)
    return path, deltas


@pytest.mark.parametrize("kind", ["loha", "lokr", "lokr_full", "locon_tucker"])
def test_lycoris_files_merge_with_kohya_ones(files, tmp_path, kind):
    """A LyCORIS LoHa or LoKr file, or a Tucker LoCon (diffusers cannot load those for SD), merged with a kohya LoRA:
    the merge, a kohya LoRA that diffusers loads, moves each weight (linear, 1x1 and 3x3 convolutions) by the
    weighted sum of LyCORIS' formula and diffusers' own fuse of the kohya input."""
    lycoris, formula = lycoris_file(tmp_path / f"{kind}.safetensors", kind, seed=7)
    out = tmp_path / "merged.safetensors"
    result = run("merge", lycoris, files["kohya"][0], "--method", "linear", "--weights", "0.6,0.5", "-o", out)
    assert result.exit_code == 0, result.output
    merged = fused_deltas(out)
    kohya = files["deltas"][0]
    assert set(merged) == set(kohya) | set(formula)
    for name, delta in merged.items():
        expected = 0.5 * kohya[name].double() + (0.6 * formula[name] if name in formula else 0)
        assert ((delta.double() - expected).norm() / expected.norm()).item() < 1e-5, name
    alone = tmp_path / "alone.safetensors"  # kernels of flat convolution factors from the base, the rest from the file
    pipeline().unet.save_pretrained(tmp_path / "base" / "unet")
    assert run("merge", lycoris, "--method", "linear", "--base", tmp_path / "base", "-o", alone).exit_code == 0
    for name, delta in fused_deltas(alone).items():
        assert ((delta.double() - formula[name]).norm() / formula[name].norm()).item() < 1e-5, name
