"""``fold`` equals PEFT's merge_and_unload; 4-bit bases fold to dense and back to 4-bit; ``extract``
recovers the truncated SVD of MODEL - BASE."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from cli_helpers import run
from conftest import build_adapter, save_tiny_gpt2
from dense_helpers import load_weights, save_llama

TOKENS = torch.tensor([[3, 17, 42, 5, 99, 64, 1, 8]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits.float()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("fold")
    base = save_llama(root / "base", 0)
    adapters = {
        "plain": build_adapter(base, root / "plain", seed=1, r=4, lora_alpha=8),
        "embed_rslora": build_adapter(base, root / "embed", seed=2, r=8, lora_alpha=4, use_rslora=True,
                                      target_modules=["q_proj", "v_proj", "embed_tokens"]),
        "saved_head": build_adapter(base, root / "head", seed=3, r=2, target_modules=["o_proj"],
                                    modules_to_save=["lm_head"]),
    }  # fmt: skip
    return root, base, adapters


def peft_merged(base, adapter):
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()


@pytest.mark.parametrize("kind", ["plain", "embed_rslora", "saved_head"])
def test_fold_equals_merge_and_unload(kind, llama, tmp_path):
    _, base, adapters = llama
    result = run("fold", adapters[kind], "--base", base, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    reference = peft_merged(base, adapters[kind])
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert (logits(ours) - logits(reference)).abs().max().item() < 1e-5
    ours_state, reference_state, base_state = ours.state_dict(), reference.state_dict(), load_weights(base)
    for name, tensor in base_state.items():
        if torch.equal(reference_state[name], tensor):  # untouched by the adapter: bit for bit
            assert torch.equal(ours_state[name], tensor), name
    assert (logits(ours) - logits(AutoModelForCausalLM.from_pretrained(base))).abs().max() > 1e-3


def test_fold_fan_in_fan_out_gpt2(tmp_path):
    base = save_tiny_gpt2(tmp_path / "gpt2")
    adapter = build_adapter(base, tmp_path / "lora", seed=4, r=2, lora_alpha=4, target_modules=["c_attn"],
                            fan_in_fan_out=True)  # fmt: skip
    assert run("fold", adapter, "--base", base, "-o", tmp_path / "out").exit_code == 0
    reference = peft_merged(base, adapter)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert (ours(tokens).logits - reference(tokens).logits).abs().max().item() < 1e-5


def test_merge_fold_into_equals_fold_of_the_merged_adapter(llama, tmp_path):
    _, base, adapters = llama
    pair = [adapters["plain"], adapters["embed_rslora"]]
    assert run("merge", *pair, "--method", "ties", "--density", "0.5", "-o", tmp_path / "adapter").exit_code == 0
    assert run("fold", tmp_path / "adapter", "--base", base, "-o", tmp_path / "two_steps").exit_code == 0
    result = run("merge", *pair, "--method", "ties", "--density", "0.5", "--fold-into", base, "-o", tmp_path / "one")
    assert result.exit_code == 0, result.output
    one, two = load_weights(tmp_path / "one"), load_weights(tmp_path / "two_steps")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


QUANTIZED = [("nf4", True), ("nf4", False), ("fp4", True)]


@pytest.mark.parametrize(("quant_type", "double_quant"), QUANTIZED)
def test_fold_into_4bit_base_dense_and_requantized(quant_type, double_quant, llama, tmp_path):
    _, base, adapters = llama
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    four_bit = tmp_path / "base4"
    AutoModelForCausalLM.from_pretrained(base, quantization_config=config, dtype=torch.float32).save_pretrained(
        four_bit
    )
    adapter = adapters["plain"]
    # the unmerged QLoRA model: the 4-bit base and the adapter, as PEFT runs it
    qlora = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(four_bit, dtype=torch.float32), adapter
    )  # fmt: skip
    assert run("fold", adapter, "--base", four_bit, "-o", tmp_path / "dense", "--dtype", "float32").exit_code == 0
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert not json.loads((tmp_path / "dense" / "config.json").read_text()).get("quantization_config")
    # independent reference: transformers' own dequantize() of the 4-bit base, then PEFT's merge_and_unload
    dequantized = AutoModelForCausalLM.from_pretrained(four_bit, dtype=torch.float32).dequantize()
    reference = PeftModel.from_pretrained(dequantized, adapter).merge_and_unload()
    assert (logits(dense) - logits(reference)).abs().max().item() < 1e-5
    assert (logits(dense) - logits(qlora)).abs().max().item() < 1e-2  # bitsandbytes' 4-bit matmul rounds too
    result = run("fold", adapter, "--base", four_bit, "-o", tmp_path / "q", "--quantize", "--quant-type", quant_type,
                 *([] if double_quant else ["--no-double-quant"]))  # fmt: skip
    assert result.exit_code == 0, result.output
    requantized = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert type(requantized.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert requantized.generate(TOKENS[:, :3], max_new_tokens=4, do_sample=False).shape == (1, 7)
    assert dense.generate(TOKENS[:, :3], max_new_tokens=4, do_sample=False).shape == (1, 7)
    error = (logits(requantized) - logits(qlora)).abs().max().item()
    assert 0 < error < 0.5 * logits(qlora).abs().max().item()  # rounding again costs a little, not everything


def test_from_dequantized_matches_folding_into_the_4bit_base(llama, tmp_path):
    _, base, adapters = llama
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    AutoModelForCausalLM.from_pretrained(base, quantization_config=config, dtype=torch.float32).save_pretrained(
        tmp_path / "base4"
    )
    adapter = adapters["plain"]
    assert run("fold", adapter, "--base", tmp_path / "base4", "-o", tmp_path / "a", "--dtype", "float32").exit_code == 0
    result = run("fold", adapter, "--base", base, "-o", tmp_path / "b", "--from-dequantized", "--quant-type", "nf4")
    assert result.exit_code == 0, result.output
    a, b = load_weights(tmp_path / "a"), load_weights(tmp_path / "b")
    assert all((a[k] - b[k]).abs().max() < 1e-6 for k in a)
    original = load_weights(base)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(b[name], original[name])  # rounded to 4-bit like the training base


@pytest.mark.parametrize("fast", [False, True])
def test_extract_full_rank_and_truncated(fast, llama, tmp_path):
    _, base, _ = llama
    tuned = save_llama(tmp_path / "tuned", 5, like=base)
    full = run("extract", tuned, "--base", base, "-o", tmp_path / "full", "--rank", "64", *(["--fast"] if fast else []))
    assert full.exit_code == 0, full.output
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "full")
    tuned_state, base_state = load_weights(tuned), load_weights(base)
    name = "model.layers.1.mlp.down_proj"
    layer = model.base_model.model.get_submodule(name)
    delta = tuned_state[f"{name}.weight"] - base_state[f"{name}.weight"]
    assert ((layer.get_delta_weight("default") - delta).norm() / delta.norm()).item() < 1e-5
    embed = model.base_model.model.get_submodule("model.embed_tokens").get_delta_weight("default")
    embed_delta = tuned_state["model.embed_tokens.weight"] - base_state["model.embed_tokens.weight"]
    assert ((embed - embed_delta).norm() / embed_delta.norm()).item() < 1e-5
    if fast:
        return
    assert run("extract", tuned, "--base", base, "-o", tmp_path / "r4", "--rank", "4").exit_code == 0
    low = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "r4")
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    best = (U[:, :4] * S[:4]) @ Vh[:4]
    got = low.base_model.model.get_submodule(name).get_delta_weight("default")
    assert ((got - best).norm() / best.norm()).item() < 1e-5


def best_residual(delta: torch.Tensor, rank: int) -> float:
    """‖Δ − Δ_k‖_F / ‖Δ‖_F of the best rank-k approximation (Eckart–Young–Mirsky), by ``torch.linalg.svd``."""
    values = torch.linalg.svdvals(delta.double())
    return (values[rank:].norm() / values.norm()).item()


def test_extract_fast_is_seeded_and_near_the_best_rank_k(llama, tmp_path):
    """Two ``extract --fast`` runs write the same bytes whatever the process drew before (the sketch was
    unseeded), and each module's randomized truncation is within 2 % of the best residual."""
    _, base, _ = llama
    tuned = save_llama(tmp_path / "tuned", 7, like=base)
    written = []
    for run_index, earlier_seed in enumerate((1, 2)):
        torch.manual_seed(earlier_seed)  # what the process drew before must not matter
        torch.rand(5)
        out = tmp_path / f"fast{run_index}"
        result = run("extract", tuned, "--base", base, "-o", out, "--rank", "4", "--fast")
        assert result.exit_code == 0, result.output
        written.append((out / "adapter_model.safetensors").read_bytes())
    assert written[0] == written[1]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "fast0")
    tuned_state, base_state = load_weights(tuned), load_weights(base)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"):
        delta = tuned_state[f"{name}.weight"] - base_state[f"{name}.weight"]
        got = model.base_model.model.get_submodule(name).get_delta_weight("default")
        best = best_residual(delta, 4)
        residual = ((delta - got).norm() / delta.norm()).item()
        assert best <= residual * (1 + 1e-5) and residual <= 1.02 * best, (name, residual, best)


def test_extract_reports_the_energy_the_svd_captures(llama, tmp_path):
    from loramerge.folding.extract import extract_lora

    _, base, _ = llama
    tuned = save_llama(tmp_path / "tuned", 8, like=base)
    tuned_state, base_state = load_weights(tuned), load_weights(base)
    for fast in (False, True):
        result = extract_lora(str(tuned), str(base), 4, fast=fast)
        name = "model.layers.0.mlp.gate_proj"
        delta = tuned_state[f"{name}.weight"] - base_state[f"{name}.weight"]
        values = torch.linalg.svdvals(delta.double())
        best = (values[:4].pow(2).sum() / values.pow(2).sum()).item()
        kept = (result.adapter.modules[name].delta().double().norm() / delta.double().norm()).item() ** 2
        assert result.energy[name] == pytest.approx(kept, rel=1e-4)  # the energy of what was written
        if fast:  # the range finder keeps at most the best rank-4 subspace's energy
            assert result.energy[name] <= best * (1 + 1e-5)
        else:
            assert result.energy[name] == pytest.approx(best, rel=1e-5)


def test_fold_bad_inputs(llama, tmp_path):
    _, base, adapters = llama
    other = save_llama(tmp_path / "other", 6, hidden=32)
    cases = [
        (["fold", adapters["plain"], "--base", other], "module model.layers.0"),  # shapes differ
        (["fold", adapters["embed_rslora"], "--base", tmp_path / "gpt2"], "no such folder"),
        (
            ["fold", adapters["plain"], "--base", base, "--quantize", "--quant-type", "int3"],
            "--quant-type must be nf4 or fp4",
        ),
        (["extract", base, "--base", other, "-o", tmp_path / "x", "--rank", "4"], "has shape"),
    ]
    gpt2 = save_tiny_gpt2(tmp_path / "gpt2b")
    cases.append((["fold", adapters["plain"], "--base", gpt2], "has no tensor"))
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(base).save_pretrained(sharded, max_shard_size="100KB")
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.unlink()
    cases.append((["fold", adapters["plain"], "--base", sharded], shard.name))
    for args, message in cases:
        out = tmp_path / "out"
        result = run(*args, *([] if "-o" in args else ["-o", out]))
        assert result.exit_code == 2, (args, result.output)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)
        assert not out.exists() and not (tmp_path / "x").exists()
    shutil.rmtree(sharded)
