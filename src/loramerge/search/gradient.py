"""Gradient search of merge coefficients: AdaMerging (Yang et al., "AdaMerging: Adaptive Model Merging for
Multi-Task Learning", ICLR 2024, arXiv:2310.02575) for LoRA adapters.

Task arithmetic with a coefficient per adapter (task-wise) or per adapter and layer (layer-wise),
``Δ_module = Σ_i λ_{i, layer(module)} s_i B_i A_i``, learned by Adam through one LoRA slot holding every input's
factors side by side: the coefficients scale the slot's rank components (a hook on each ``lora_A`` output), so a
step costs one forward and one backward pass of the base with its slot, and no merge is recomputed.

The objective, summed over the dev sets, each a batch of ``batch`` rows per step: on unlabeled prompts (the
paper's), the entropy of the next-token distribution where the answer begins (the last prompt token), the
generative counterpart of the paper's entropy of the predicted class; on labeled rows, the mean loss of the
completions. Coefficients are clipped into the weight range after every step (the paper clips to [0, 1])."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from loramerge.adapters.layer_scales import block_index
from loramerge.adapters.merge import execute_plan
from loramerge.adapters.model import LoraAdapter
from loramerge.errors import BadInput
from loramerge.evaluate.data import Sample
from loramerge.evaluate.exact_match import pad_id, padded_batch
from loramerge.search.evaluator import Evaluator, Scores
from loramerge.search.job import SearchJob

Granularity = Literal["layer", "task"]
GradientObjective = Literal["entropy", "loss"]
Progress = Callable[[int, int, str], None]
DEFAULT_LEARNING_RATE = 0.01


def layer_of(module: str) -> str:
    """The group of a module's coefficient in a layer-wise search: its block's number (the first ``.N.`` of its
    name), or ``other`` for modules outside the numbered blocks."""
    block = block_index(module)
    return "other" if block is None else str(block)


@dataclass(frozen=True)
class GradientResult:
    """Where the coefficients went: one row per adapter, one column per group (one for task-wise)."""

    groups: list[str]
    start: list[list[float]]
    coefficients: list[list[float]]
    objective: list[float]  # per step, before its update
    forward_passes: int  # rows run through the model with gradients (steps x dev sets x batch)
    scores: Scores  # the final merge on every dev set
    references: list[Scores]  # each input adapter alone


def check_gradient_job(job: SearchJob) -> None:
    """What AdaMerging's task arithmetic can learn: a linear merge of low-rank modules, at its exact rank."""
    options = job.space.options(job.space.start)
    method = options.method_entry
    if not (method.linear and method.exact_rank and options.strategy in ("concat", "module")):
        raise BadInput(f"search with gradients learns task arithmetic's coefficients (AdaMerging): the recipe's "
                       f"method must be linear, cat or task_arithmetic, not {options.method}")  # fmt: skip
    if options.rank is not None:
        raise BadInput(
            "search with gradients keeps the exact sum of the adapters: leave rank out of the recipe's parameters"
        )
    if job.space.names != [d.name for d in job.space.dimensions if d.adapter is not None]:
        raise BadInput("search with gradients learns the adapters' weights only; leave out `tune`", param="tune")
    for adapter in job.adapters:
        if adapter.needs_base:
            raise BadInput(f"adapter {adapter.name} is DoRA: its output is not linear in its weight; search with "
                           "gradients takes LoRA adapters")  # fmt: skip
        embedded = next((name for name, m in adapter.modules.items() if m.embedding), None)
        if embedded:
            raise BadInput(f"module {embedded}: search with gradients scales linear layers' LoRA, not embeddings")
        if adapter.config.get("lora_bias") or adapter.dense:
            what = "lora_bias" if adapter.config.get("lora_bias") else "modules_to_save"
            raise BadInput(f"adapter {adapter.name} has {what}: search with gradients learns the low-rank updates' "
                           "coefficients only")  # fmt: skip


def _encode(tokenizer, rows: Sequence[Sample], objective: GradientObjective) -> dict[str, torch.Tensor]:
    """With ``loss``: right-padded prompts and completions (and end-of-sequence), those tokens as labels;
    with ``entropy``: left-padded prompts, so that every prompt's last token is the last position."""
    sequences, labels = [], []
    for row in rows:
        prompt = tokenizer(row.prompt or row.completion)["input_ids"]
        answer = []
        if objective == "loss":  # as the adapters were trained: the completion, then the end of the sequence
            end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            answer = tokenizer(row.completion, add_special_tokens=False)["input_ids"] + end
        sequences.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    left = objective == "entropy"
    ids, mask = padded_batch(sequences, pad_id(tokenizer), left=left, device="cpu")
    target, _ = padded_batch(labels, -100, left=left, device="cpu")
    return {"input_ids": ids, "attention_mask": mask, "labels": target}


def objective_value(model, batch: dict[str, torch.Tensor], objective: GradientObjective) -> torch.Tensor:
    """The mean completion loss, or the mean entropy of the next-token distribution after each prompt."""
    device = next(model.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    if objective == "loss":
        return model(input_ids=ids, attention_mask=mask, labels=batch["labels"].to(device)).loss
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each prompt's positions start at 0
    try:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits[:, -1]
    except TypeError:  # an architecture without logits_to_keep
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1).mean()


class CoefficientSlot:
    """The evaluator's LoRA slot holding every input's factors side by side (task arithmetic at weights 1), and
    hooks that scale each input's rank components by its coefficient in the module's group."""

    def __init__(self, evaluator: Evaluator, job: SearchJob, granularity: Granularity) -> None:
        # the coefficients scale these weights of 1; float32 factors, cast once when written
        plan = replace(job.plan([1.0] * len(job.space.dimensions)), out_dtype=torch.float32)
        self.merged = execute_plan(plan)
        self.groups = sorted({layer_of(m.name) for m in plan.modules}, key=_group_order) if granularity == "layer" \
            else ["all"]  # fmt: skip
        start = torch.tensor(job.space.start, dtype=torch.float64)
        self.start = start[:, None].repeat(1, len(self.groups))
        evaluator.put(self.merged.modules, self.merged.dense)
        self.model = evaluator.model
        device = next(self.model.parameters()).device
        self.coefficients = torch.nn.Parameter(self.start.clone().to(device, torch.float32))
        # per module: the input each rank component comes from, and the column of its coefficients
        self.places = {
            module.name: (torch.repeat_interleave(torch.tensor(module.inputs), torch.tensor(module.input_ranks)),
                          self.groups.index(layer_of(module.name)) if granularity == "layer" else 0)
            for module in plan.modules
        }  # fmt: skip
        root, self.handles = self.model.base_model.model, []
        for name, (owners, group) in self.places.items():
            layer = root.get_submodule(name).lora_A["default"]
            self.handles.append(layer.register_forward_hook(self._scaler(owners.to(device), group)))

    def _scaler(self, owners: torch.Tensor, group: int):
        width = len(owners)

        def scale(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
            factors = self.coefficients[owners, group].to(output.device, output.dtype)
            padding = output.shape[-1] - width  # the slot may be wider than this module's Σ r_i
            if padding:
                factors = torch.cat([factors, factors.new_zeros(padding)])
            return output * factors

        return scale

    def adapter(self) -> LoraAdapter:
        """The merge at the current coefficients: every module's stacked factors, each input's rows of ``A``
        times its coefficient (exactly what the hooked slot computes)."""
        coefficients, modules = self.coefficients.detach().cpu(), {}
        for name, (owners, group) in self.places.items():
            merged = self.merged.modules[name]
            modules[name] = replace(merged, A=merged.A * coefficients[owners, group][:, None])
        return replace(self.merged, modules=modules)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _group_order(group: str) -> tuple[int, int]:
    return (1, 0) if group == "other" else (0, int(group))


def gradient_search(
    job: SearchJob,
    *,
    steps: int,
    batch: int = 16,
    granularity: Granularity = "layer",
    objective: GradientObjective = "entropy",
    learning_rate: float = DEFAULT_LEARNING_RATE,
    progress: Progress | None = None,
) -> tuple[GradientResult, LoraAdapter]:
    """AdaMerging's coefficients for the job's adapters on its dev sets; deterministic for the job's seed (the
    rows of every step are drawn from it). Returns the search and the merge at the learned coefficients."""
    if steps < 1 or batch < 1:
        raise BadInput(f"`budget` (steps) and `batch` must be at least 1 (got {steps} and {batch})", param="budget")
    if objective not in ("entropy", "loss"):
        raise BadInput(f"`objective='{objective}'`: with gradients choose entropy or loss", param="objective")
    if objective == "loss" and not all(all(s.prompt for s in rows) for rows in job.dev.values()):
        raise BadInput("`objective='loss'` with gradients needs prompt/completion dev data", param="objective")
    check_gradient_job(job)
    evaluator = Evaluator(job)
    references = [evaluator.score_reference(i) for i in range(len(job.adapters))]
    slot = CoefficientSlot(evaluator, job, granularity)
    low, high = job.space.dimensions[0].low, job.space.dimensions[0].high
    optimizer = torch.optim.Adam([slot.coefficients], lr=learning_rate)
    rng = random.Random(job.seed)
    tokenizer = evaluator.tokenizer
    values = []
    try:
        for step in range(steps):
            optimizer.zero_grad()
            total = 0.0
            for rows in job.dev.values():  # the sum's gradient, one dev set's graph in memory at a time
                chosen = rng.sample(rows, min(batch, len(rows)))
                value = objective_value(slot.model, _encode(tokenizer, chosen, objective), objective)
                value.backward()
                total += float(value.detach())
            optimizer.step()
            with torch.no_grad():
                slot.coefficients.clamp_(low, high)
            values.append(total)
            if progress is not None:
                progress(step + 1, steps, f"{objective} {total:.4f}")
    finally:
        slot.close()
    merged = slot.adapter()
    scores = evaluator.score_adapter(merged.modules, merged.dense, index=0)
    passes = steps * sum(min(batch, len(rows)) for rows in job.dev.values())
    result = GradientResult(slot.groups, slot.start.tolist(), slot.coefficients.detach().double().tolist(), values,
                            passes, scores, references)  # fmt: skip
    return result, merged
