"""``loramerge finetune``: a real PEFT adapter on a tiny Llama trained further on two mixed files; the
result loads with PEFT, learnt (its loss fell), keeps its ranks and its dtype, is reproducible, and records
the run; with the default settings it improves a merged adapter that already works."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_helpers import assert_clean_failure, run
from conftest import LLAMA_TARGETS, build_adapter
from dense_helpers import WORDS, save_llama, save_tokenizer
from loramerge.evaluate import evaluate, load_model
from loramerge.evaluate.data import Sample
from loramerge.train.finetune import completion_examples


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
    losses = [float(x) for x in result.stdout.split("loss ")[1].split(",")[0].split(" -> ")]  # stderr: progress
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
    losses = [float(x) for x in result.stdout.split("loss ")[1].split(",")[0].split(" -> ")]  # stderr: progress
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


def test_finetune_keeps_the_adapters_dtype_unless_told(setup, tmp_path):
    """PEFT trains a bfloat16 adapter in float32; the output is bfloat16 again (not twice the size), or
    what ``--dtype`` asks."""
    root, base, adapter, data = setup
    half = shutil.copytree(adapter, tmp_path / "bf16")
    state = load_file(half / "adapter_model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, half / "adapter_model.safetensors")
    kept = finetune((root, base, half, data), tmp_path / "kept", "--steps", "2")
    assert kept.exit_code == 0, kept.output
    assert {t.dtype for t in load_file(tmp_path / "kept" / "adapter_model.safetensors").values()} == {torch.bfloat16}
    assert "written in bfloat16" in (tmp_path / "kept" / "README.md").read_text()
    told = finetune((root, base, half, data), tmp_path / "told", "--steps", "2", "--dtype", "float16")
    assert told.exit_code == 0, told.output
    assert {t.dtype for t in load_file(tmp_path / "told" / "adapter_model.safetensors").values()} == {torch.float16}
    wrong = finetune(setup, tmp_path / "wrong", "--dtype", "fp8")
    assert_clean_failure(wrong, "error: --dtype must be float32, float16 or bfloat16, got 'fp8'", tmp_path / "wrong")


# A merged adapter that already works, as the demo's does (training loss 0.025 on its fine-tuning data).
# There, the old default (1e-3) raised that loss: Adam's first steps move every factor entry by about the
# learning rate, whatever the gradient, which knocks a good adapter off its minimum.
QUESTIONS = [Sample(f"{WORDS[3 + i]} {WORDS[4 + i]}", "w50") for i in range(0, 40, 2)]
ANSWERS = [Sample(WORDS[i], "w60 w61") for i in range(63, 83)]


def save_confident_llama(path: Path) -> Path:
    """A random tiny Llama whose logits can grow: at the usual initializer range (0.02) the final norm and
    lm_head cap the probability of any token near 3 %, so no adapter could fit the data and every learning
    rate would only help."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.2,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    save_tokenizer(path)
    return path


@contextmanager
def one_thread() -> Iterator[None]:
    """Matrices this small gain nothing from a second thread, and on a busy 2-core machine its spin-waits made
    the fits below 40 times slower (80 s instead of 2 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fit_adapter(base: Path, samples: list[Sample], out: Path, lr: float, steps: int = 200) -> Path:
    """A LoRA adapter trained to (near) convergence on ``samples``: full-batch Adam with cosine decay, labels
    as finetune puts them. Plain torch: the Trainer's overhead would be most of the time here."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(1)  # the same start for every adapter fitted here
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, lora_alpha=8,
                           target_modules=LLAMA_TARGETS))  # fmt: skip
    rows = completion_examples(tokenizer, samples)
    width = max(len(row["input_ids"]) for row in rows)
    ids = torch.tensor([row["input_ids"] + [0] * (width - len(row["input_ids"])) for row in rows])
    labels = torch.tensor([row["labels"] + [-100] * (width - len(row["labels"])) for row in rows])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    with one_thread():
        for _ in range(steps):  # right padding needs no mask: a causal model never attends forward
            optimizer.zero_grad()
            model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()
            schedule.step()
    model.save_pretrained(out)
    return out


def completion_loss(base: Path, adapter: Path, samples: list[Sample]) -> float:
    """Mean loss of the completions, as ``loramerge eval`` scores them."""
    model, tokenizer = load_model(str(base), adapter=str(adapter))
    return evaluate(model, tokenizer, samples, "training data").loss


@pytest.fixture(scope="module")
def working_merge(tmp_path_factory):
    """Two adapters fitted to the same two files from the same start (at two learning rates), merged: the
    merge fits the data nearly as well as either."""
    root = tmp_path_factory.mktemp("working")
    base = save_confident_llama(root / "base")
    samples = QUESTIONS + ANSWERS
    first, second = (fit_adapter(base, samples, root / name, lr) for name, lr in (("first", 3e-2), ("second", 2e-2)))
    merged = run("merge", first, second, "--method", "linear", "--weights", "0.5,0.5", "-o", root / "merged")
    assert merged.exit_code == 0, merged.output
    data = [write_jsonl(root / "questions.jsonl", [vars(s) for s in QUESTIONS]),
            write_jsonl(root / "answers.jsonl", [vars(s) for s in ANSWERS])]  # fmt: skip
    return base, root / "merged", data


def test_the_defaults_lower_the_training_loss_of_a_merged_adapter_that_works(working_merge, tmp_path):
    """Ten steps with the default learning rate and batch size lower the completion loss on the training
    examples (0.038 -> 0.030); at the old default, 1e-3, the same ten steps raise it (to 0.040), at 1e-2 to 0.13."""
    base, merged, data = working_merge
    samples = QUESTIONS + ANSWERS
    before = completion_loss(base, merged, samples)
    assert before < 0.1  # the merge already works: a high loss would leave room for any learning rate
    result = run("finetune", merged, "--base", base, "--data", data[0], "--data", data[1], "--steps", "10",
                 "-o", tmp_path / "out")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert completion_loss(base, tmp_path / "out", samples) < before
