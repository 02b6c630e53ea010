"""Models for ``eval`` and ``generate``: a base (a folder, a Hub id or a GGUF file), optionally 4-bit, with
an adapter or a merged model on top."""

from __future__ import annotations

import torch

from loramerge.devices import check_device
from loramerge.errors import BadInput, brief
from loramerge.io.checkpoint import resolve_model_dir


def load_model(base: str, *, adapter: str | None = None, load_in_4bit: bool = False, device: str = "cpu"):
    """A causal LM and its tokenizer: ``base`` (optionally quantized to nf4 at load) with ``adapter`` on
    top. ``base`` may itself be a merged full model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_device(device)
    kwargs: dict[str, object] = {"dtype": torch.float32}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
        kwargs["device_map"] = {"": device}  # else bitsandbytes puts it on the first GPU whenever there is one
    folder = resolve_model_dir(base)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as error:
        raise BadInput(f"model {base}: cannot load it with its tokenizer ({brief(error)})") from error
    if adapter is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, adapter)
        except (OSError, ValueError, RuntimeError) as error:
            raise BadInput(f"adapter {adapter}: cannot load it on {base} ({brief(error)})") from error
    if not load_in_4bit:
        model = model.to(device)
    return model.eval(), tokenizer
