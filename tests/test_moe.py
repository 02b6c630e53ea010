"""``loramerge moe`` against ``mergekit-moe`` 0.1.5 (a black box in a subprocess) on the same configs:
tiny Llama experts (one of them a ``base+adapter`` reference, compared with the adapter folded by PEFT),
every gate mode, expert noise; the result loads as Mixtral and generates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, MixtralForCausalLM

from cli_helpers import assert_clean_failure, run
from conftest import build_adapter
from dense_helpers import load_weights, run_mergekit_command, save_llama, save_tokenizer, write_recipe
from loramerge.errors import BadInput
from loramerge.moe.build import build_moe
from loramerge.moe.config import MoeConfig, load_moe_config

PROMPTS = [(["w1 w2 w3", "w4 w5"], ["w9 w9"]), (["w10 w11 w12 w13"], []), (["w20", "w21 w22", "w23 w24 w25"], ["w3"])]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    base = save_llama(root / "base", 0)
    save_tokenizer(base)
    experts = [save_llama(root / f"e{i}", i + 1, like=base) for i in range(2)]
    adapter = build_adapter(base, root / "adapter", seed=5, r=4, target_modules=["gate_proj", "up_proj", "down_proj"])
    folded = AutoModelForCausalLM.from_pretrained(base)
    PeftModel.from_pretrained(folded, adapter).merge_and_unload().save_pretrained(root / "folded")
    return {"base": base, "e0": experts[0], "e1": experts[1], "adapter": adapter, "folded": root / "folded"}


def config(m, gate_mode: str, third: str, **extra) -> dict:
    sources = [str(m["e0"]), str(m["e1"]), third]
    experts = [{"source_model": source, "positive_prompts": positive, **({"negative_prompts": negative} if negative
                else {})} for source, (positive, negative) in zip(sources, PROMPTS, strict=True)]  # fmt: skip
    return {"base_model": str(m["base"]), "gate_mode": gate_mode, "dtype": "float32", "experts_per_token": 2,
            "experts": experts, **extra}  # fmt: skip


def run_mergekit_moe(path: Path, out: Path, seed: int) -> dict[str, torch.Tensor]:
    run_mergekit_command("mergekit-moe", [path, out, "--device", "cpu", "--random-seed", seed])
    return load_weights(out)


@pytest.mark.parametrize("gate_mode", ["random", "uniform_random", "cheap_embed", "hidden", "hidden_avg"])
def test_same_tensors_as_mergekit_moe(gate_mode, models, tmp_path):
    """The third expert is ``base+adapter`` for loramerge and the PEFT-folded model for mergekit-moe."""
    ours_config = config(models, gate_mode, f"{models['base']}+{models['adapter']}")
    theirs_config = config(models, gate_mode, str(models["folded"]))
    if gate_mode == "random":
        for c in (ours_config, theirs_config):
            c["experts"][1]["noise_scale"] = 0.01
    theirs = run_mergekit_moe(write_recipe(tmp_path / "theirs.yml", theirs_config), tmp_path / "mergekit", seed=3)
    build_moe(MoeConfig.model_validate(ours_config), tmp_path / "ours", seed=3)
    ours = load_weights(tmp_path / "ours")
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert ours[name].shape == tensor.shape, name
        assert (ours[name] - tensor.float()).abs().max().item() <= 1e-5, name
    model = MixtralForCausalLM.from_pretrained(tmp_path / "ours")
    assert model.config.num_local_experts == 3 and model.config.num_experts_per_tok == 2
    tokens = model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=4, do_sample=False)
    assert tokens.shape == (1, 7)


def test_cli_writes_a_model_card_and_refuses_bad_configs(models, tmp_path):
    path = write_recipe(tmp_path / "moe.yml", config(models, "random", str(models["e0"])))
    result = run("moe", path, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "gate_mode: random" in (tmp_path / "out" / "README.md").read_text()
    bad = config(models, "hidden", str(models["e0"]))
    del bad["experts"][0]["positive_prompts"]
    result = run("moe", write_recipe(tmp_path / "bad.yml", bad), "-o", tmp_path / "bad_out")
    assert_clean_failure(result, "experts[0]: gate_mode hidden needs positive_prompts", tmp_path / "bad_out")
    too_many = write_recipe(tmp_path / "k.yml", config(models, "random", str(models["e0"]), experts_per_token=4))
    with pytest.raises(BadInput, match="experts_per_token is 4 but there are 3 experts"):
        load_moe_config(too_many)


def test_a_nan_in_an_expert_is_refused_unless_allowed(models, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    poisoned = tmp_path / "poisoned"
    shutil.copytree(models["e1"], poisoned)
    weights = next(poisoned.glob("*.safetensors"))
    state = load_file(weights)
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, weights, metadata={"format": "pt"})
    path = write_recipe(tmp_path / "moe.yml", config(models, "random", str(poisoned)))
    result = run("moe", path, "-o", tmp_path / "out")
    message = (
        f"model {poisoned}: tensor model.layers.1.mlp.up_proj.weight holds NaN or Inf values; pass --allow-nonfinite"
    )
    assert_clean_failure(result, message, tmp_path / "out")
    assert run("moe", path, "-o", tmp_path / "out", "--allow-nonfinite").exit_code == 0
