"""``--space factors`` reproduces PEFT's add_weighted_adapter; ``--space full`` its ``*_svd`` variants."""

from __future__ import annotations

import pytest
import torch

from conftest import build_adapter, peft_delta, peft_with_adapters, rel_err
from loramerge import load_adapter, merge_adapters

WEIGHTS = [0.6, 0.3, -0.4]


def peft_merge(base, paths, combination_type, **kwargs):
    names = [f"in{i}" for i in range(len(paths))]
    model = peft_with_adapters(base, dict(zip(names, paths, strict=True)))
    model.add_weighted_adapter(names, WEIGHTS, "merged", combination_type=combination_type, **kwargs)
    return model


@pytest.mark.parametrize(
    ("method", "density", "majority_sign"),
    [("linear", None, None), ("ties", 0.5, "total"), ("ties", 0.3, "frequency"), ("magnitude_prune", 0.6, None)],
)
def test_factor_space_matches_peft_factors(method, density, majority_sign, llama_base, equal_rank_adapters):
    extra = {"density": density} if density else {}
    if majority_sign:
        extra["majority_sign_method"] = majority_sign
    model = peft_merge(llama_base, equal_rank_adapters, method, **extra)
    ours = merge_adapters(
        [load_adapter(p) for p in equal_rank_adapters], WEIGHTS, method=method, space="factors",
        density=density, majority_sign=majority_sign,
    )  # fmt: skip
    for name, module in ours.modules.items():
        layer = model.base_model.model.get_submodule(name)
        assert torch.allclose(module.A, layer.lora_A["merged"].weight, rtol=1e-5, atol=1e-6), name
        assert torch.allclose(module.B, layer.lora_B["merged"].weight, rtol=1e-5, atol=1e-6), name


def test_factor_space_linear_has_cross_terms(equal_rank_adapters):
    """The reason the default is not PEFT's: its linear merge is not the weighted sum of the deltas."""
    adapters = [load_adapter(p) for p in equal_rank_adapters]
    factors = merge_adapters(adapters, WEIGHTS, method="linear", space="factors")
    exact = merge_adapters(adapters, WEIGHTS, method="linear")
    name = "model.layers.0.self_attn.q_proj"
    assert rel_err(factors.modules[name].delta(), exact.modules[name].delta()) > 0.1


@pytest.mark.parametrize(
    ("method", "peft_name", "density"), [("ties", "ties_svd", 0.5), ("magnitude_prune", "magnitude_prune_svd", 0.4)]
)
def test_full_space_matches_peft_svd_variants(method, peft_name, density, llama_base, tmp_path):
    # lora_alpha == r: PEFT's *_svd path and ours then see the same deltas and scales.
    paths = [build_adapter(llama_base, tmp_path / f"s{i}", seed=30 + i, r=4, lora_alpha=4) for i in range(3)]
    model = peft_merge(llama_base, paths, peft_name, density=density)
    ours = merge_adapters([load_adapter(p) for p in paths], WEIGHTS, method=method, space="full", density=density)
    for name, module in ours.modules.items():
        expected = peft_delta(model, name, "merged")
        assert rel_err(module.delta(), expected) < 1e-4, name


def test_core_and_full_space_agree_with_the_exact_sum_when_the_kernel_is_linear(equal_rank_adapters):
    """magnitude_prune at density 1 is a weighted sum: core space, full space and cat must then agree."""
    adapters = [load_adapter(p) for p in equal_rank_adapters]
    exact = merge_adapters(adapters, WEIGHTS, method="linear")
    for space in ("core", "full"):
        merged = merge_adapters(adapters, WEIGHTS, method="magnitude_prune", space=space, density=1.0, rank=12)
        for name in exact.modules:
            assert rel_err(merged.modules[name].delta(), exact.modules[name].delta()) < 1e-5, (space, name)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_factor_space_matches_peft_statistics(method, llama_base, equal_rank_adapters):
    """Different random streams, same distribution: the mean over seeds converges to the same tensor."""
    density, seeds = 0.5, 60
    adapters = [load_adapter(p) for p in equal_rank_adapters]
    name = "model.layers.0.self_attn.q_proj"
    ours = torch.stack(
        [merge_adapters(adapters, WEIGHTS, method=method, space="factors", density=density, seed=s).modules[name].A
         for s in range(seeds)]
    )  # fmt: skip
    names = [f"in{i}" for i in range(3)]
    model = peft_with_adapters(llama_base, dict(zip(names, equal_rank_adapters, strict=True)))
    theirs = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        model.add_weighted_adapter(names, WEIGHTS, f"m{seed}", combination_type=method, density=density)
        theirs.append(model.base_model.model.get_submodule(name).lora_A[f"m{seed}"].weight.detach().clone())
    theirs = torch.stack(theirs)
    # two-sample z per entry: same means within sampling noise, same spread
    z = (ours.mean(0) - theirs.mean(0)) / ((ours.var(0) + theirs.var(0)) / seeds).sqrt().clamp_min(1e-12)
    assert z.abs().mean().item() < 1.0  # 0.80 for equal means
    assert (z.abs() > 4).float().mean().item() < 0.01
    assert ours.std(0).mean().item() == pytest.approx(theirs.std(0).mean().item(), rel=0.1)
    assert (ours[0] == 0).float().mean().item() == pytest.approx((theirs[0] == 0).float().mean().item(), abs=0.1)
    # and where nothing is dropped, the two are the same function
    dense = merge_adapters(adapters, WEIGHTS, method=method, space="factors", density=1.0)
    torch.manual_seed(0)
    model.add_weighted_adapter(names, WEIGHTS, "full", combination_type=method, density=1.0)
    reference = model.base_model.model.get_submodule(name).lora_A["full"].weight
    assert torch.allclose(dense.modules[name].A, reference, rtol=1e-5, atol=1e-6)


def test_factor_space_refuses_unequal_ranks(mixed_adapters):
    from loramerge import BadInput

    with pytest.raises(BadInput, match="equal ranks"):
        merge_adapters([load_adapter(p) for p in mixed_adapters], [1, 1, 1], method="ties", space="factors")
