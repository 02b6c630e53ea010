"""The worker side of a search: one base model loaded once with a LoRA slot wide enough for every
candidate; each task puts a merge (or one input adapter) into that slot and scores the dev sets.

A worker gets everything but the base model by value (``SearchJob``: the adapters' tensors, the dev
samples, the search space), so local processes and Ray actors need no access to the adapter or data
files; the base model is loaded by reference (a path, a Hub id in the cache, a ``pkg:`` file)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from loramerge.adapters.dora import row_norms
from loramerge.adapters.files import adapter_state_dict, save_adapter
from loramerge.adapters.live import LiveBaseWeights
from loramerge.adapters.merge import execute_plan
from loramerge.adapters.model import LoraAdapter, LoraModule
from loramerge.adapters.param_targets import config_ranks
from loramerge.errors import BadInput
from loramerge.evaluate.exact_match import evaluate
from loramerge.evaluate.models import load_model
from loramerge.io.peft_config import merged_lora_config
from loramerge.search.job import SearchJob


@dataclass(frozen=True)
class Task:
    """Score the merge at ``point``, or (``reference``) that input adapter alone."""

    index: int
    point: tuple[float, ...] = ()
    reference: int | None = None


@dataclass(frozen=True)
class Scores:
    index: int
    exact_match: dict[str, float | None] = field(default_factory=dict)  # per dev set
    loss: dict[str, float] = field(default_factory=dict)
    refused: str = ""  # why the merge at this point cannot be made (all weights 0, a kernel's limit): no scores


def slot_ranks(job: SearchJob) -> dict[str, int]:
    """Per module, a rank that holds any candidate merge and every input adapter: the searched values
    (weights, density, alpha, …) never change a merge's output ranks, which the plan fixes."""
    plan = job.plan(job.space.start)
    return {m.name: max(m.output_rank, *m.input_ranks) for m in plan.modules}


def padded(
    modules: dict[str, LoraModule],
    ranks: dict[str, int],
    like: dict[str, LoraModule],
    bias: bool = False,
    base_norms: dict[str, torch.Tensor] | None = None,
) -> dict:
    """``modules`` (scale folded in) widened with zero rank components to ``ranks``; absent ones zero; with
    ``bias`` (a ``lora_bias`` slot) every module's bias delta, zero where it has none. A DoRA slot keeps each
    module's magnitude, and gives an absent module the base's row norms (``base_norms``: no change, ``g = 1``)."""
    result = {}
    for name, rank in ranks.items():
        shape, embedding = like[name].shape, like[name].embedding
        A, B = torch.zeros(rank, shape[1]), torch.zeros(shape[0], rank)
        vector = torch.zeros(shape[0]) if bias else None
        magnitude = base_norms[name] if base_norms is not None else None
        if name in modules:
            factors = modules[name].factors()  # zero rank components leave B A, and so DoRA's norms, unchanged
            A[: factors.rank], B[:, : factors.rank] = factors.A, factors.B
            if bias and modules[name].bias is not None:
                vector = modules[name].bias_delta()
            if modules[name].magnitude is not None:
                magnitude = modules[name].magnitude
        result[name] = LoraModule(A=A, B=B, scale=1.0, embedding=embedding, bias=vector, magnitude=magnitude)
    return result


class Evaluator:
    """Loads the base once (in a worker process or Ray actor) and scores tasks on it."""

    def __init__(self, job: SearchJob) -> None:
        from peft import set_peft_model_state_dict
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
        torch.set_num_threads(job.threads)
        self.job = job
        self.ranks = slot_ranks(job)
        self.like = {name: m for adapter in job.adapters for name, m in adapter.modules.items()}  # shapes, kinds
        start = execute_plan(job.plan(job.space.start))
        self.dense = start.dense
        configs = [adapter.config for adapter in job.adapters]
        self.bias = bool(start.config.get("lora_bias"))
        self.dora = bool(start.config.get("use_dora"))
        ranks, parameter_rank = config_ranks(self.ranks)
        self.config = merged_lora_config(configs, ranks, start.base_model, start.config.get("modules_to_save") or [],
                                         self.dora, self.bias, parameter_rank)  # fmt: skip
        self.load_state = set_peft_model_state_dict
        self.base_norms: dict[str, torch.Tensor] | None = None
        with tempfile.TemporaryDirectory(prefix="loramerge-search-") as scratch:  # a DoRA slot needs magnitudes
            slot = save_adapter(self._adapter(start.modules if self.dora else {}, self.dense), Path(scratch) / "slot")
            self.model, self.tokenizer = load_model(job.base, adapter=str(slot), load_in_4bit=job.load_in_4bit,
                                                    device=job.device)  # fmt: skip
        self.reader = LiveBaseWeights(self.model, job.adapters[0].fan_in_fan_out) if self.dora else None
        if self.reader is not None:  # what an absent module's magnitude must be: its base rows' norms (g = 1)
            self.base_norms = {name: torch.linalg.vector_norm(self.reader.weight(name), dim=1).cpu()
                               for name in self.ranks}  # fmt: skip

    def _adapter(self, modules: dict[str, LoraModule], dense: dict[str, torch.Tensor]) -> LoraAdapter:
        modules = padded(modules, self.ranks, self.like, self.bias, self.base_norms)
        return LoraAdapter(modules=modules, config=self.config, dense=dense)

    def _alone(self, index: int) -> dict[str, LoraModule]:
        """One input adapter's modules as the slot holds them; in a DoRA slot, with the magnitudes that give its
        own delta: a DoRA input's own, a LoRA input's rows' norms ``‖W0 + s B A‖`` (``g = 1``)."""
        adapter = self.job.adapters[index]
        if self.reader is None or adapter.needs_base:
            return adapter.modules
        modules = {}
        for name, module in adapter.modules.items():
            weight = self.reader.weight(name)
            modules[name] = replace(module, magnitude=row_norms(weight, module.factors(device=weight.device)).cpu())
        return modules

    def put(self, modules: dict[str, LoraModule], dense: dict[str, torch.Tensor]) -> None:
        """Load a merge (or one adapter) into the slot."""
        state = {
            key: value.to(torch.float32) for key, value in adapter_state_dict(self._adapter(modules, dense)).items()
        }
        loaded = self.load_state(self.model, state)
        if loaded.unexpected_keys:
            raise AssertionError(f"the LoRA slot lacks {loaded.unexpected_keys[:3]}")

    def score_adapter(self, modules: dict[str, LoraModule], dense: dict[str, torch.Tensor], index: int) -> Scores:
        """Put a merge into the slot and score it on every dev set."""
        self.put(modules, dense)
        results = {name: evaluate(self.model, self.tokenizer, samples, f"task {index}", data=name)
                   for name, samples in self.job.dev.items()}  # fmt: skip
        return Scores(index, {k: r.exact_match for k, r in results.items()},
                      {k: r.loss for k, r in results.items()})  # fmt: skip

    def score_reference(self, index: int) -> Scores:
        """Input adapter ``index`` alone on every dev set."""
        adapter = self.job.adapters[index]
        return self.score_adapter(self._alone(index), {**self.dense, **adapter.dense}, -1 - index)

    def score(self, task: Task) -> Scores:
        if task.reference is not None:
            return replace(self.score_reference(task.reference), index=task.index)
        try:  # a point the merge refuses (all weights 0, DELLA's density + epsilon past 1) is not fatal
            merged = execute_plan(self.job.plan(task.point, self.reader))
        except BadInput as error:
            return Scores(task.index, refused=str(error))
        return self.score_adapter(merged.modules, merged.dense, task.index)
