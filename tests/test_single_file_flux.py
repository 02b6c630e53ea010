"""Flux LoRA files (``src/loramerge/adapters/single_file.py``), checked by diffusers itself: a tiny Flux transformer
is built from its config in the test (no download) inside a ``FluxPipeline``; diffusers' ``load_lora_weights`` and
``fuse_lora`` read each input and each merge. kohya files name Flux's modules as BFL does
(``lora_unet_double_blocks_0_img_attn_qkv``: one fused q/k/v projection, which diffusers splits into ``to_q``,
``to_k``, ``to_v``); diffusers files name them by the transformer's paths (``transformer.transformer_blocks.0…``).
"""

from __future__ import annotations

import pytest
import torch

import diffusion_helpers
from cli_helpers import assert_clean_failure, run

diffusers = pytest.importorskip("diffusers")

DIM = 32  # 2 heads of 16
MODULES = {  # BFL name -> (out, in); single blocks' fused linear1 is left out: diffusers assumes Flux-dev's widths
    "double_blocks_0_img_attn_qkv": (3 * DIM, DIM),
    "double_blocks_0_img_attn_proj": (DIM, DIM),
    "double_blocks_0_img_mlp_0": (4 * DIM, DIM),
    "double_blocks_0_txt_attn_qkv": (3 * DIM, DIM),
    "double_blocks_0_txt_mod_lin": (6 * DIM, DIM),
    "single_blocks_0_linear2": (DIM, 5 * DIM),
}
WEIGHTS = (0.8, 0.5)


def flux_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])  # fmt: skip
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)  # fmt: skip


def kohya_flux_file(path, seed: int, rank: int, alpha: float):
    return diffusion_helpers.kohya_lora_file(path, {f"lora_unet_{name}": (shape, None) for name, shape in
                                                    MODULES.items()}, seed, rank, alpha)  # fmt: skip


def diffusers_flux_file(folder, kohya):
    """The kohya file as diffusers itself saves a Flux LoRA: loaded into the pipeline, then ``save_lora_weights``."""
    pipe = flux_pipeline()
    pipe.load_lora_weights(str(kohya), adapter_name="x")
    return diffusion_helpers.saved_as_diffusers(pipe, "transformer", folder)


def fused_deltas(path) -> dict[str, torch.Tensor]:
    return diffusion_helpers.fused_deltas(path, flux_pipeline, "transformer")


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    kohya = [kohya_flux_file(root / "a.safetensors", 1, rank=4, alpha=2.0),
             kohya_flux_file(root / "b.safetensors", 2, rank=6, alpha=6.0)]  # fmt: skip
    (root / "da").mkdir()
    (root / "db").mkdir()
    converted = [diffusers_flux_file(root / "da", kohya[0]), diffusers_flux_file(root / "db", kohya[1])]
    return {"kohya": kohya, "diffusers": converted, "deltas": [fused_deltas(path) for path in kohya]}


@pytest.mark.parametrize("inputs", ["kohya", "diffusers"])
def test_a_flux_merge_is_what_diffusers_fuses_from_the_inputs(flux_files, tmp_path, inputs):
    out = tmp_path / "merged.safetensors"
    weights = ",".join(map(str, WEIGHTS))
    result = run("merge", *flux_files[inputs], "--method", "linear", "--weights", weights, "-o", out)
    assert result.exit_code == 0, result.output
    assert (out.read_bytes()[:300].count(b"lora_unet_double_blocks") > 0) == (inputs == "kohya")
    merged = fused_deltas(out)
    first, second = flux_files["deltas"]
    assert set(merged) == set(first) and len(merged) == len(MODULES) + 4  # each fused q/k/v is three weights
    diffusion_helpers.assert_weighted_sum(merged, first, second, WEIGHTS)


def test_flux_names_do_not_cross_formats(flux_files, tmp_path):
    """BFL's fused q/k/v and diffusers' split projections are different modules: mixing them is refused by name."""
    target = tmp_path / "x.safetensors"
    mixed = [flux_files["kohya"][0], flux_files["diffusers"][1]]
    kohya_output = "kohya names a transformer's (Flux's) modules its own way"
    assert_clean_failure(run("merge", *mixed, "-o", target), kohya_output, target)
    diffusers_output = "names its modules kohya's way, which cannot be turned into diffusers module paths"
    assert_clean_failure(run("merge", *mixed, "--format", "diffusers", "-o", target), diffusers_output, target)
