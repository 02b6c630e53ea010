"""``eval`` against a hand computation on two samples; ``generate`` with and without the chat template."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from cli_helpers import run
from conftest import build_adapter
from dense_helpers import save_llama

WORDS = ["<unk>", "<s>", "</s>", "<pad>", "user", "assistant", ":", "add", "reverse", "=", *[str(d) for d in range(10)]]
CHAT = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"  # noqa: E501


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    base = save_llama(root / "base", 0)
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>", chat_template=CHAT)  # fmt: skip
    tokenizer.save_pretrained(base)
    adapter = build_adapter(base, root / "adapter", seed=1, r=4, lora_alpha=8)
    data = root / "data.jsonl"
    rows = [{"prompt": "add 1 2 =", "completion": "3"}, {"prompt": "reverse 1 2 3 =", "completion": "3 2 1"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"base": base, "adapter": adapter, "data": data, "rows": rows, "tokenizer": tokenizer}


def hand_loss(model, tokenizer, rows) -> tuple[float, float]:
    """Mean NLL per completion token, from the logits, and exact match of greedy completions."""
    total, count, matches = 0.0, 0, 0
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        target = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + target])
        with torch.no_grad():
            probs = torch.softmax(model(ids).logits[0], dim=-1)
            generated = model.generate(ids[:, : len(prompt)], max_new_tokens=len(target), do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        for position, token in enumerate(target):
            total -= math.log(probs[len(prompt) + position - 1, token].item())
            count += 1
        matches += tokenizer.decode(generated[0, len(prompt) :], skip_special_tokens=True).strip() == row["completion"]
    return total / count, matches / len(rows)


def test_eval_matches_a_hand_computation(model_dir):
    result = run("eval", "--base", model_dir["base"], "--adapter", model_dir["adapter"], "--data", model_dir["data"],
                 "--prompt-field", "prompt", "--completion-field", "completion", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    base_row, adapter_row = json.loads(result.stdout)
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(model_dir["base"])
    loss, exact = hand_loss(base, model_dir["tokenizer"], model_dir["rows"])
    assert base_row["loss"] == pytest.approx(loss, rel=1e-5)
    assert base_row["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert base_row["exact_match"] == exact and base_row["tokens"] == 4 and base_row["samples"] == 2
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir["base"]), model_dir["adapter"])
    loss, exact = hand_loss(adapted, model_dir["tokenizer"], model_dir["rows"])
    assert adapter_row["loss"] == pytest.approx(loss, rel=1e-5) and adapter_row["exact_match"] == exact
    assert adapter_row["loss"] != pytest.approx(base_row["loss"])


def test_eval_whole_texts_and_table(model_dir, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("add 1 2 = 3\nreverse 1 2 = 2 1\n")
    result = run("eval", "--base", model_dir["base"], "--data", texts, "--merged", model_dir["adapter"])
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.stdout and "merged" in result.stdout


def test_eval_bad_inputs(model_dir, tmp_path):
    cases = [
        (["--data", tmp_path / "none.jsonl"], "no such file"),
        (["--data", model_dir["data"], "--prompt-field", "question", "--completion-field", "completion"], "no field"),
        (["--data", model_dir["data"], "--prompt-field", "prompt", "--text-field", "text"], "not both"),
    ]
    for extra, message in cases:
        result = run("eval", "--base", model_dir["base"], *extra)
        assert result.exit_code == 2 and message in result.stderr, result.output


@pytest.mark.parametrize("chat", [False, True])
def test_generate(chat, model_dir):
    result = run("generate", "--base", model_dir["base"], "--adapter", model_dir["adapter"], "--prompt", "add 1 2 =",
                 "--max-new-tokens", "5", *(["--chat"] if chat else []))  # fmt: skip
    assert result.exit_code == 0, result.output
    words = result.stdout.split()
    assert 1 <= len(words) <= 5 and all(word in WORDS for word in words)


def test_recipe_with_an_evaluate_section(model_dir, tmp_path):
    import yaml

    other = build_adapter(model_dir["base"], tmp_path / "other", seed=2, r=2, lora_alpha=4)
    recipe = {
        "merge_method": "ties",
        "adapters": [{"adapter": str(model_dir["adapter"]), "weight": 0.6}, {"adapter": str(other), "weight": 0.4}],
        "parameters": {"density": 0.5},
        "evaluate": {"data": str(model_dir["data"]), "prompt_field": "prompt", "completion_field": "completion",
                     "base": str(model_dir["base"])},
    }  # fmt: skip
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    result = run("run", path, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "evaluation" in result.stdout and "exact match" in result.stdout
    assert result.stdout.count("adapter ") >= 2 and "merged" in result.stdout


def test_exact_match_from_one_forward_pass_equals_greedy_generation():
    """``evaluate`` decides exact match from teacher-forced argmaxes; it must agree with generating each
    greedy completion one row at a time, for rows that match and rows that do not (the character-level
    fixture model, which answers some prompts right)."""
    from loramerge.evaluate import Sample, evaluate, greedy_completion, load_model, load_samples

    fixture = Path(__file__).parent / "fixtures/chardemo"
    model, tokenizer = load_model(str(fixture / "base"))
    rows = [
        row
        for skill in ("add", "cipher")
        for row in load_samples(
            fixture / f"data/{skill}.eval.jsonl", prompt_field="prompt", completion_field="completion", max_samples=20
        )
    ]
    samples = []
    for i, row in enumerate(rows):
        greedy = greedy_completion(model, tokenizer, tokenizer(row.prompt)["input_ids"], 4)
        samples.append(Sample(row.prompt, greedy if i % 3 and greedy.strip() else row.completion))
    expected = sum(
        greedy_completion(model, tokenizer, tokenizer(s.prompt)["input_ids"],
                          len(tokenizer(s.completion, add_special_tokens=False)["input_ids"])).strip()
        == s.completion.strip()
        for s in samples
    )  # fmt: skip
    result = evaluate(model, tokenizer, samples, "check", batch_size=7)
    assert 0 < expected < len(samples)
    assert result.exact_match == expected / len(samples)


class _Letters:
    """A tokenizer stand-in: token i is the i-th letter."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join("abcdefgh "[i] for i in ids)


@pytest.mark.parametrize(
    ("target", "greedy", "reference", "decided"),
    [
        ([0, 1], [0, 1], "ab", True),  # every argmax follows the reference
        ([0, 1], [0, 2], "ab", False),  # "ac" cannot become "ab"
        ([0, 1], [8, 0], "ab", None),  # a leading space: only generation can tell
        ([0, 1], [0, 8], "ab", None),  # "a " could still strip to the reference's prefix
    ],
)
def test_exact_match_is_decided_only_when_certain(target, greedy, reference, decided):
    from loramerge.evaluate import match_from_scores

    assert match_from_scores(_Letters(), target, greedy, reference) is decided
