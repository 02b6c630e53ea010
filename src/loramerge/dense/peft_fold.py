"""Adapters loramerge cannot read as low-rank terms (IA3, OFT, BOFT, VeRA, HRA, FourierFT, …), merged through
PEFT's own fold: each is folded into the base by PEFT's ``merge_and_unload``, its dense delta is the folded
weights minus the base's, and the chosen method merges those deltas tensor by tensor (the full space).

The result is exact for the method; it is written as the folded model, or as a LoRA extracted from each
module's merged delta at the rank asked for (the best rank-K approximation, Eckart–Young–Mirsky), with its
relative error reported. Every adapter's changed weights are held in memory as float32: this path is for
the adapter types that have no low-rank form, not for LoRA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loramerge import catalogue
from loramerge.adapters.model import LoraAdapter, LoraModule
from loramerge.adapters.options import MergeOptions
from loramerge.errors import BadInput, brief
from loramerge.folding.extract import CONV1D_MODELS, low_rank_factors, oriented_delta
from loramerge.io.checkpoint import resolve_model_dir
from loramerge.io.model_card import MergeRecord, merged_adapter_card
from loramerge.io.peft_config import extracted_lora_config
from loramerge.kernels import run_kernel
from loramerge.seeding import tensor_generators, tensor_seed

# methods that have no kernel of their own (they work on LoRA factors): on dense deltas they are the plain sum
_SUMS = {"cat": "linear", "svd": "linear"}


@dataclass
class DenseMerge:
    """The merged delta of every changed base tensor (float32, in the base's layout)."""

    base: str
    deltas: dict[str, torch.Tensor]
    conv1d: bool
    inputs: list[tuple[str, str, float]]  # (adapter, its peft_type, weight)


def peft_type_of(ref: str) -> str:
    """An adapter folder's ``peft_type``, upper-case; empty where the config cannot be read (the loader then
    says what is wrong with it)."""
    import json

    from loramerge.adapters.files import CONFIG_NAME, resolve_adapter_dir

    try:
        config = json.loads((resolve_adapter_dir(ref) / CONFIG_NAME).read_text())
    except (OSError, ValueError, BadInput):
        return ""
    return str(config.get("peft_type", "")).upper() if isinstance(config, dict) else ""


def peft_folded_deltas(base: str, adapters: Sequence[str]) -> tuple[list[dict[str, torch.Tensor]], bool]:
    """Each adapter folded into ``base`` by PEFT (``merge_and_unload``), as its changed tensors minus the base's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one bar per load would bury the command's own lines
    folder = resolve_model_dir(base)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise BadInput(f"model {base}: transformers cannot load it ({brief(error)})") from error
    start = {key: value.detach().clone() for key, value in model.state_dict().items()}
    conv1d = getattr(model.config, "model_type", None) in CONV1D_MODELS
    deltas = []
    for ref in adapters:
        try:
            folded = PeftModel.from_pretrained(model, ref).merge_and_unload()
        except (OSError, ValueError, RuntimeError, AttributeError, TypeError, KeyError) as error:  # KeyError: type
            raise BadInput(f"adapter {ref}: PEFT cannot fold it into {base} ({brief(error)})") from error
        state = folded.state_dict()
        changed = {}
        for key, value in state.items():
            if key in start and value.is_floating_point():
                delta = value.detach().to(torch.float32) - start[key]
                if delta.abs().max() > 0:
                    changed[key] = delta
        if not changed:
            raise BadInput(f"adapter {ref}: PEFT's fold changes no weight of {base}; nothing to merge")
        deltas.append(changed)
        folded.load_state_dict(start)  # the next adapter folds into the base itself
        model = folded
    return deltas, conv1d


def check_dense_merge(count: int, weights: Sequence[float], options: MergeOptions):
    """The kernel a merge through PEFT's fold runs, after the checks it needs (before any model is read)."""
    if len(weights) != count:
        raise BadInput(f"got {len(weights)} weights for {count} adapters")
    if not any(weights):
        raise BadInput("the merge weights are all zero")
    if options.method == "robustmerge":
        raise BadInput("method robustmerge works on LoRA factors; adapters merged through PEFT's fold have none")
    if options.layer_scaled:
        raise BadInput(f"larv={options.larv[0]} scales each block's low-rank updates; adapters merged through PEFT's "
                       "fold have none: merge without `via_dense`")  # fmt: skip
    return catalogue.method(_SUMS.get(options.method, options.method))


def merge_dense_deltas(
    base: str, adapters: Sequence[str], weights: Sequence[float], options: MergeOptions, kinds: Sequence[str]
) -> DenseMerge:
    """The chosen method on the PEFT-folded deltas of ``adapters``, tensor by tensor."""
    method = check_dense_merge(len(adapters), weights, options)
    per_adapter, conv1d = peft_folded_deltas(base, adapters)
    keys = sorted({key for deltas in per_adapter for key in deltas})
    merged: dict[str, torch.Tensor] = {}
    for key in keys:
        present = [i for i, deltas in enumerate(per_adapter) if key in deltas]
        tasks = torch.stack([per_adapter[i][key] for i in present])
        key_weights = torch.tensor([float(weights[i]) for i in present])
        if tasks.dim() != 3 and method.level == "matrix":  # a whole-matrix method on a vector: the weighted sum
            merged[key] = (key_weights.view(-1, *[1] * (tasks.dim() - 1)) * tasks).sum(0)
            continue
        generators = tensor_generators(options.seed, f"{key}/dense", present, "cpu") if method.random else None
        try:
            merged[key] = run_kernel(method, tasks, key_weights, options.kernel_params, generators)
        except BadInput as error:
            raise BadInput(f"tensor {key}: {error}") from None
    inputs = [(ref, kind, float(w)) for ref, kind, w in zip(adapters, kinds, weights, strict=True)]
    return DenseMerge(base, merged, conv1d, inputs)


def as_exact_adapter(merge: DenseMerge) -> LoraAdapter:
    """The merged deltas as an adapter ``loramerge fold`` writes exactly: every changed tensor as a replacement
    copy ``base + Δ`` (no factors: a dense delta has no smaller exact form)."""
    from loramerge.io.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(merge.base)
    missing = sorted(set(merge.deltas) - set(checkpoint.names))
    if missing:  # a tied weight (lm_head sharing embed_tokens) is stored once
        raise BadInput(f"tensor {missing[0]}: changed by the merge but not stored in the base {merge.base}")
    dense = {key: checkpoint.get(key).to(torch.float32) + delta for key, delta in merge.deltas.items()}
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1}
    return LoraAdapter(modules={}, config=config, dense=dense, source="merged through PEFT's fold")


@dataclass
class ExtractedMerge:
    adapter: LoraAdapter
    relative_error: float  # ‖Δ − B A‖_F / ‖Δ‖_F over every extracted module together
    skipped: list[str]  # changed tensors a LoRA cannot hold (1-D: norms, biases)


def extract_adapter(merge: DenseMerge, rank: int, options: MergeOptions, record: MergeRecord) -> ExtractedMerge:
    """A LoRA of the merged deltas at ``rank`` (the exact SVD, or the seeded range finder with
    ``full_svd='randomized'``), with its relative error."""
    if rank < 1:
        raise BadInput(f"`rank` must be at least 1, got {rank}")
    modules, skipped, lost, total = {}, [], 0.0, 0.0
    for key, delta in merge.deltas.items():
        if delta.dim() != 2 or not key.endswith(".weight"):
            skipped.append(key)
            continue
        module, oriented, embedding = oriented_delta(key, delta, merge.conv1d)
        seed = tensor_seed(options.seed, f"{module}/svd", 0)
        B, A, energy = low_rank_factors(oriented, min(rank, *oriented.shape), options.full_svd == "randomized", seed)
        norm = oriented.square().sum().item()
        total += norm
        lost += (1 - energy) * norm
        modules[module] = LoraModule(A=A.contiguous(), B=B.contiguous(), scale=1.0, embedding=embedding)
    if not modules:
        raise BadInput("the merged adapters change no 2-D weight: no LoRA can hold the merge; fold it instead")
    ranks = {name: module.rank for name, module in modules.items()}
    config = extracted_lora_config(ranks, rank, merge.base, merge.conv1d)
    adapter = LoraAdapter(modules=modules, config=config, source="merged")
    adapter.card = merged_adapter_card(record, merge.base)
    return ExtractedMerge(adapter, math.sqrt(lost / total) if total > 0 else 0.0, skipped)
