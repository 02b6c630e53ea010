"""LoRA on ``nn.Parameter``s (PEFT's ``target_parameters``: MoE experts' 3-D weights) merges exactly, per expert.

The reference is PEFT's code: each input is folded by PEFT's ``merge_and_unload`` on a tiny GPT-OSS (fused
experts, one of them square, so a wrong orientation shows), and a linear merge must equal
``W0 + Σ w_i Δ_i``; the merged adapter is loaded and folded by PEFT, and folded by ``loramerge fold``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, GptOssConfig

from cli_helpers import assert_clean_failure, run
from conftest import CHARDEMO
from loramerge import add_weighted_adapter, load_adapter, merge_adapters, save_adapter
from loramerge.errors import BadInput
from loramerge.folding.stream import fold
from test_adapter_types import assert_same_fold, build, expected_state, folded_state

PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]


def save_moe_base(path: Path) -> Path:
    """A one-layer GPT-OSS with four experts (gate_up 64 x 128, down 64 x 64) and the chardemo tokenizer."""
    torch.manual_seed(0)
    config = GptOssConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_local_experts=4, num_experts_per_tok=2, vocab_size=64, layer_types=["full_attention"],
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(CHARDEMO / "base" / name, path / name)
    return path


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    base = save_moe_base(root / "base")
    lora = dict(init_lora_weights=False)
    configs = {
        "experts4": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=PARAMETERS,
                               rank_pattern={"experts.down_proj": 2}, alpha_pattern={"experts.down_proj": 5}, **lora),
        "experts2": LoraConfig(r=2, lora_alpha=3, use_rslora=True, target_modules=["v_proj"],
                               target_parameters=PARAMETERS, **lora),
        "attention": LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "k_proj"], **lora),
        "gate_only": LoraConfig(r=2, lora_alpha=2, target_modules=[], target_parameters=PARAMETERS[:1], **lora),
        "dora": LoraConfig(r=2, lora_alpha=2, target_modules=["k_proj"], use_dora=True, **lora),
    }  # fmt: skip
    paths = {"base": base}
    for seed, (name, config) in enumerate(configs.items(), start=1):
        paths[name] = build(base, root / name, config, seed)
    return paths


CASES = {
    "one adapter gives back its own delta": (["experts4"], [1.0]),
    "two, mixed ranks, rsLoRA, a negative weight": (["experts4", "experts2"], [0.7, -0.4]),
    "two with experts and one on attention only": (["experts4", "experts2", "attention"], [0.5, 1.0, -0.3]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_linear_merge_equals_the_sum_of_peft_folds(case, moe, tmp_path):
    names, weights = CASES[case]
    base = moe["base"]
    paths = [moe[name] for name in names]
    merged = merge_adapters([load_adapter(p) for p in paths], weights, "linear")
    assert merged.config["target_parameters"] == PARAMETERS and merged.kind == "LoRA+params"
    out = save_adapter(merged, tmp_path / "merged")
    start, want = folded_state(base, None), expected_state(base, paths, weights)
    assert_same_fold(folded_state(base, out), want, start)  # PEFT loads the output and folds it
    for key in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"):
        assert not torch.equal(want[key], start[key]), key  # the experts did change
    folded = fold(load_adapter(out), str(base), tmp_path / "folded")
    assert_same_fold(folded_state(folded, None), want, start)  # loramerge's own fold agrees


def test_every_method_gives_an_adapter_peft_loads(moe):
    """Every method of the catalogue merges per expert, and PEFT loads each output into the model."""
    from peft import set_peft_model_state_dict

    from loramerge import catalogue
    from loramerge.adapters.files import adapter_state_dict

    inputs = [load_adapter(moe[name]) for name in ("experts4", "experts2", "attention")]
    model = AutoModelForCausalLM.from_pretrained(moe["base"], dtype=torch.float32)
    # (RegMean takes activations of linear layers, which a parameter target is not)
    methods = [method for method in catalogue.adapter_methods() if not catalogue.method(method).calibrated]
    for number, method in enumerate(methods):
        merged = merge_adapters(inputs, [1.0, 0.5, 0.7], method, density=0.8)
        experts = [name for name in merged.modules if name.endswith("]")]
        assert len(experts) == 2 * 4 and all(torch.isfinite(m.B).all() for m in merged.modules.values()), method
        fields = {key: merged.config[key] for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern")}
        config = LoraConfig(target_modules=merged.config["target_modules"],
                            target_parameters=merged.config["target_parameters"], **fields)  # fmt: skip
        if number == 0:
            model = PeftModel(model, config, adapter_name=method)
        else:
            model.add_adapter(method, config)
        loaded = set_peft_model_state_dict(model, adapter_state_dict(merged), adapter_name=method)
        assert not loaded.unexpected_keys, (method, loaded.unexpected_keys[:3])


def test_live_add_weighted_adapter_merges_experts(moe):
    base, paths, weights = moe["base"], [moe["experts4"], moe["experts2"]], [0.8, -0.6]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), paths[0],
                                      adapter_name="first")  # fmt: skip
    model.load_adapter(paths[1], adapter_name="second")
    add_weighted_adapter(model, ["first", "second"], weights, "merged", method="linear")
    model.set_adapter("merged")
    got = {key: value.detach().float() for key, value in model.merge_and_unload().state_dict().items()}
    assert_same_fold(got, expected_state(base, paths, weights), folded_state(base, None))


def test_cli_merge_folds_into_the_base_and_inspect_shows_the_type(moe, tmp_path):
    base, paths = moe["base"], [moe["experts4"], moe["attention"]]
    result = run("merge", *paths, "--weights", "1,-0.5", "--method", "linear", "--fold-into", base, "-o",
                 tmp_path / "folded")  # fmt: skip
    assert result.exit_code == 0, result.output
    want = expected_state(base, paths, [1.0, -0.5])
    assert_same_fold(folded_state(tmp_path / "folded", None), want, folded_state(base, None))
    from typer.testing import CliRunner

    from loramerge.cli.app import app

    inspected = CliRunner().invoke(app, ["inspect", str(paths[0])], env={"COLUMNS": "250"})  # no column cut short
    assert inspected.exit_code == 0 and "LoRA+params" in inspected.output, inspected.output


def test_a_search_slot_scores_what_peft_gives(moe, tmp_path):
    from dense_helpers import write_recipe
    from loramerge.evaluate.models import load_model
    from loramerge.recipe import load_recipe
    from loramerge.search.evaluator import Evaluator, Task
    from loramerge.search.job import build_job

    entries = [{"adapter": str(moe["experts4"]), "weight": 0.8}, {"adapter": str(moe["experts2"])}]
    recipe = write_recipe(tmp_path / "r.yml", {"merge_method": "ties", "adapters": entries, "parameters": {}})
    dev = [str(CHARDEMO / "data" / "add.eval.jsonl")]
    job = build_job(load_recipe(recipe), dev, base=str(moe["base"]), max_samples=2, threads=2)
    evaluator = Evaluator(job)
    point = (1.3, -0.6)
    evaluator.score(Task(0, point))
    from loramerge.adapters.merge import execute_plan

    saved = save_adapter(execute_plan(job.plan(point)), tmp_path / "merged")
    model, _ = load_model(str(moe["base"]), adapter=str(saved))
    ids = torch.tensor([[1, 5, 9, 12, 40, 7]])
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, evaluator.model(input_ids=ids).logits
    assert torch.allclose(expected, got, atol=1e-5), (expected - got).abs().max()


def test_adapters_that_wrap_different_parameters_are_refused(moe, tmp_path):
    result = run("merge", moe["experts4"], moe["gate_only"], "-o", tmp_path / "out")
    assert_clean_failure(result, "wrap different parameters (target_parameters", tmp_path / "out")


def test_wrapped_parameters_with_dora_are_refused(moe):
    inputs = [load_adapter(moe["experts4"]), load_adapter(moe["dora"])]
    with pytest.raises(BadInput, match=r"wraps parameters \(target_parameters\) and another input is DoRA"):
        merge_adapters(inputs, [1.0, 1.0], "linear", base=str(moe["base"]))


def test_a_wrapped_parameter_of_the_wrong_size_is_refused(moe, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(moe["experts2"], broken)
    state = load_file(broken / "adapter_model.safetensors")
    key = next(key for key in state if key.endswith("experts.lora_A.weight"))
    state[key] = state[key][:-1]
    save_file(state, broken / "adapter_model.safetensors")
    result = run("merge", broken, "-o", tmp_path / "out")
    assert_clean_failure(result, "module model.layers.0.mlp.experts has lora_A (7, 64)", tmp_path / "out")
