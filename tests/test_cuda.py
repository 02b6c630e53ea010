"""``--device cuda``: an adapter merge, a merge folded into its base and a dense recipe computed on the GPU
give the CPU's results (within float32 round-off: the two run different kernels), and a random method is
as reproducible there as on the CPU. Skipped where torch sees no CUDA device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cli_helpers import run
from conftest import rel_err
from dense_helpers import load_weights, save_llama, write_recipe
from loramerge import load_adapter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CASES = [("ties", "core"), ("ties", "full"), ("iso_c", "core"), ("linear", "full")]


def merge(adapters: list[Path], out: Path, *options: str) -> Path:
    result = run("merge", *adapters, "--dtype", "float32", "--weights", "0.7,0.5,-0.3", "-o", out, *options)
    assert result.exit_code == 0, result.output
    return out


def assert_same_change(gpu: dict[str, torch.Tensor], cpu: dict[str, torch.Tensor], base: dict[str, torch.Tensor]):
    """What the GPU changed is what the CPU changed; what the CPU left alone the GPU left alone, bit for bit."""
    assert gpu.keys() == cpu.keys()
    for name, tensor in cpu.items():
        if torch.equal(tensor, base[name]):
            assert torch.equal(gpu[name], base[name]), name
        else:
            assert rel_err(gpu[name] - base[name], tensor - base[name]) < 1e-4, name


@pytest.mark.parametrize(("method", "space"), CASES, ids=[f"{m}-{s}" for m, s in CASES])
def test_adapter_merge_on_cuda_equals_cpu(method, space, mixed_adapters, tmp_path):
    options = ("--method", method, "--space", space, "--density", "0.5")
    cpu = load_adapter(merge(mixed_adapters, tmp_path / "cpu", *options))
    gpu = load_adapter(merge(mixed_adapters, tmp_path / "gpu", *options, "--device", "cuda"))
    assert gpu.modules.keys() == cpu.modules.keys()
    for name, module in cpu.modules.items():  # the products: factors may differ by signs and rotations
        assert rel_err(gpu.modules[name].delta(), module.delta()) < 1e-4, name


RANDOM = {
    "dare_ties": ("--method", "dare_ties", "--density", "0.5"),
    "randomized_svd": ("--method", "ties", "--space", "full", "--full-svd", "randomized", "--rank", "2"),
}


@pytest.mark.parametrize("case", list(RANDOM))
def test_random_merge_on_cuda_is_seeded(case, mixed_adapters, tmp_path):
    """The random drops and the randomized range finder draw on the GPU's own generators (other bits than
    the CPU's), from the seed alone."""
    digests = []
    for index, seed in enumerate(("3", "3", "4")):
        out = merge(mixed_adapters, tmp_path / f"gpu{index}", *RANDOM[case], "--seed", seed, "--device", "cuda")
        digests.append((out / "adapter_model.safetensors").read_bytes())
    assert digests[0] == digests[1] != digests[2]


def test_merge_folded_into_the_base_on_cuda_equals_cpu(llama_base, mixed_adapters, tmp_path):
    options = ("--method", "ties", "--density", "0.5", "--fold-into", str(llama_base))
    cpu = load_weights(merge(mixed_adapters, tmp_path / "cpu", *options))
    gpu = load_weights(merge(mixed_adapters, tmp_path / "gpu", *options, "--device", "cuda"))
    assert_same_change(gpu, cpu, load_weights(llama_base))


def test_dense_recipe_on_cuda_equals_cpu(tmp_path):
    base = save_llama(tmp_path / "base", 0)
    models = [save_llama(tmp_path / f"m{i}", i, like=base) for i in (1, 2)]
    recipe = write_recipe(tmp_path / "recipe.yml", {
        "merge_method": "ties", "base_model": str(base), "dtype": "float32",
        "models": [{"model": str(m), "parameters": {"weight": w, "density": 0.5}}
                   for m, w in zip(models, (1.0, 0.6), strict=True)],
    })  # fmt: skip
    for device in ("cpu", "cuda"):
        result = run("run", recipe, "-o", tmp_path / device, "--device", device)
        assert result.exit_code == 0, result.output
    assert_same_change(load_weights(tmp_path / "cuda"), load_weights(tmp_path / "cpu"), load_weights(base))


def test_dora_merge_on_cuda_equals_cpu(llama_base, tmp_path):
    """DoRA's row norms read the base onto the GPU and merge there; a DoRA + LoRA merge is the CPU's."""
    from conftest import build_adapter

    dora = build_adapter(llama_base, tmp_path / "dora", seed=5, r=4, use_dora=True)
    plain = build_adapter(llama_base, tmp_path / "plain", seed=6, r=2)
    outputs = {}
    for device in ("cpu", "cuda"):
        result = run("merge", dora, plain, "--method", "linear", "--base", llama_base, "--dtype", "float32",
                     "--device", device, "-o", tmp_path / device)  # fmt: skip
        assert result.exit_code == 0, result.output
        outputs[device] = load_adapter(tmp_path / device)
    for name, module in outputs["cpu"].modules.items():
        gpu = outputs["cuda"].modules[name]
        assert rel_err(gpu.magnitude, module.magnitude) < 1e-5, name
        assert rel_err(gpu.B @ gpu.A, module.B @ module.A) < 1e-4, name
