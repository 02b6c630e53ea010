"""DoRA in single-file LoRAs (``src/loramerge/adapters/single_file.py``, ``diffusion_base.py``): LyCORIS' kohya-style
``dora_scale`` and diffusers' ``lora_magnitude_vector``, merged with the row norms of a diffusion base read by the
files' own module names. A tiny SD-1.5-shaped UNet is built from its config and saved as a pipeline folder
(``unet/``). kohya inputs and outputs are checked against LyCORIS' formula, written out in the test in float64
(``W' = (W0 + Δ) · dora_scale / ‖W0 + Δ‖_row``); diffusers-format ones by diffusers itself (``load_lora_weights``
and ``fuse_lora``, which run PEFT's DoRA). A linear merge must move every weight by the weighted sum of what the
inputs move it by, convolutions included.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_helpers import assert_clean_failure, run
from diffusion_helpers import MODULES, WEIGHTS, assert_weighted_sum, fused_deltas, pipeline, saved_as_diffusers

diffusers = pytest.importorskip("diffusers")


def lycoris_dora(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """LyCORIS' ``apply_weight_decompose`` with ``wd_on_out``: each output row of ``W0 + Δ`` rescaled to its
    ``dora_scale``."""
    merged = weight + delta
    norms = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (merged.dim() - 1))
    return merged * dora_scale / norms


def kohya_deltas(state: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a kohya DoRA file (LyCORIS' layout) moves each base weight by, in float64."""
    moved = {}
    for name in MODULES:
        stem = "lora_unet_" + name.replace(".", "_")
        down, up = state[f"{stem}.lora_down.weight"].double(), state[f"{stem}.lora_up.weight"].double()
        weight = base[name + ".weight"].double()
        delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * float(state[f"{stem}.alpha"]) / down.shape[0]
        moved[name + ".weight"] = lycoris_dora(weight, delta, state[f"{stem}.dora_scale"].double()) - weight
    return moved


def kohya_dora_file(path, base: dict[str, torch.Tensor], seed: int, rank: int, alpha: float):
    """A LyCORIS DoRA file (kohya names, ``dora_scale`` out x 1 (x 1 x 1)), its magnitudes near the base's norms."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, ((rows, columns), kernel) in MODULES.items():
        stem = "lora_unet_" + name.replace(".", "_")
        weight = base[name + ".weight"]
        norms = weight.reshape(rows, -1).norm(dim=1).reshape(rows, 1, *((1, 1) if kernel else ()))
        state.update({
            f"{stem}.lora_down.weight": torch.randn(rank, columns, *(kernel or ()), generator=generator) * 0.1,
            f"{stem}.lora_up.weight": torch.randn(rows, rank, *((1, 1) if kernel else ()), generator=generator) * 0.1,
            f"{stem}.alpha": torch.tensor(alpha),
            f"{stem}.dora_scale": norms * (1 + 0.2 * torch.rand(norms.shape, generator=generator)),
        })  # fmt: skip
    save_file(state, path)
    return path


def diffusers_dora_file(folder, seed: int, rank: int):
    """A DoRA LoRA as diffusers saves one: PEFT's DoRA on the UNet's linear and convolution modules, trained weights
    stood in for by random ones, written by ``save_lora_weights`` with its config."""
    from peft import LoraConfig

    pipe = pipeline()
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=2 * rank, use_dora=True, target_modules=list(MODULES)), "x")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in pipe.unet.named_parameters():
            if "lora_" in name:
                parameter.mul_(1 + 0.2 * torch.rand(parameter.shape, generator=generator))
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return saved_as_diffusers(pipe, "unet", folder)


@pytest.fixture(scope="module")
def dora_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dora")
    unet = pipeline().unet
    unet.save_pretrained(root / "base" / "unet")
    base = {name: p.detach().clone() for name, p in unet.state_dict().items()}
    kohya = [kohya_dora_file(root / "a.safetensors", base, 1, rank=4, alpha=2.0),
             kohya_dora_file(root / "b.safetensors", base, 2, rank=8, alpha=8.0)]  # fmt: skip
    (root / "da").mkdir()
    (root / "db").mkdir()
    converted = [diffusers_dora_file(root / "da", 3, rank=4), diffusers_dora_file(root / "db", 4, rank=8)]
    return {"root": root, "base": base, "kohya": kohya, "diffusers": converted}


def linear_merge(dora_setup, kind: str, tmp_path):
    """``merge --method linear`` of the two ``kind`` DoRA files with the base's row norms; the written file."""
    out = tmp_path / "merged.safetensors"
    weights = ",".join(map(str, WEIGHTS))
    result = run("merge", *dora_setup[kind], "--method", "linear", "--weights", weights, "--base",
                 dora_setup["root"] / "base", "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def test_a_kohya_dora_merge_moves_weights_by_the_weighted_sum(dora_setup, tmp_path):
    """LyCORIS' formula applied to each input and to the merge (dora_scale and factors as written): the merge moves
    every weight, linear or convolution, by the weighted sum of the inputs' moves."""
    base = dora_setup["base"]
    written = load_file(linear_merge(dora_setup, "kohya", tmp_path))
    assert {key.rsplit(".", 1)[-1] for key in written if "dora_scale" in key} == {"dora_scale"}
    first, second = (kohya_deltas(load_file(path), base) for path in dora_setup["kohya"])
    assert_weighted_sum(kohya_deltas(written, base), first, second)


def test_a_diffusers_dora_merge_is_what_diffusers_fuses(dora_setup, tmp_path):
    merged = fused_deltas(linear_merge(dora_setup, "diffusers", tmp_path))
    first, second = (fused_deltas(path) for path in dora_setup["diffusers"])
    assert set(merged) == set(first) and len(merged) == len(MODULES)
    assert_weighted_sum(merged, first, second)


def test_a_dora_merge_needs_the_base_it_names(dora_setup, tmp_path):
    target = tmp_path / "x.safetensors"
    kohya = dora_setup["kohya"]
    assert_clean_failure(run("merge", *kohya, "-o", target), "is a DoRA adapter: merging it needs the base", target)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_failure(run("merge", *kohya, "--base", empty, "-o", target), "no .safetensors weights", target)
