"""Continue training a LoRA adapter with PEFT and transformers' ``Trainer`` on a few examples (several
files mixed), as users "heal" a merge: labels on the completion and end-of-sequence tokens only (prompt
and completion tokenized apart, exactly as ``loramerge eval`` scores them), AdamW with warm-up and
cosine decay, a seed; the adapter keeps its target modules and its ranks (or, with ``rank``, is first cut
to its best approximation of at most that rank)."""

from __future__ import annotations

import math
import random
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from loramerge.adapters.files import load_adapter, save_adapter
from loramerge.adapters.merge import merge_adapters
from loramerge.adapters.model import LoraAdapter
from loramerge.adapters.options import DTYPES
from loramerge.errors import BadInput
from loramerge.evaluate.data import Sample
from loramerge.evaluate.models import load_model
from loramerge.io.atomic import check_output_target
from loramerge.io.output import output_folder
from loramerge.io.portable_base import card_with_local_base, portable_base
from loramerge.train.options import FinetuneOptions

Progress = Callable[[int, int, str], None]


def completion_examples(tokenizer, samples: Sequence[Sample]) -> list[dict[str, list[int]]]:
    """Token ids with labels on the completion and the end-of-sequence token (-100 on the prompt)."""
    examples = []
    for sample in samples:
        if not sample.prompt:
            raise BadInput("finetune needs prompt/completion pairs (give `prompt_field` and `completion_field`)")
        prompt = tokenizer(sample.prompt)["input_ids"]
        answer = tokenizer(sample.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return examples


def mixed(sets: Sequence[Sequence[Sample]], seed: int) -> list[Sample]:
    """Every file's samples in one list, shuffled with ``seed``."""
    rows = [sample for samples in sets for sample in samples]
    random.Random(seed).shuffle(rows)
    return rows


def finetune(
    adapter: str,
    base: str,
    samples: Sequence[Sample],
    output: str | Path,
    options: FinetuneOptions = FinetuneOptions(),
    *,
    force: bool = False,
    inputs: Sequence[str | Path] = (),
    progress: Progress | None = None,
) -> tuple[Path, list[float]]:
    """Train ``adapter`` (on ``base``) for ``options.steps`` steps on ``samples``; write the result to
    ``output`` atomically, refusing an output over the adapter, a local base or any of ``inputs`` (the
    data files), in ``options.dtype`` or else the adapter's own dtype. Returns the output folder and the
    training loss at each step."""
    from datasets import Dataset
    from transformers import (
        DataCollatorForSeq2Seq,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    target = check_output_target(Path(output), force, [Path(adapter), Path(base), *map(Path, inputs)])
    if not samples:
        raise BadInput("finetune: the data holds no examples")
    start = load_adapter(adapter)  # read up front: a bad adapter is refused before the model loads
    dtype = DTYPES[options.dtype] if options.dtype else start.dtype
    set_seed(options.seed)
    model, tokenizer = load_model(base, load_in_4bit=options.load_in_4bit, device=options.device)
    if tokenizer.eos_token_id is None:
        raise BadInput(f"model {base}: its tokenizer has no end-of-sequence token to end the completions with")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    losses: list[float] = []

    class Report(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
                if progress is not None:
                    progress(state.global_step, options.steps, f"loss {logs['loss']:.4f}")

    with tempfile.TemporaryDirectory(prefix="loramerge-finetune-") as scratch:
        model = _with_adapter(model, adapter, start, base, options.rank, Path(scratch))
        arguments = TrainingArguments(
            output_dir=scratch, max_steps=options.steps, per_device_train_batch_size=options.batch_size,
            learning_rate=options.learning_rate, lr_scheduler_type="cosine",
            warmup_steps=math.ceil(options.warmup_ratio * options.steps),
            weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
            seed=options.seed, data_seed=options.seed, use_cpu=options.device == "cpu", disable_tqdm=True,
            dataloader_num_workers=0, remove_unused_columns=False,
        )  # fmt: skip
        trainer = Trainer(
            model=model, args=arguments, train_dataset=Dataset.from_list(completion_examples(tokenizer, samples)),
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
            callbacks=[Report()],
        )  # fmt: skip
        trainer.remove_callback(PrinterCallback)  # the library never prints; the progress callback reports
        trainer.train()
    model.eval()
    _cast_trained(model, dtype)
    portable, local = portable_base(base)  # a GGUF base: named by its Hub id, loramerge's reference in the card
    model.peft_config["default"].base_model_name_or_path = portable  # trained on this base, whatever it said
    card = _card(adapter, base, len(samples), options, losses, dtype)
    with output_folder(target, force=force) as folder:
        model.save_pretrained(folder.staging)
        folder.card(card_with_local_base(card, local, portable))  # the input's card may name another base
    return target, losses


def _with_adapter(model, adapter: str, loaded: LoraAdapter, base: str, rank: int | None, scratch: Path):
    """``model`` with ``adapter`` (read as ``loaded``) on top, trainable; with ``rank``, the adapter's best
    rank-``rank`` approximation (module by module, from its factors: a merged adapter's Σ r_i shrinks before
    training), saved with scale 1 as every merged adapter is."""
    from peft import PeftModel

    start = adapter
    if rank is not None:
        cut = merge_adapters([loaded], [1.0], "linear", rank=rank)
        start = str(save_adapter(cut, scratch / "start"))
    try:
        return PeftModel.from_pretrained(model, start, is_trainable=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise BadInput(f"adapter {adapter}: cannot load it on {base} ({str(error).splitlines()[0]})") from error


def _cast_trained(model, dtype: torch.dtype) -> None:
    """Cast what training changed (the LoRA factors and any ``modules_to_save`` copies, the trainable
    parameters PEFT saves) to ``dtype``: PEFT trains a bfloat16 adapter in float32 and would otherwise
    write it at twice its size."""
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.to(dtype)


def _card(
    adapter: str, base: str, count: int, options: FinetuneOptions, losses: list[float], dtype: torch.dtype
) -> str:
    """The input adapter's card (its merge record, say) under a section recording the fine-tune."""
    from huggingface_hub import ModelCard

    source = Path(adapter) / "README.md"
    card = ModelCard.load(source) if source.is_file() else ModelCard("")
    first, last = (f"{losses[0]:.4f}", f"{losses[-1]:.4f}") if losses else ("-", "-")
    card.text = (
        f"# Fine-tuned LoRA adapter\n\n`{adapter}` (on `{base}`) trained further by loramerge `finetune`: "
        f"{options.steps} steps of AdamW (learning rate {options.learning_rate:g}, cosine decay, warm-up "
        f"{options.warmup_ratio:g}), batches of {options.batch_size} from {count} examples, seed {options.seed}"
        f"{'' if options.rank is None else f', every module first cut to at most rank {options.rank}'}; "
        f"training loss {first} -> {last}; written in {str(dtype).removeprefix('torch.')}.\n\n"
        f"## The adapter before fine-tuning\n\n{card.text}"
    )
    return str(card)
