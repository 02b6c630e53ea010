"""linear, cat and svd give the exact sum Σ w_i s_i B_i A_i (or its optimal truncation), checked against PEFT."""

from __future__ import annotations

import pytest
import torch

from conftest import build_adapter, peft_delta, peft_with_adapters, rel_err
from loramerge import load_adapter, merge_adapters, save_adapter

WEIGHTS = [0.5, -0.3, 1.2]


def exact_sums(base, paths, weights) -> dict[str, torch.Tensor]:
    """Σ w_i Δ_i per module, every Δ_i from PEFT's own ``get_delta_weight`` (weight orientation)."""
    model = peft_with_adapters(base, {f"in{i}": path for i, path in enumerate(paths)})
    names = sorted({name for path in paths for name in load_adapter(path).modules})
    sums = {}
    for name in names:
        parts = [(w, peft_delta(model, name, f"in{i}")) for i, w in enumerate(weights)]
        sums[name] = sum(w * d for w, d in parts if d is not None)
    return sums


def merged_deltas(base, merged_dir, names) -> dict[str, torch.Tensor]:
    """The written adapter's deltas as PEFT sees them after ``from_pretrained`` (config round trip included)."""
    model = peft_with_adapters(base, {"merged": merged_dir})
    return {name: peft_delta(model, name, "merged") for name in names}


@pytest.mark.parametrize("method", ["linear", "cat", "svd"])
def test_exact_methods_on_mixed_adapters(method, llama_base, mixed_adapters, tmp_path):
    adapters = [load_adapter(path) for path in mixed_adapters]
    rank = None if method != "svd" else 64  # full rank: the truncation keeps everything
    merged = merge_adapters(adapters, WEIGHTS, method=method, rank=rank)
    save_adapter(merged, tmp_path / "merged")
    expected = exact_sums(llama_base, mixed_adapters, WEIGHTS)
    got = merged_deltas(llama_base, tmp_path / "merged", expected)
    assert set(merged.modules) == set(expected)
    for name, delta in expected.items():
        assert rel_err(got[name], delta) < 1e-5, name


def test_cat_rank_is_sum_of_present_ranks(mixed_adapters):
    adapters = [load_adapter(path) for path in mixed_adapters]
    merged = merge_adapters(adapters, WEIGHTS, method="cat")
    assert merged.modules["model.layers.1.self_attn.q_proj"].rank == 4 + 8 + 6
    assert merged.modules["model.layers.0.mlp.up_proj"].rank == 4  # only the first adapter has it
    assert merged.modules["model.embed_tokens"].rank == 8 and merged.modules["model.embed_tokens"].embedding


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_svd_rank_k_is_the_truncated_svd_of_the_exact_sum(rank, llama_base, mixed_adapters, tmp_path):
    adapters = [load_adapter(path) for path in mixed_adapters]
    merged = merge_adapters(adapters, WEIGHTS, method="svd", rank=rank)
    save_adapter(merged, tmp_path / "merged")
    expected = exact_sums(llama_base, mixed_adapters, WEIGHTS)
    got = merged_deltas(llama_base, tmp_path / "merged", expected)
    for name, delta in expected.items():
        U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
        best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
        assert rel_err(got[name].double(), best) < 1e-5, name
        assert merged.modules[name].rank == min(rank, sum(a.modules[name].rank for a in adapters if name in a.modules))


def test_svd_default_rank_is_largest_input_rank(mixed_adapters):
    adapters = [load_adapter(path) for path in mixed_adapters]
    merged = merge_adapters(adapters, WEIGHTS, method="svd")
    assert merged.modules["model.layers.1.self_attn.q_proj"].rank == 8
    assert merged.modules["model.layers.0.self_attn.k_proj"].rank == 4
    assert merged.config["r"] == 4 and merged.config["rank_pattern"]["model.layers.0.self_attn.q_proj"] == 8


def test_linear_with_rank_truncates_optimally(mixed_adapters):
    adapters = [load_adapter(path) for path in mixed_adapters]
    svd = merge_adapters(adapters, WEIGHTS, method="svd", rank=3)
    linear = merge_adapters(adapters, WEIGHTS, method="linear", rank=3)
    for name in svd.modules:
        assert rel_err(linear.modules[name].delta(), svd.modules[name].delta()) < 1e-5


@pytest.mark.parametrize("method", ["linear", "svd"])
def test_fan_in_fan_out_gpt2(method, gpt2_base, tmp_path):
    paths = [
        build_adapter(gpt2_base, tmp_path / f"g{i}", seed=i, r=r, lora_alpha=2 * r, target_modules=["c_attn", "c_fc"],
                      fan_in_fan_out=True)
        for i, r in enumerate([2, 4])
    ]  # fmt: skip
    weights = [0.7, 0.4]
    adapters = [load_adapter(path) for path in paths]
    merged = merge_adapters(adapters, weights, method=method, rank=6 if method == "svd" else None)  # 2 + 4: exact
    save_adapter(merged, tmp_path / "merged")
    assert merged.config["fan_in_fan_out"] is True
    expected = exact_sums(gpt2_base, paths, weights)
    got = merged_deltas(gpt2_base, tmp_path / "merged", expected)
    for name, delta in expected.items():
        assert delta.shape == (32, 96) or delta.shape == (32, 128)  # Conv1D weights are in x out
        assert rel_err(got[name], delta) < 1e-5, name


def test_dtype_follows_inputs_unless_asked(mixed_adapters):
    adapters = [load_adapter(path) for path in mixed_adapters]
    assert merge_adapters(adapters, WEIGHTS).modules["model.layers.0.self_attn.q_proj"].A.dtype == torch.float32
    half = merge_adapters(adapters, WEIGHTS, dtype="bfloat16")
    assert half.modules["model.layers.0.self_attn.q_proj"].A.dtype == torch.bfloat16


def test_full_space_randomized_truncation_tracks_the_exact_one(mixed_adapters):
    """``full_svd="randomized"`` (what ``auto`` picks for modules with 1024+ rows and columns) against the
    exact dense SVD of the same ties result: the same ranks, close deltas, and exact where the merged
    matrix has no more rank than kept."""
    adapters = [load_adapter(path) for path in mixed_adapters]
    exact = merge_adapters(adapters, WEIGHTS, "ties", space="full", density=0.5, full_svd="exact")
    randomized = merge_adapters(adapters, WEIGHTS, "ties", space="full", density=0.5, full_svd="randomized")
    keep_all = {"space": "full", "density": 1.0, "rank": 64, "full_svd": "randomized"}
    full_rank = merge_adapters(adapters, WEIGHTS, "magnitude_prune", **keep_all)  # the exact sum, densely
    exact_sum = merge_adapters(adapters, WEIGHTS, "cat")
    for name, module in exact.modules.items():
        other = randomized.modules[name]
        assert other.rank == module.rank
        assert rel_err(other.B @ other.A, module.B @ module.A) < 0.35
        assert rel_err(full_rank.modules[name].B @ full_rank.modules[name].A,
                       exact_sum.modules[name].B @ exact_sum.modules[name].A) < 1e-4  # fmt: skip


def test_unknown_full_svd_choice_is_refused(mixed_adapters):
    from loramerge.errors import BadInput

    with pytest.raises(BadInput, match="full_svd"):
        merge_adapters([load_adapter(mixed_adapters[0])], [1.0], "ties", full_svd="fast")
