"""Input statistics of a model's linear modules on a set of prompts: the mean Gram matrix ``Xᵀ X / n`` of every
named module's inputs (one row of ``X`` per prompt token, padding excluded), what RegMean merges with. The mean,
as RegMean's authors take it, lets each task's prompts weigh the same however many tokens they have."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loramerge.errors import BadInput
from loramerge.evaluate.data import load_samples
from loramerge.evaluate.exact_match import pad_id, padded_batch
from loramerge.evaluate.models import load_model

BATCH = 16


@dataclass
class _Collector:
    """Forward pre-hooks summing ``Xᵀ X`` per module. Modules fed the very same tensor (q, k and v; gate and
    up) share one sum: the first to see it computes it, the others point at it."""

    mask: torch.Tensor = field(default_factory=lambda: torch.ones(0))
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0
    same_as: dict[str, str] = field(default_factory=dict)
    last: tuple[torch.Tensor, str] | None = None

    def hook(self, name: str) -> Callable:
        def collect(_module, inputs) -> None:
            hidden = inputs[0]
            if self.last is not None and self.last[0] is hidden and self.last[1] != name:
                self.same_as[name] = self.last[1]
                return
            self.last = (hidden, name)
            if hidden.shape[:-1] != self.mask.shape:  # a layer fed flattened tokens (routed experts, say)
                raise BadInput(f"module {name}: takes {tuple(hidden.shape)} inputs, not one row per prompt token; "
                               "input statistics are taken on the layers of every token")  # fmt: skip
            rows = hidden[self.mask.bool()].to(torch.float64)
            product = (rows.T @ rows).cpu()
            self.sums[name] = self.sums[name] + product if name in self.sums else product

        return collect


def _linear_modules(model, names: Sequence[str]) -> dict[str, torch.nn.Module]:
    """The named modules, each a linear layer (``nn.Linear`` or a subclass, transformers' ``Conv1D``)."""
    found = dict(model.named_modules())
    modules = {}
    for name in names:
        module = found.get(name)
        if module is None:
            raise BadInput(f"module {name}: the base model has no such linear layer (input statistics are taken on "
                           "the inputs of linear layers)")  # fmt: skip
        if not (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"):
            raise BadInput(f"module {name}: input statistics are taken on linear layers, not {type(module).__name__}")
        modules[name] = module
    return modules


def input_grams(
    model,
    tokenizer,
    prompts: Sequence[str],
    names: Sequence[str],
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """``Xᵀ X / n`` (float64, in x in) of each named linear module's inputs over the ``n`` tokens of ``prompts``
    (with the tokenizer's special tokens, as evaluation reads them), one forward pass per batch, no gradients."""
    if not prompts:
        raise BadInput("no prompts to take input statistics on")
    collector = _Collector()
    handles = [module.register_forward_pre_hook(collector.hook(name)) for name, module in
               _linear_modules(model, names).items()]  # fmt: skip
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    try:
        for start in range(0, len(prompts), BATCH):
            rows = [tokenizer(text)["input_ids"] for text in prompts[start : start + BATCH]]
            ids, mask = padded_batch(rows, pad, left=False, device=device)
            collector.mask, collector.last = mask, None
            collector.tokens += int(mask.sum())
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
            if progress is not None:
                progress(min(start + BATCH, len(prompts)), len(prompts))
    finally:
        for handle in handles:
            handle.remove()
    # float64: a few prompts leave these nearly singular, and RegMean solves with their sum
    sums = {name: total / collector.tokens for name, total in collector.sums.items()}
    return {name: sums[collector.same_as.get(name, name)] for name in names}


def calibration_prompts(path: str | Path) -> list[str]:
    """A calibration file's prompts: the ``prompt`` column (with or without completions), else whole texts."""
    try:
        samples = load_samples(path)
    except BadInput as error:
        try:  # prompts alone, as unlabeled calibration data often is
            samples = load_samples(path, text_field="prompt")
        except BadInput:
            raise error from None
    return [sample.prompt or sample.completion for sample in samples]


def calibration_grams(
    base: str,
    calibration: Sequence[str | Path],
    adapters: Sequence,
    *,
    device: str = "cpu",
    progress: Callable[[int, int, str], None] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Per adapter, the mean input Gram matrices of every module any of them adapts (a task's inputs count where
    it adds nothing too), from the base's activations on its own
    calibration file (``calibration[i]``: ``calibration_prompts``): what RegMean merges with. The base is loaded
    once; ``adapters`` are ``LoraAdapter``s."""
    if len(calibration) != len(adapters):
        raise BadInput(f"{len(calibration)} calibration files for {len(adapters)} adapters; give one per adapter, "
                       "in the adapters' order")  # fmt: skip
    prompt_sets = [calibration_prompts(path) for path in calibration]
    model, tokenizer = load_model(base, device=device)
    names = sorted({name for adapter in adapters for name in adapter.modules})
    grams = []
    for i, prompts in enumerate(prompt_sets):
        label = f"calibration {i + 1}/{len(adapters)} ({Path(calibration[i]).name})"
        report = (lambda done, total, label=label: progress(done, total, label)) if progress else None
        grams.append(input_grams(model, tokenizer, prompts, names, report))
    return grams
