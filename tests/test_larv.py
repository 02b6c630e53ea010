"""LARV (arXiv:2602.09413) as an option of iso_c, iso_cts and tsv_m, against a dense float64 implementation of
its definitions written here: the effective-rank contrast and commutator conflict of each module's summed update
against the base's weight, the score, the two gates, every task vector of a module scaled before the merger."""

from __future__ import annotations

import math
import re
import shutil
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from cli_helpers import run
from conftest import build_adapter, rel_err, save_tiny_gpt2, weight_delta
from loramerge import load_adapter, merge_adapters
from loramerge.adapters.dora import BaseWeights
from loramerge.adapters.layer_scales import base_effective_rank, module_diagnostics
from loramerge.adapters.model import LoraAdapter
from loramerge.errors import BadInput
from loramerge.lowrank import LowRank
from loramerge.lowrank.larv import commutator_conflict, effective_rank, tiered_scales
from loramerge.lowrank.svd import factored_svd
from test_matrix_methods import iso_c_reference, iso_cts_reference, tsv_reference

WEIGHTS = [1.0, 0.7]


@pytest.fixture(scope="module")
def larv_base(tmp_path_factory) -> Path:
    """A tiny Llama of four blocks: LARV scores blocks, and terciles of two would say little."""
    torch.manual_seed(5)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)  # fmt: skip
    path = tmp_path_factory.mktemp("larv") / "base"
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def larv_adapters(larv_base, tmp_path_factory) -> list[LoraAdapter]:
    root = tmp_path_factory.mktemp("larv_adapters")
    return [
        load_adapter(str(build_adapter(larv_base, root / "a", seed=31, r=4, lora_alpha=8))),
        load_adapter(str(build_adapter(larv_base, root / "b", seed=32, r=6, lora_alpha=6,
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
    """The scales as the definitions read, from dense float64 matrices: per block, the mean diagnostics of its
    modules; the continuous gate on the scores over their median."""
    names = sorted({name for adapter in adapters for name in adapter.modules})
    per_block: dict[int, list[tuple[float, float]]] = {}
    for name in names:
        total = sum(w * weight_delta(a, name).double() for w, a in zip(WEIGHTS, adapters, strict=True)
                    if name in a.modules)  # fmt: skip
        W = base_state[f"{name}.weight"].double()
        block = int(re.search(r"layers\.(\d+)\.", name).group(1))
        per_block.setdefault(block, []).append((dense_effective_rank(W) / dense_effective_rank(total),
                                                dense_conflict(W, total)))  # fmt: skip
    blocks = sorted(per_block)
    e = [statistics.mean(x for x, _ in per_block[b]) for b in blocks]
    c = torch.tensor([statistics.mean(y for _, y in per_block[b]) for b in blocks], dtype=torch.float64)
    z = ((c - c.mean()) / c.std(unbiased=False)).tolist()
    depth = [(b + 1) / len(blocks) for b in blocks]
    scores = [e_b * d**0.5 / (1 + math.log1p(math.exp(z_b))) for e_b, d, z_b in zip(e, depth, z, strict=True)]
    if gate == "continuous":
        middle = statistics.median(scores)
        scale = {b: 1 + 0.5 * math.tanh(3 * (s / middle - 1)) for b, s in zip(blocks, scores, strict=True)}
    else:
        order = sorted(range(len(blocks)), key=lambda i: scores[i])
        scale = {blocks[i]: tiers[min(2, int(3 * (k + 0.5) / len(blocks)))] for k, i in enumerate(order)}
    return {name: scale[int(re.search(r"layers\.(\d+)\.", name).group(1))] for name in names}


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
def test_larv_against_a_dense_implementation(method, gate, larv_adapters, larv_base):
    base_state = load_file(larv_base / "model.safetensors")
    scales = reference_scales(larv_adapters, base_state, gate)
    assert len(set(scales.values())) > 1  # the modules differ, or the test could not tell a scale from none
    merged = merge_adapters(larv_adapters, WEIGHTS, method, base=str(larv_base), params={"larv": gate})
    for name, scale in scales.items():
        holders = [(w, a) for w, a in zip(WEIGHTS, larv_adapters, strict=True) if name in a.modules]
        expected = REFERENCES[method]([weight_delta(a, name) for _, a in holders], [scale * w for w, _ in holders])
        assert rel_err(weight_delta(merged, name), expected) < 1e-5, name


@pytest.mark.parametrize("gate", ["tiered", "continuous"])
def test_core_space_equals_full_space(gate, larv_adapters, larv_base):
    core, full = (merge_adapters(larv_adapters, WEIGHTS, "iso_c", base=str(larv_base), space=space,
                                 params={"larv": gate}) for space in ("core", "full"))  # fmt: skip
    for name in core.modules:
        assert rel_err(weight_delta(core, name), weight_delta(full, name)) < 1e-5, name


def test_tiers_and_none(larv_adapters, larv_base):
    plain = merge_adapters(larv_adapters, WEIGHTS, "iso_c")
    same = merge_adapters(larv_adapters, WEIGHTS, "iso_c", base=str(larv_base), params={"larv": "tiered",
                          "larv_tiers": "1,1,1"})  # fmt: skip
    off = merge_adapters(larv_adapters, WEIGHTS, "iso_c", base=str(larv_base), params={"larv": "none"})
    for name in plain.modules:
        assert torch.equal(weight_delta(same, name), weight_delta(plain, name))
        assert torch.equal(weight_delta(off, name), weight_delta(plain, name))
    assert "larv: tiered" in same.card and "larv_tiers: 1,1,1" in same.card  # the model card records it


def test_larv_refusals(larv_adapters, larv_base, tmp_path):
    with pytest.raises(BadInput, match=r"larv=tiered compares each module's update with the base model's weight: "
                                       r"give the base model \(`base`\)"):  # fmt: skip
        merge_adapters(larv_adapters, WEIGHTS, "iso_c", params={"larv": "tiered"})
    with pytest.raises(BadInput, match=r"larv='steep' must be one of none, tiered, continuous"):
        merge_adapters(larv_adapters, WEIGHTS, "iso_c", base=str(larv_base), params={"larv": "steep"})
    with pytest.raises(BadInput, match=r"larv_tiers='1,2' must be three positive numbers"):
        merge_adapters(larv_adapters, WEIGHTS, "iso_c", base=str(larv_base), params={"larv_tiers": "1,2"})
    with pytest.raises(BadInput, match=r"method ties has no parameter 'larv'"):
        merge_adapters(larv_adapters, WEIGHTS, "ties", base=str(larv_base), params={"larv": "tiered"})
    with pytest.raises(BadInput, match=r"larv_tiers='nan,1,1' must be three positive numbers"):
        merge_adapters(larv_adapters, WEIGHTS, "iso_c", params={"larv": "tiered", "larv_tiers": "nan,1,1"})
    with pytest.raises(BadInput, match=r"parameter larv_tiers applies to larv=tiered only"):
        merge_adapters(larv_adapters, WEIGHTS, "iso_c", params={"larv": "continuous", "larv_tiers": "1,1,2"})
    one_block = [load_adapter(str(build_adapter(larv_base, tmp_path / "one", seed=3, layers_to_transform=[1])))]
    with pytest.raises(BadInput, match=r"larv=tiered scales each block of a layer stack \(model\.layers\.N\) by its "
                                       r"depth: the adapters' modules lie in 1 numbered block\(s\)"):  # fmt: skip
        merge_adapters(one_block, [1.0], "iso_c", base=str(larv_base), params={"larv": "tiered"})
    dora = [load_adapter(str(build_adapter(larv_base, tmp_path / "dora", seed=4, use_dora=True)))]
    with pytest.raises(BadInput, match=r"larv=tiered scales LoRA updates, not DoRA's normalised directions"):
        merge_adapters(dora, [1.0], "iso_c", base=str(larv_base), params={"larv": "tiered"})
    embed = build_adapter(larv_base, tmp_path / "embed", seed=5, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(BadInput, match=r"module model\.embed_tokens: larv=tiered scales linear layers"):
        merge_adapters([load_adapter(str(embed))], [1.0], "iso_c", base=str(larv_base), params={"larv": "tiered"})
    other = save_tiny_gpt2(tmp_path / "gpt2")
    with pytest.raises(BadInput, match=r"the base .* has no tensor model\.layers\.0\.mlp\.down_proj\.weight"):
        merge_adapters(larv_adapters, WEIGHTS, "iso_c", base=str(other), params={"larv": "tiered"})


def test_a_recipe_reads_the_base_its_adapters_record(larv_adapters, larv_base, tmp_path):
    """``loramerge run`` with ``larv`` and no ``base_model``: the adapters' recorded base, as RegMean does."""
    recipe = tmp_path / "recipe.yaml"
    entries = [{"adapter": str(a.path), "weight": w} for a, w in zip(larv_adapters, WEIGHTS, strict=True)]
    recipe.write_text(yaml.safe_dump({"merge_method": "iso_c", "adapters": entries,
                                      "parameters": {"larv": "tiered"}}))  # fmt: skip
    done = run("run", recipe, "-o", tmp_path / "merged")
    assert done.exit_code == 0, done.output
    expected = merge_adapters(larv_adapters, WEIGHTS, "iso_c", base=str(larv_base), params={"larv": "tiered"})
    written = load_adapter(tmp_path / "merged")
    for name in expected.modules:
        assert rel_err(weight_delta(written, name), weight_delta(expected, name)) < 1e-6, name
    refused = run("merge", *(str(a.path) for a in larv_adapters), "--param", "larv=tiered", "--base", larv_base,
                  "--via-dense", "--rank", "4", "-o", tmp_path / "dense")  # fmt: skip
    assert refused.exit_code == 2 and "merge without --via-dense" in refused.stderr, refused.output


def test_lora_bias_is_scaled_with_its_module(larv_base, tmp_path):
    """``lora_bias`` belongs to the task vector: the same block scale as the module's B A."""
    adapters = [load_adapter(str(build_adapter(larv_base, tmp_path / n, seed=s, lora_bias=True)))
                for n, s in (("a", 41), ("b", 42))]  # fmt: skip
    scales = reference_scales(adapters, load_file(larv_base / "model.safetensors"), "tiered")
    merged = merge_adapters(adapters, WEIGHTS, "iso_c", base=str(larv_base), params={"larv": "tiered"})
    for name, scale in scales.items():
        expected = sum(scale * w * a.modules[name].bias_delta() for w, a in zip(WEIGHTS, adapters, strict=True))
        assert rel_err(merged.modules[name].bias_delta(), expected) < 1e-6, name


def test_the_diagnostics_do_not_depend_on_the_thread_count():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(160, 96, generator=generator)
    update = LowRank(B=torch.randn(160, 6, generator=generator), A=torch.randn(6, 96, generator=generator))
    previous = torch.get_num_threads()
    try:
        found = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            found.append(module_diagnostics(update, weight))
    finally:
        torch.set_num_threads(previous)
    assert found[0] == found[1]


def test_the_base_ranks_are_kept_per_weight_file(larv_base, tmp_path):
    """A search or a benchmark merges one base again and again: its effective ranks are computed once, and again
    where the file changed."""
    copy = shutil.copytree(larv_base, tmp_path / "base")
    name = "model.layers.0.self_attn.q_proj"
    reader = BaseWeights(str(copy))
    first = reader.identity(name)
    kept = base_effective_rank(reader.weight(name), first)
    assert kept == base_effective_rank(reader.weight(name))
    assert base_effective_rank(torch.eye(64), first) == kept  # the identity decides, not the tensor given
    state = load_file(copy / "model.safetensors")
    state[f"{name}.weight"] = torch.eye(64)
    save_file(state, copy / "model.safetensors", metadata={"format": "pt"})
    changed = BaseWeights(str(copy)).identity(name)
    assert changed != first and base_effective_rank(torch.eye(64), changed) == pytest.approx(64.0)
