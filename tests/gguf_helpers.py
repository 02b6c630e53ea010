"""A tiny float32 llama GGUF file written with the ``gguf`` package, beside the same model saved as an
ordinary safetensors folder, so that tests can compare what is read from each.

The file follows what transformers' GGUF loader reads for ``general.architecture = "llama"``
(``modeling_gguf_pytorch_utils.py``, ``integrations/ggml.py``, ``integrations/gguf/``):

* the config comes from ``llama.*`` keys (``embedding_length`` -> hidden_size, ``rope.dimension_count``
  -> head_dim, ...), ``tie_word_embeddings`` from whether ``output.weight`` is present;
* tensors are named ``token_embd``, ``blk.N.attn_q`` ... ``output``; numpy arrays are given in torch's
  (out, in) order, the writer stores them in ggml's reversed dimension order and the reader undoes it;
* llama.cpp stores each q/k head's rotary pairs interleaved (x0, x1, x0', x1', ...) where transformers
  rotates the two halves of the head (``rotate_half``); the loader regroups the rows of ``attn_q`` and
  ``attn_k`` (by key/value heads for k), so the writer must interleave them;
* the tokenizer is ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE from ``tokens`` and ``merges``,
  CONTROL tokens added as special tokens, special tokens by id).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import GPT2Tokenizer, LlamaConfig, LlamaForCausalLM

SPECIALS = ["<s>", "</s>", "<pad>"]  # bos, eos, pad: ids 0, 1, 2
WORDS = ["add", "reverse", "user", "assistant"]  # merged into single tokens, with and without a leading space
CHAT = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"  # noqa: E501
VOCAB_SIZE = 128
LAYER_TENSORS = {  # transformers module -> llama.cpp tensor, in each block
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def vocabulary() -> tuple[list[str], list[str]]:
    """Tokens (byte-level spelling: a space is "Ġ") and BPE merges, padded to ``VOCAB_SIZE`` tokens."""
    tokens = [*SPECIALS, "Ġ", *"0123456789", *"abcdefghijklmnopqrstuvwxyz", *"=:+-,."]
    merges = []
    for word in [*WORDS, *("Ġ" + word for word in WORDS)]:
        for end in range(2, len(word) + 1):  # left to right: "a d" -> "ad", "ad d" -> "add"
            pair = f"{word[: end - 1]} {word[end - 1]}"
            if pair not in merges:
                merges.append(pair)
                tokens.append(word[:end])
    tokens += [f"<unused{i}>" for i in range(VOCAB_SIZE - len(tokens))]
    assert len(tokens) == VOCAB_SIZE
    return tokens, merges


def interleave_rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of one q/k projection from transformers' layout (per head: first half, second half of the
    rotary dimensions) to llama.cpp's (per head: the two halves interleaved pair by pair)."""
    rows, columns = weight.shape
    head_dim = rows // heads
    return weight.reshape(heads, 2, head_dim // 2, columns).transpose(1, 2).reshape(rows, columns)


def _gguf_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    config = model.config
    state = {name: tensor.detach().float() for name, tensor in model.state_dict().items()}
    out = {"token_embd.weight": state["model.embed_tokens.weight"], "output_norm.weight": state["model.norm.weight"]}
    if not config.tie_word_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in LAYER_TENSORS.items():
            tensor = state[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                tensor = interleave_rotary_rows(tensor, config.num_attention_heads)
            elif gguf_name == "attn_k":
                tensor = interleave_rotary_rows(tensor, config.num_key_value_heads)
            out[f"blk.{layer}.{gguf_name}.weight"] = tensor
    return {name: tensor.contiguous().numpy() for name, tensor in out.items()}


def write_gguf(model: LlamaForCausalLM, path: Path, *, architecture: str = "llama", skip: tuple[str, ...] = ()) -> Path:
    """``model`` as a float32 GGUF file with the tokenizer of ``vocabulary()``; ``architecture`` and
    ``skip`` (tensor names left out) make broken files for the bad-input tests."""
    config = model.config
    tokens, merges = vocabulary()
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_chat_template(CHAT)
    for name, array in _gguf_tensors(model).items():
        if name not in skip:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_llama(seed: int = 0, tied: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB_SIZE, max_position_embeddings=64, tie_word_embeddings=tied,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # norms away from 1, so that a mix-up between them would show
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model.eval()


def tokenizer() -> GPT2Tokenizer:
    """The tokenizer the GGUF file describes, built independently of the GGUF loader."""
    tokens, merges = vocabulary()
    vocab = {token: index for index, token in enumerate(tokens)}
    return GPT2Tokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], unk_token=None,
                         bos_token="<s>", eos_token="</s>", pad_token="<pad>", chat_template=CHAT)  # fmt: skip


def save_gguf_pair(root: Path, seed: int = 0, tied: bool = False) -> tuple[Path, Path]:
    """(``root/model.gguf``, ``root/dense``): one random tiny llama and its tokenizer, as GGUF and as a
    safetensors folder."""
    root.mkdir(parents=True, exist_ok=True)
    model = tiny_llama(seed, tied)
    dense = root / "dense"
    model.save_pretrained(dense)
    tokenizer().save_pretrained(dense)
    return write_gguf(model, root / "model.gguf"), dense
