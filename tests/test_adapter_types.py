"""DoRA, LoHa, LoKr and lora_bias adapters merge exactly: checked against PEFT's own folding.

The reference for every case is PEFT's code, not ours: each input adapter is folded by PEFT's
``merge_and_unload``, its delta is the folded model minus the base, and a linear merge must equal
``W0 + Σ w_i Δ_i``. The merged adapter is then loaded and folded by PEFT too, and folded by ``loramerge fold``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import rel_err
from loramerge import load_adapter, merge_adapters, save_adapter
from loramerge.errors import BadInput
from loramerge.folding.stream import fold
from loramerge.lowrank import LowRank
from loramerge.lowrank.structured import full_factors, hadamard_factors, kronecker_factors

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def save_base(path: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=128, max_position_embeddings=64, attention_bias=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def build(base: Path, out: Path, config, seed: int) -> Path:
    """A PEFT adapter with random weights; DoRA magnitudes moved off the base's norms (else ``g = 1``)."""
    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.3 * torch.randn_like(parameter))
            elif "lora_B" in name and "bias" in name:
                parameter.copy_(torch.randn_like(parameter))
    peft_model.save_pretrained(out)
    return out


def folded_state(base: Path, adapter: Path | None) -> dict[str, torch.Tensor]:
    """PEFT's fold of ``adapter`` into ``base`` (the base itself for None), float32."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {key: value.detach().float().clone() for key, value in model.state_dict().items()}


def expected_state(base: Path, adapters: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """``W0 + Σ w_i (PEFT's fold of adapter i − W0)`` for every tensor."""
    start = folded_state(base, None)
    result = {key: value.clone() for key, value in start.items()}
    for adapter, weight in zip(adapters, weights, strict=True):
        for key, value in folded_state(base, adapter).items():
            result[key] += weight * (value - start[key])
    return result


def assert_same_fold(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], base: dict[str, torch.Tensor]):
    """Every changed tensor's delta within 1e-5 relative; nothing else moved."""
    changed = 0
    for key, value in want.items():
        delta = value - base[key]
        if delta.abs().max() == 0:
            assert torch.equal(got[key], base[key]), key
            continue
        changed += 1
        assert rel_err(got[key] - base[key], delta) < 1e-5, (key, rel_err(got[key] - base[key], delta))
    assert changed > 0


@pytest.fixture(scope="module")
def typed(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("types")
    base = save_base(root / "base")
    lora = dict(target_modules=TARGETS, init_lora_weights=False)
    lycoris = dict(target_modules=TARGETS, init_weights=False)
    configs = {
        "dora4": LoraConfig(r=4, lora_alpha=8, use_dora=True, **lora),
        "dora2": LoraConfig(r=2, lora_alpha=3, use_dora=True, rank_pattern={"down_proj": 6}, **lora),
        "lora3": LoraConfig(r=3, lora_alpha=5, **{**lora, "target_modules": ["q_proj", "k_proj"]}),
        "bias": LoraConfig(r=2, lora_alpha=4, lora_bias=True, **{**lora, "target_modules": ["q_proj", "v_proj"]}),
        "loha": LoHaConfig(r=3, alpha=6, **lycoris),
        "lokr": LoKrConfig(r=2, alpha=3, **lycoris),
        "lokr_both": LoKrConfig(r=2, alpha=5, decompose_both=True, **{**lycoris, "target_modules": ["o_proj"]}),
    }
    paths = {"base": base}
    for seed, (name, config) in enumerate(configs.items(), start=1):
        paths[name] = build(base, root / name, config, seed)
    return paths


CASES = {
    "one DoRA gives back its own delta": (["dora4"], [1.0]),
    "DoRA + DoRA, mixed ranks, a negative weight": (["dora4", "dora2"], [0.7, -0.4]),
    "DoRA + LoRA": (["dora2", "lora3"], [0.5, 1.2]),
    "LoHa": (["loha"], [0.8]),
    "LoKr, one factor decomposed and both": (["lokr", "lokr_both"], [1.0, 0.6]),
    "LoHa + LoKr + LoRA, a negative weight": (["loha", "lokr", "lora3"], [0.9, -0.5, 0.4]),
    "lora_bias + LoRA": (["bias", "lora3"], [0.6, 0.8]),
    "DoRA + LoHa + LoRA": (["dora4", "loha", "lora3"], [0.5, 0.5, -0.3]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_linear_merge_equals_the_sum_of_peft_folds(case, typed, tmp_path):
    names, weights = CASES[case]
    base = typed["base"]
    paths = [typed[name] for name in names]
    merged = merge_adapters([load_adapter(p) for p in paths], weights, "linear", base=str(base))
    out = save_adapter(merged, tmp_path / "merged")
    start = folded_state(base, None)
    want = expected_state(base, paths, weights)
    assert_same_fold(folded_state(base, out), want, start)  # PEFT loads the output and folds it
    folded = fold(load_adapter(out), str(base), tmp_path / "folded")
    assert_same_fold(folded_state(folded, None), want, start)  # loramerge's own fold agrees
    is_dora = any(load_adapter(p).config.get("use_dora") for p in paths)
    assert merged.config["use_dora"] is is_dora and (merged.kind.startswith("DoRA") if is_dora else True)


def test_dora_without_a_base_is_refused(typed):
    with pytest.raises(BadInput, match=r"is a DoRA adapter: merging it needs the base model's weights"):
        merge_adapters([load_adapter(typed["dora4"])], [1.0], "linear")


def test_dora_with_lora_bias_is_refused(typed):
    adapters = [load_adapter(typed[name]) for name in ("dora4", "bias")]
    with pytest.raises(BadInput, match=r"cannot merge into one adapter: PEFT refuses DoRA with lora_bias"):
        merge_adapters(adapters, [1.0, 1.0], "linear", base=str(typed["base"]))


def test_dora_with_a_base_of_another_shape_is_refused(typed, tmp_path):
    other = tmp_path / "other"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=4, vocab_size=128)).save_pretrained(other)  # fmt: skip
    expected = r"down_proj: the base .* has a \(32, 48\) weight, the adapters' delta is \(64, 96\)"
    with pytest.raises(BadInput, match=expected):
        merge_adapters([load_adapter(typed["dora4"])], [1.0], "linear", base=str(other))


def test_every_method_runs_on_every_type(typed):
    """Every method of the catalogue on DoRA + LoHa + LoRA (a DoRA output) and on LoKr + lora_bias + LoRA (a
    LoRA output with biases): finite factors, magnitudes and biases."""
    from loramerge import catalogue

    dora_set = [load_adapter(typed[name]) for name in ("dora4", "loha", "lora3")]
    bias_set = [load_adapter(typed[name]) for name in ("lokr", "bias", "lora3")]
    for method in catalogue.adapter_methods():
        if catalogue.method(method).calibrated:  # merges with activations: tests/test_regmean.py
            continue
        merged = merge_adapters(dora_set, [1.0, 0.5, 0.7], method, base=str(typed["base"]), density=0.8)
        assert merged.config["use_dora"] and all(m.magnitude is not None for m in merged.modules.values()), method
        assert all(torch.isfinite(m.magnitude).all() for m in merged.modules.values()), method
        merged = merge_adapters(bias_set, [1.0, 0.5, 0.7], method, density=0.8)
        assert merged.config["lora_bias"] and not merged.config["use_dora"], method
        biased = [m for m in merged.modules.values() if m.bias is not None and m.bias.abs().max() > 0]
        assert biased and all(torch.isfinite(m.B).all() for m in merged.modules.values()), method


def test_structured_factors_equal_their_dense_products():
    torch.manual_seed(0)
    first, second = (LowRank(torch.randn(12, 3), torch.randn(3, 10)) for _ in range(2))
    assert torch.allclose(hadamard_factors(first, second).dense(), first.dense() * second.dense(), atol=1e-5)
    small = LowRank(torch.randn(4, 2), torch.randn(2, 5))
    wide = torch.randn(3, 7)
    product = kronecker_factors(small, full_factors(wide))
    assert product.rank == 2 * 3
    assert torch.allclose(product.dense(), torch.kron(small.dense(), wide), atol=1e-5)


def test_live_add_weighted_adapter_merges_dora_exactly(typed):
    from loramerge import add_weighted_adapter

    base = typed["base"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, typed["dora4"], adapter_name="dora")
    model.load_adapter(typed["lora3"], adapter_name="plain")
    add_weighted_adapter(model, ["dora", "plain"], [0.8, -0.6], "merged", method="linear")
    model.set_adapter("merged")
    got = {key: value.detach().float() for key, value in model.merge_and_unload().state_dict().items()}
    start = folded_state(base, None)
    assert_same_fold(got, expected_state(base, [typed["dora4"], typed["lora3"]], [0.8, -0.6]), start)


def test_live_loha_model_is_refused_with_the_way_that_works(typed):
    from loramerge import add_weighted_adapter

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(typed["base"]), typed["loha"])
    with pytest.raises(BadInput, match=r"the model holds LOHA adapters, and PEFT adds a LoRA adapter only beside"):
        add_weighted_adapter(model, ["default"], [1.0], "merged", method="linear")


def test_cli_merges_dora_with_a_base_and_folds_it(typed, tmp_path):
    from cli_helpers import run

    base, paths, weights = typed["base"], [typed["dora2"], typed["loha"]], [0.9, 0.4]
    result = run("merge", *paths, "--weights", "0.9,0.4", "--method", "linear", "--base", base, "-o", tmp_path / "m")
    assert result.exit_code == 0, result.output
    start, want = folded_state(base, None), expected_state(base, paths, weights)
    assert_same_fold(folded_state(base, tmp_path / "m"), want, start)
    # --fold-into is the base when --base is not given
    result = run("merge", *paths, "--weights", "0.9,0.4", "--method", "linear", "--fold-into", base, "-o",
                 tmp_path / "f")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert_same_fold(folded_state(tmp_path / "f", None), want, start)
    inspected = run("inspect", *paths)
    assert inspected.exit_code == 0 and "DoRA" in inspected.output and "LoHa" in inspected.output


def test_adapter_recipe_with_base_model_merges_dora(typed, tmp_path):
    import yaml

    from cli_helpers import run

    entries = [{"adapter": str(typed["dora4"]), "weight": 0.5}, {"adapter": str(typed["lokr"]), "weight": 1.0}]
    recipe = {"merge_method": "linear", "base_model": str(typed["base"]), "adapters": entries}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    result = run("run", tmp_path / "r.yml", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    want = expected_state(typed["base"], [typed["dora4"], typed["lokr"]], [0.5, 1.0])
    assert_same_fold(folded_state(typed["base"], tmp_path / "out"), want, folded_state(typed["base"], None))


@pytest.fixture(scope="module")
def ia3(typed, tmp_path_factory) -> list[Path]:
    from peft import IA3Config

    root = tmp_path_factory.mktemp("ia3")
    configs = [IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"],
                         init_ia3_weights=False),
               IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"],
                         init_ia3_weights=False)]  # fmt: skip
    return [build(typed["base"], root / f"ia3-{i}", config, seed=20 + i) for i, config in enumerate(configs)]


def test_ia3_merges_through_peft_fold_exactly(typed, ia3, tmp_path):
    from cli_helpers import run

    base, paths, weights = typed["base"], [*ia3, typed["lora3"]], [0.7, 1.1, -0.5]
    result = run("merge", *paths, "--weights", "0.7,1.1,-0.5", "--method", "linear", "--fold-into", base, "-o",
                 tmp_path / "folded")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "(IA3): no low-rank form, so every input was merged through PEFT's fold" in " ".join(result.output.split())
    start, want = folded_state(base, None), expected_state(base, paths, weights)
    assert_same_fold(folded_state(tmp_path / "folded", None), want, start)


def test_ia3_merge_extracted_as_lora_reports_its_error(typed, ia3, tmp_path):
    from cli_helpers import run

    base = typed["base"]
    result = run("merge", *ia3, "--method", "ties", "--density", "0.5", "--via-dense", "--base", base, "--rank", "4",
                 "-o", tmp_path / "lora")  # fmt: skip
    assert result.exit_code == 0, result.output
    reported = float(" ".join(result.output.split()).split("relative error ")[1].split(" ")[0])
    # the error the written adapter really has: PEFT's fold of it against the exact ties merge of the deltas
    from loramerge.adapters.options import parse_options
    from loramerge.dense.peft_fold import merge_dense_deltas

    exact = merge_dense_deltas(str(base), [str(p) for p in ia3], [1.0, 1.0],
                               parse_options(method="ties", density=0.5), ["IA3", "IA3"])  # fmt: skip
    start, got = folded_state(base, None), folded_state(base, tmp_path / "lora")
    lost = sum((got[k] - start[k] - d).square().sum() for k, d in exact.deltas.items() if d.dim() == 2)
    total = sum(d.square().sum() for d in exact.deltas.values() if d.dim() == 2)
    assert 0 < reported < 1 and abs(reported - float((lost / total).sqrt())) < 1e-3
    assert load_adapter(tmp_path / "lora").modules  # a plain LoRA loramerge (and PEFT, above) reads


def test_dora_on_a_4bit_base_uses_its_dequantized_weights(tmp_path):
    """A DoRA merge whose base is a bitsandbytes 4-bit checkpoint: the row norms come from its dequantized
    weights, so the merge equals the sum of PEFT's folds into transformers' own ``dequantize()`` of it."""
    from transformers import BitsAndBytesConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=128)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "float")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    four_bit = tmp_path / "base4"
    AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=quantization).save_pretrained(four_bit)
    dequantized = tmp_path / "dequantized"
    AutoModelForCausalLM.from_pretrained(four_bit, dtype=torch.float32).dequantize().save_pretrained(dequantized)
    lora = dict(target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    paths = [build(dequantized, tmp_path / "dora", LoraConfig(r=4, use_dora=True, **lora), seed=1),
             build(dequantized, tmp_path / "plain", LoraConfig(r=2, **lora), seed=2)]  # fmt: skip
    merged = merge_adapters([load_adapter(p) for p in paths], [0.6, 0.9], "linear", base=str(four_bit))
    out = save_adapter(merged, tmp_path / "merged")
    start = folded_state(dequantized, None)
    assert_same_fold(folded_state(dequantized, out), expected_state(dequantized, paths, [0.6, 0.9]), start)


def test_output_norms_reuse_the_inputs_products_exactly():
    """A merge's output in the span of its inputs' A (core space, linear) reuses ``W0 Sᵀ``; any other output
    (the full space's truncation) takes one more product: both give ‖W0 + B A‖ of each row, as the dense sum."""
    from loramerge.adapters.dora import base_products, output_norms

    torch.manual_seed(0)
    weight = torch.randn(40, 30)
    terms = [LowRank(torch.randn(40, r), torch.randn(r, 30)) for r in (3, 5)]
    products = base_products(weight, terms)
    stacked = torch.cat([t.A for t in terms])
    in_span = LowRank(torch.randn(40, 4), torch.randn(4, 8) @ stacked)
    outside = LowRank(torch.randn(40, 4), torch.randn(4, 30))
    for term in (in_span, outside):
        dense = torch.linalg.vector_norm(weight + term.dense(), dim=1)
        assert rel_err(output_norms(products, weight, term), dense) < 1e-5


def test_dora_in_the_factor_space_uses_the_row_scales(typed):
    """PEFT's factor space on one DoRA adapter at weight 1 is a copy: it must keep ``diag(g)`` in ``B``."""
    base = typed["base"]
    merged = merge_adapters([load_adapter(typed["dora4"])], [1.0], "linear", base=str(base), space="factors")
    want = expected_state(base, [typed["dora4"]], [1.0])
    assert_same_fold(folded_state_of(base, merged), want, folded_state(base, None))


def folded_state_of(base: Path, adapter) -> dict[str, torch.Tensor]:
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        return folded_state(base, save_adapter(adapter, Path(scratch) / "adapter"))


def test_bias_beside_a_plain_lora_module_folds_into_a_base_without_that_bias(typed, tmp_path):
    """A merge gives every module a bias, zero where no input had one; the MLP of this base has no bias, and
    the zero bias must not stop the fold."""
    mlp = build(
        typed["base"], tmp_path / "mlp", LoraConfig(r=2, target_modules=["down_proj"], init_lora_weights=False), 9
    )
    paths, weights = [typed["bias"], mlp], [0.7, 1.0]
    merged = merge_adapters([load_adapter(p) for p in paths], weights, "linear")
    folded = fold(merged, str(typed["base"]), tmp_path / "folded")
    start = folded_state(typed["base"], None)
    assert_same_fold(folded_state(folded, None), expected_state(typed["base"], paths, weights), start)


def test_lora_bias_beside_an_embedding_lora_is_refused(typed, tmp_path):
    embed = build(
        typed["base"], tmp_path / "embed", LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights=False), 8
    )
    with pytest.raises(BadInput, match=r"embed_tokens: an embedding LoRA cannot be part of a lora_bias output"):
        merge_adapters([load_adapter(typed["bias"]), load_adapter(embed)], [1.0, 1.0], "linear")


def test_live_dora_on_gpt2_conv1d(tmp_path):
    """GPT-2's Conv1D stores weights in x out: the live base reader must turn its shape round as its weight."""
    from conftest import save_tiny_gpt2
    from loramerge import add_weighted_adapter

    base = save_tiny_gpt2(tmp_path / "gpt2")
    config = LoraConfig(r=2, target_modules=["c_attn", "c_fc"], use_dora=True, fan_in_fan_out=True,
                        init_lora_weights=False)  # fmt: skip
    dora = build(base, tmp_path / "dora", config, seed=3)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), dora)
    add_weighted_adapter(model, ["default"], [0.7], "merged", method="linear")
    model.set_adapter("merged")
    got = {key: value.detach().float() for key, value in model.merge_and_unload().state_dict().items()}
    assert_same_fold(got, expected_state(base, [dora], [0.7]), folded_state(base, None))


@pytest.mark.parametrize("name", ["loha", "lokr", "dora4", "bias"])
def test_inspect_counts_the_tensors_the_file_holds(typed, name):
    """LoHa and LoKr are merged as expanded factors, but their size is what the file stores."""
    from safetensors.torch import load_file

    from loramerge.adapters.inspect import summarize_adapter

    stored = sum(t.numel() for t in load_file(typed[name] / "adapter_model.safetensors").values())
    assert summarize_adapter(load_adapter(typed[name])).parameters == stored


def test_lokr_core_space_from_the_kronecker_sides_equals_the_stacked_qr(typed, tmp_path, monkeypatch):
    """Merging LoKr adapters in a core space built from their Kronecker sides gives what the QR of the stacked
    factors gives, for every method that may use any basis; the fast path is taken for every module."""
    from dataclasses import replace

    import loramerge.adapters.merge as merge_module
    from loramerge import catalogue

    second = build(typed["base"], tmp_path / "lokr2", LoKrConfig(r=3, alpha=2, target_modules=TARGETS,
                                                                 init_weights=False), 21)  # fmt: skip
    inputs = [load_adapter(typed["lokr"]), load_adapter(second)]
    plain = [replace(a, modules={n: replace(m, kronecker=None) for n, m in a.modules.items()}) for a in inputs]
    taken = []
    real = merge_module.kronecker_core
    monkeypatch.setattr(merge_module, "kronecker_core", lambda *args: taken.append(real(*args)) or taken[-1])
    methods = [m.name for m in catalogue.methods() if m.any_basis and m.adapters]
    assert {"iso_c", "iso_cts", "tsv_m"} <= set(methods)
    for method in methods:
        taken.clear()
        # DC-Merge's default keeps one entry per task among near-equal ones (a flat spectrum of Kronecker
        # products): round-off picks which on either path, so the basis is compared with every entry kept
        params = {"keep": 1.0} if method == "dc_merge" else {}
        fast = merge_adapters(inputs, [0.8, -0.6], method, params=params)
        assert len(taken) == len(fast.modules) and all(found is not None for found in taken), method
        slow = merge_adapters(plain, [0.8, -0.6], method, params=params)
        for name, module in slow.modules.items():
            got, want = fast.modules[name].factors().dense(), module.factors().dense()
            # A Kronecker delta's singular values are products σ_i(W1) σ_j(W2), many nearly equal, and Iso-CTS
            # cuts its spectrum between common and task directions: that cut amplifies float32 round-off on
            # either path (both are up to 7 % from a float64 Iso-CTS here); a wrong basis would be off by O(1).
            # DC-Merge stacks every task's whole rank: 16 + 24 singular vectors in a 40-dimensional space here, a
            # square stack whose polar factor amplifies round-off (6 % on either path at most)
            tolerance = {"iso_cts": 1e-2, "dc_merge": 1e-1}.get(method, 1e-5)
            assert rel_err(got, want) < tolerance, (method, name)


@pytest.mark.parametrize(("first", "second"), [((112, 112), (128, 3)), ((3, 2), (50, 40)), ((7, 3), (5, 2))])
def test_a_kronecker_basis_applies_as_its_dense_product(first, second):
    from loramerge.lowrank.structured import basis_times

    torch.manual_seed(0)
    P, Q = torch.randn(*first, dtype=torch.float64), torch.randn(*second, dtype=torch.float64)
    X = torch.randn(first[1] * second[1], 6, dtype=torch.float64)
    assert torch.allclose(basis_times((P, Q), X), torch.kron(P, Q) @ X, atol=1e-10)
