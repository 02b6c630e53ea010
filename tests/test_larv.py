"""LARV (arXiv:2602.09413) as an option of iso_c, iso_cts and tsv_m, against a dense float64 implementation of
its definitions written here: the effective-rank contrast and commutator conflict of each module's summed update
against the base's weight, the score, the two gates, every task vector of a module scaled before the merger."""

from __future__ import annotations

import math
import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_adapter, rel_err, save_tiny_gpt2, weight_delta
from loramerge import load_adapter, merge_adapters
from loramerge.adapters.model import LoraAdapter
from loramerge.errors import BadInput
from loramerge.lowrank import LowRank
from loramerge.lowrank.larv import commutator_conflict, effective_rank, tiered_scales
from loramerge.lowrank.svd import factored_svd
from test_matrix_methods import iso_c_reference, iso_cts_reference, tsv_reference

WEIGHTS = [1.0, 0.7]


@pytest.fixture(scope="module")
def larv_adapters(llama_base, tmp_path_factory) -> list[LoraAdapter]:
    root = tmp_path_factory.mktemp("larv")
    return [
        load_adapter(str(build_adapter(llama_base, root / "a", seed=31, r=4, lora_alpha=8))),
        load_adapter(str(build_adapter(llama_base, root / "b", seed=32, r=6, lora_alpha=6,
                                       target_modules=["q_proj", "v_proj", "down_proj", "up_proj"]))),
    ]  # fmt: skip


def dense_effective_rank(matrix: torch.Tensor) -> float:
    """exp of the entropy of the normalised squared singular values (above round-off)."""
    values = torch.linalg.svdvals(matrix.double())
    values = values[: int(torch.linalg.matrix_rank(matrix.float()))]
    p = values**2 / (values**2).sum()
    return math.exp(-float((p * p.log()).sum()))


def dense_conflict(base: torch.Tensor, delta: torch.Tensor) -> float:
    W, D = base.double(), delta.double()
    left = torch.linalg.matrix_norm(W @ D.T - D @ W.T)
    right = torch.linalg.matrix_norm(W.T @ D - D.T @ W)
    return float((left + right) / 2 / (torch.linalg.matrix_norm(W) * torch.linalg.matrix_norm(D)))


def reference_scales(adapters, base_state, gate: str, tiers=(0.5, 1.0, 1.5)) -> dict[str, float]:
    """The scales as the definitions read, from dense float64 matrices."""
    names = sorted({name for adapter in adapters for name in adapter.modules})
    rows = []
    for name in names:
        total = sum(w * weight_delta(a, name).double() for w, a in zip(WEIGHTS, adapters, strict=True)
                    if name in a.modules)  # fmt: skip
        W = base_state[f"{name}.weight"].double()
        e = dense_effective_rank(W) / dense_effective_rank(total)
        block = int(re.search(r"layers\.(\d+)\.", name).group(1))
        rows.append((name, e, dense_conflict(W, total), (block + 1) / 2))  # the tiny Llama has 2 blocks
    conflicts = torch.tensor([row[2] for row in rows], dtype=torch.float64)
    z = (conflicts - conflicts.mean()) / conflicts.std(unbiased=False)
    scores = [e * d**0.5 / (1 + math.log1p(math.exp(zi))) for (_, e, _, d), zi in zip(rows, z.tolist(), strict=True)]
    if gate == "continuous":
        return {row[0]: 1 + 0.5 * math.tanh(3 * (s - 1)) for row, s in zip(rows, scores, strict=True)}
    order = sorted(range(len(rows)), key=lambda i: scores[i])
    return {rows[i][0]: tiers[min(2, int(3 * (k + 0.5) / len(rows)))] for k, i in enumerate(order)}


REFERENCES = {
    "iso_c": lambda tasks, weights: iso_c_reference(tasks, weights, 1.0),
    "iso_cts": lambda tasks, weights: iso_cts_reference(tasks, weights, 1.0, 0.8),
    "tsv_m": lambda tasks, weights: tsv_reference(tasks, weights, 1.0, 1 / len(tasks)),  # keep=0: 1/n
}


def test_the_diagnostics_against_their_dense_definitions():
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(40, 30, generator=generator, dtype=torch.float64)
    term = LowRank(B=torch.randn(40, 5, generator=generator, dtype=torch.float64),
                   A=torch.randn(5, 30, generator=generator, dtype=torch.float64))  # fmt: skip
    left, values, right = factored_svd(term)
    delta = term.B @ term.A
    assert abs(commutator_conflict(W, left, values, right) - dense_conflict(W, delta)) < 1e-10
    assert abs(effective_rank(values) - dense_effective_rank(delta)) < 1e-9
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert effective_rank(torch.tensor([3.0, 0.0])) == pytest.approx(1.0)
    symmetric = W[:30] + W[:30].T  # a symmetric update commuting with the identity: no conflict
    s_left, s_values, s_right_t = torch.linalg.svd(symmetric)
    assert commutator_conflict(torch.eye(30, dtype=torch.float64), s_left, s_values, s_right_t.T) < 1e-7  # √(round-off)


def test_tiers_are_terciles_by_rank():
    scores = torch.tensor([0.3, 5.0, 1.0, 0.1, 2.0, 0.2])
    assert tiered_scales(scores, (0.5, 1.0, 1.5)).tolist() == [1.0, 1.5, 1.0, 0.5, 1.5, 0.5]
    assert tiered_scales(torch.tensor([4.0]), (0.5, 1.0, 1.5)).tolist() == [1.0]  # one module: the middle tier


@pytest.mark.parametrize(("method", "gate"), [("iso_c", "tiered"), ("iso_c", "continuous"), ("iso_cts", "tiered"),
                                              ("tsv_m", "continuous")])  # fmt: skip
def test_larv_against_a_dense_implementation(method, gate, larv_adapters, llama_base):
    base_state = load_file(llama_base / "model.safetensors")
    scales = reference_scales(larv_adapters, base_state, gate)
    assert len(set(scales.values())) > 1  # the modules differ, or the test could not tell a scale from none
    merged = merge_adapters(larv_adapters, WEIGHTS, method, base=str(llama_base), params={"larv": gate})
    for name, scale in scales.items():
        holders = [(w, a) for w, a in zip(WEIGHTS, larv_adapters, strict=True) if name in a.modules]
        expected = REFERENCES[method]([weight_delta(a, name) for _, a in holders], [scale * w for w, _ in holders])
        assert rel_err(weight_delta(merged, name), expected) < 1e-5, name


@pytest.mark.parametrize("gate", ["tiered", "continuous"])
def test_core_space_equals_full_space(gate, larv_adapters, llama_base):
    core, full = (merge_adapters(larv_adapters, WEIGHTS, "iso_c", base=str(llama_base), space=space,
                                 params={"larv": gate}) for space in ("core", "full"))  # fmt: skip
    for name in core.modules:
        assert rel_err(weight_delta(core, name), weight_delta(full, name)) < 1e-5, name


def test_tiers_and_none(larv_adapters, llama_base):
    plain = merge_adapters(larv_adapters, WEIGHTS, "iso_c")
    same = merge_adapters(larv_adapters, WEIGHTS, "iso_c", base=str(llama_base), params={"larv": "tiered",
                          "larv_tiers": "1,1,1"})  # fmt: skip
    off = merge_adapters(larv_adapters, WEIGHTS, "iso_c", base=str(llama_base), params={"larv": "none"})
    for name in plain.modules:
        assert torch.equal(weight_delta(same, name), weight_delta(plain, name))
        assert torch.equal(weight_delta(off, name), weight_delta(plain, name))
    assert "larv: tiered" in same.card and "larv_tiers: 1,1,1" in same.card  # the model card records it


def test_larv_refusals(larv_adapters, llama_base, tmp_path):
    with pytest.raises(BadInput, match=r"larv=tiered compares each module's update with the base model's weight: "
                                       r"give the base model \(`base`\)"):  # fmt: skip
        merge_adapters(larv_adapters, WEIGHTS, "iso_c", params={"larv": "tiered"})
    with pytest.raises(BadInput, match=r"larv='steep' must be one of none, tiered, continuous"):
        merge_adapters(larv_adapters, WEIGHTS, "iso_c", base=str(llama_base), params={"larv": "steep"})
    with pytest.raises(BadInput, match=r"larv_tiers='1,2' must be three positive numbers"):
        merge_adapters(larv_adapters, WEIGHTS, "iso_c", base=str(llama_base), params={"larv_tiers": "1,2"})
    with pytest.raises(BadInput, match=r"method ties has no parameter 'larv'"):
        merge_adapters(larv_adapters, WEIGHTS, "ties", base=str(llama_base), params={"larv": "tiered"})
    other = save_tiny_gpt2(tmp_path / "gpt2")
    with pytest.raises(BadInput, match=r"the base .* has no tensor model\.layers\.0\.mlp\.down_proj\.weight"):
        merge_adapters(larv_adapters, WEIGHTS, "iso_c", base=str(other), params={"larv": "tiered"})
