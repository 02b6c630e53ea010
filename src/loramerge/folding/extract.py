"""``loramerge extract``: the best rank-K LoRA of ``MODEL - BASE``, module by module (Eckart–Young–Mirsky).

So a dense merge can be shipped as a merged adapter. Exact SVD by default; ``fast`` uses the seeded
randomized range finder (Halko, Martinsson & Tropp 2011). Both are the full space's own truncations
(``lowrank.svd``), so an extracted adapter and a full-space merge are cut the same way, and two runs
write the same bits. Reports each module's captured energy ``Σ_{i≤K} σ_i² / ‖Δ‖_F²``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from loramerge.adapters.model import LoraAdapter, LoraModule
from loramerge.errors import BadInput
from loramerge.io.checkpoint import open_checkpoint
from loramerge.io.model_card import extracted_adapter_card
from loramerge.io.peft_config import extracted_lora_config
from loramerge.lowrank.factored import LowRank
from loramerge.lowrank.svd import truncate_dense, truncate_dense_randomized
from loramerge.seeding import tensor_seed

Progress = Callable[[int, int, str], None]
_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in")
CONV1D_MODELS = {"gpt2"}  # checkpoints that store linear weights as in x out (Conv1D)


@dataclass
class Extraction:
    adapter: LoraAdapter
    energy: dict[str, float]  # module -> captured fraction of ‖Δ‖_F²
    skipped: list[str] = field(default_factory=list)  # changed tensors a LoRA cannot hold (norms, biases)


def captured_energy(factors: LowRank, delta: torch.Tensor) -> float:
    """``‖B A‖_F² / ‖Δ‖_F²`` of a truncation: ``A`` has orthonormal rows, so ``‖B A‖_F = ‖B‖_F`` (for the
    exact SVD, ``Σ_{i≤k} σ_i²``; for the range finder, the energy of the projection it keeps)."""
    total = delta.pow(2).sum().item()
    return min(factors.B.pow(2).sum().item() / total, 1.0) if total > 0 else 1.0


def oriented_delta(name: str, delta: torch.Tensor, conv1d: bool) -> tuple[str, torch.Tensor, bool]:
    """The module a 2-D weight's delta belongs to, the delta as ``out x in`` (``B @ A``'s orientation: embeddings
    and Conv1D weights are stored transposed), and whether the module is an embedding."""
    module = name.removesuffix(".weight")
    embedding = any(part in module for part in _EMBEDDINGS)
    return module, (delta.T if embedding or conv1d else delta), embedding


def low_rank_factors(delta: torch.Tensor, rank: int, fast: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``B`` (out x k), ``A`` (k x in) with ``B A`` the best rank-k approximation (near-best with ``fast``,
    drawn from ``seed``), and the energy kept."""
    factors = truncate_dense_randomized(delta, rank, seed) if fast else truncate_dense(delta, rank)
    return factors.B, factors.A, captured_energy(factors, delta)


def extract_lora(
    model_ref: str,
    base_ref: str,
    rank: int,
    *,
    fast: bool = False,
    seed: int = 0,
    progress: Progress | None = None,
) -> Extraction:
    """``seed`` draws ``fast``'s sketches, one per module from (seed, module name) alone, as a full-space
    merge draws its own (``seeding.tensor_seed``): the result depends on neither the module order nor
    anything drawn before."""
    if rank < 1:
        raise BadInput(f"`rank` must be at least 1, got {rank}")
    model, base = open_checkpoint(model_ref), open_checkpoint(base_ref)
    only_model = sorted(set(model.names) - set(base.names))
    if only_model:
        raise BadInput(f"tensor {only_model[0]}: in {model_ref} but not in the base {base_ref}")
    conv1d = model.config.get("model_type") in CONV1D_MODELS
    modules: dict[str, LoraModule] = {}
    energy: dict[str, float] = {}
    skipped: list[str] = []
    names = [name for name in base.names if name in model.files]
    for done, name in enumerate(names, start=1):
        shape, dtype = base.layout(name)
        model_shape = model.layout(name)[0]
        if model_shape != shape:
            raise BadInput(f"tensor {name}: {model_ref} has shape {model_shape}, the base {shape}")
        if dtype.is_floating_point:
            delta = model.get(name).to(torch.float32) - base.get(name).to(torch.float32)
            if delta.abs().max() > 0:
                if len(shape) == 2 and name.endswith(".weight"):
                    module, oriented, embedding = oriented_delta(name, delta, conv1d)
                    module_seed = tensor_seed(seed, f"{module}/svd", 0)
                    B, A, energy[module] = low_rank_factors(oriented, rank, fast, module_seed)
                    modules[module] = LoraModule(A=A.contiguous(), B=B.contiguous(), scale=1.0, embedding=embedding)
                else:
                    skipped.append(name)
        if progress is not None:
            progress(done, len(names), name)
    if not modules:
        raise BadInput(f"{model_ref} does not differ from {base_ref} in any 2-D weight: nothing to extract")
    config = extracted_lora_config({name: module.rank for name, module in modules.items()}, rank, base_ref, conv1d)
    card = extracted_adapter_card(model_ref, base_ref, rank, energy)
    return Extraction(LoraAdapter(modules=modules, config=config, source=model_ref, card=card), energy, skipped)
