"""Logit error of each way to serve a LoRA trained on a 4-bit base, on a tiny Llama, against the
unmerged full-precision base + adapter in float32.

    python benchmarks/fold_4bit_error.py

Prints a markdown table and writes it to ``benchmarks/results/fold_4bit_error.json`` and ``.md``. Every
path is run for real: the 4-bit bases are saved by transformers with bitsandbytes' CPU backend, the folds
by ``loramerge fold``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _common import write_results
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

TOKENS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits.float()


def fold(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "loramerge.cli", "fold", *args, "--force"], check=True, capture_output=True)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="loramerge-4bit-"))
    try:
        measure(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(work: Path) -> None:
    """Every serving path on a fresh tiny Llama in ``work``; writes the results files."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(work / "base")
    model = AutoModelForCausalLM.from_pretrained(work / "base")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, target_modules=targets)
    get_peft_model(model, lora).save_pretrained(work / "adapter")
    base, adapter = str(work / "base"), str(work / "adapter")
    reference = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter))
    scale = reference.abs().max().item()
    rows = []
    trained_with: dict[str, torch.Tensor] = {}

    def record(path: str, model, quant_type: str | None = None) -> None:
        values = logits(model)
        error = (values - reference).abs().max().item()
        versus_qlora = (values - trained_with[quant_type]).abs().max().item() if quant_type else None
        rows.append((path, error, error / scale, versus_qlora))

    fold(adapter, "--base", base, "-o", str(work / "dense"))
    record("fold into the float32 base (dense)", AutoModelForCausalLM.from_pretrained(work / "dense"))
    for quant_type in ("nf4", "fp4"):
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )  # fmt: skip
        four_bit = work / f"base-{quant_type}"
        AutoModelForCausalLM.from_pretrained(base, quantization_config=quantization).save_pretrained(four_bit)
        qlora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(four_bit), adapter)
        trained_with[quant_type] = logits(qlora)
        record(f"{quant_type} base + adapter, unmerged (QLoRA inference)", qlora, quant_type)
        fold(adapter, "--base", str(four_bit), "-o", str(work / "d"), "--dtype", "float32")
        dense = AutoModelForCausalLM.from_pretrained(work / "d")
        record(f"fold into the {quant_type} base -> dense float32", dense, quant_type)
        fold(adapter, "--base", str(four_bit), "-o", str(work / "q"), "--quantize", "--quant-type", quant_type)
        requantized = AutoModelForCausalLM.from_pretrained(work / "q")
        record(f"fold into the {quant_type} base -> re-quantized {quant_type}", requantized, quant_type)
        fold(adapter, "--base", base, "-o", str(work / "fd"), "--from-dequantized", "--quant-type", quant_type)
        from_dequantized = AutoModelForCausalLM.from_pretrained(work / "fd")
        record(f"fold --from-dequantized ({quant_type}) into the float32 base", from_dequantized, quant_type)
    text = markdown(rows, scale)
    figures = {"logit_scale": scale, "rows": [dict(zip(("path", "max_abs_error", "relative", "vs_unmerged_4bit"), row,
                                                     strict=True)) for row in rows]}  # fmt: skip
    write_results("fold_4bit_error", figures, text)
    print(text)


def markdown(rows: list[tuple[str, float, float, float | None]], scale: float) -> str:
    lines = [f"tiny Llama (hidden 256, 2 layers), rank-16 adapter on every linear layer; |logit| max {scale:.3f}", "",
             "| path | max abs logit error vs float32 base + adapter | relative | vs the unmerged 4-bit model |",
             "|---|---|---|---|"]  # fmt: skip
    for path, error, relative, versus_qlora in rows:
        other = "-" if versus_qlora is None else f"{versus_qlora:.2e}"
        lines.append(f"| {path} | {error:.2e} | {relative:.2e} | {other} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
