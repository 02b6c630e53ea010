"""``loramerge finetune``: a real PEFT adapter on a tiny Llama trained further on two mixed files; the
result loads with PEFT, learnt (its loss fell), keeps its ranks, is reproducible, and records the run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import assert_clean_failure, run
from conftest import build_adapter
from dense_helpers import WORDS, save_llama, save_tokenizer


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    base = save_llama(root / "base", 0)
    save_tokenizer(base)
    adapter = build_adapter(base, root / "adapter", seed=3, r=4)
    words = WORDS[3:]
    # two skills a random tiny model can learn in a few steps: a fixed answer per file
    first = write_jsonl(root / "a.jsonl", [{"prompt": f"{words[i]} {words[i + 1]}", "completion": "w50"}
                                          for i in range(0, 40, 2)])  # fmt: skip
    second = write_jsonl(root / "b.jsonl", [{"prompt": words[i], "completion": "w60 w61"} for i in range(60, 80)])
    return root, base, adapter, [first, second]


def finetune(setup, out: Path, *extra):
    _, base, adapter, data = setup
    args = ["finetune", adapter, "--base", base, "-o", out, "--steps", "40", "--lr", "1e-2", "--batch-size", "8"]
    for path in data:
        args += ["--data", path]
    return run(*args, *extra)


def test_finetune_learns_and_writes_a_peft_adapter(setup, tmp_path):
    _, base, adapter, _ = setup
    result = finetune(setup, tmp_path / "out")
    assert result.exit_code == 0, result.output
    losses = [float(x) for x in result.output.split("loss ")[1].split(",")[0].split(" -> ")]
    assert losses[1] < 0.9 * losses[0]  # it learnt (a random tiny model learns slowly; the demo run is in the README)
    before, after = (
        load_file(adapter / "adapter_model.safetensors"),
        load_file(tmp_path / "out" / "adapter_model.safetensors"),
    )
    assert sorted(before) == sorted(after)  # same modules and ranks
    assert all(before[k].shape == after[k].shape for k in before)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "40 steps of AdamW" in card and "The adapter before fine-tuning" in card
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "out")
    assert model(torch.tensor([[3, 4, 5]])).logits.shape == (1, 3, 128)
    again = finetune(setup, tmp_path / "again")
    assert again.exit_code == 0
    repeat = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert all(torch.equal(after[k], repeat[k]) for k in after)  # same seed, same adapter


def test_bad_finetune_inputs_are_one_line(setup, tmp_path):
    root, base, adapter, _ = setup
    missing = run("finetune", adapter, "--base", base, "--data", root / "nope.jsonl", "-o", tmp_path / "out")
    assert_clean_failure(missing, "no such file", tmp_path / "out")
    steps = finetune(setup, tmp_path / "out2", "--steps", "0")
    assert_clean_failure(steps, "must be positive", tmp_path / "out2")
    # an output over a data file would delete it (with --force): refused, the file kept
    folder = tmp_path / "data"
    folder.mkdir()
    kept = write_jsonl(folder / "train.jsonl", [{"prompt": "w3", "completion": "w4"}])
    over = run("finetune", adapter, "--base", base, "--data", kept, "-o", folder, "--force")
    assert over.exit_code == 2 and "overlaps the input" in over.stderr and "Traceback" not in over.output
    assert kept.read_text() == '{"prompt": "w3", "completion": "w4"}\n'


def test_finetune_can_cut_the_rank_first_and_train_on_a_4bit_base(setup, tmp_path):
    """``--rank 2``: every module starts as the adapter's best rank-2 approximation (a merged adapter's
    Σ r_i shrinks); ``--load-in-4bit``: QLoRA-style, the base quantized to nf4 at load. The adapter's
    config names another base: the output names the one it was trained on."""
    root, base, adapter, data = setup
    moved = shutil.copytree(adapter, tmp_path / "moved")
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "elsewhere/base"}))
    result = finetune((root, base, moved, data), tmp_path / "out", "--rank", "2", "--load-in-4bit", "--steps", "10")
    assert result.exit_code == 0, result.output
    trained = load_file(tmp_path / "out" / "adapter_model.safetensors")
    before = load_file(adapter / "adapter_model.safetensors")
    assert sorted(trained) == sorted(before)
    assert all(t.shape[0] == 2 for k, t in trained.items() if "lora_A" in k)
    assert all(t.shape[1] == 2 for k, t in trained.items() if "lora_B" in k)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == 2 and "at most rank 2" in (tmp_path / "out" / "README.md").read_text()
    assert config["base_model_name_or_path"] == str(base)
    losses = [float(x) for x in result.output.split("loss ")[1].split(",")[0].split(" -> ")]
    assert losses[1] < losses[0]


def test_the_rank_cut_starts_from_the_best_low_rank_approximation(setup, tmp_path):
    """One step at a learning rate of 1e-12 leaves the start: each module's update is the best rank-2
    approximation of the adapter's (torch.linalg.svd of the dense delta)."""
    _, _, adapter, _ = setup
    result = finetune(setup, tmp_path / "out", "--rank", "2", "--steps", "1", "--lr", "1e-12")
    assert result.exit_code == 0, result.output
    before = load_file(adapter / "adapter_model.safetensors")
    after = load_file(tmp_path / "out" / "adapter_model.safetensors")
    scale = json.loads((adapter / "adapter_config.json").read_text())["lora_alpha"] / 4
    modules = [k.removesuffix(".lora_A.weight") for k in before if k.endswith(".lora_A.weight")]
    for name in modules:
        delta = scale * before[f"{name}.lora_B.weight"] @ before[f"{name}.lora_A.weight"]
        U, S, Vh = torch.linalg.svd(delta.double())
        best = (U[:, :2] * S[:2]) @ Vh[:2]
        cut = after[f"{name}.lora_B.weight"].double() @ after[f"{name}.lora_A.weight"].double()  # scale 1
        assert torch.allclose(cut, best, atol=1e-5 * best.abs().max()), name
