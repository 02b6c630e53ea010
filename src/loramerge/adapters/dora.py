"""DoRA (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024) in low-rank space.

PEFT folds a DoRA module as ``W' = diag(g) (W0 + s B A)`` with ``g = m / ‖W0 + s B A‖_row`` (the L2 norm of
each output row; ``peft/tuners/lora/dora.py``), so its delta is ``diag(g − 1) W0 + diag(g) s B A``: a row
scaling of the base plus a rank-r direction term. A plain LoRA is ``g = 1``. A weighted sum of such deltas,

    W* = W0 + Σ w_i Δ_i = diag(c) W0 + L,   c = 1 + Σ w_i (g_i − 1),   L = Σ w_i diag(g_i) s_i B_i A_i,

is again one DoRA module: factors of ``diag(c)⁻¹ L`` and magnitude ``c ⊙ ‖W0 + diag(c)⁻¹ L‖_row``. Every
other method runs on the direction terms ``diag(g_i) s_i B_i A_i`` (the merge's ``L``) with the row scalings
combined linearly into ``c`` (docs/adapter_types.md). Only row norms of the base are needed, computed from
``out x r`` products: ``‖w + b A‖² = ‖w‖² + 2 (W0 Aᵀ)_j · b_j + b_j (A Aᵀ) b_jᵀ`` — never an ``out x in`` delta.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import torch

from loramerge.adapters.model import LoraAdapter, LoraModule
from loramerge.errors import BadInput
from loramerge.io import bnb4bit
from loramerge.io.checkpoint import Checkpoint, open_checkpoint
from loramerge.lowrank import LowRank

if TYPE_CHECKING:
    from loramerge.adapters.options import MergeOptions

# |c| below this in some row: the merged row scalings cancel and the result is no DoRA module
_VANISHING_SCALE = 1e-6
# relative residual under which a merge's output A counts as in the span of its inputs' (float32 round-off)
_IN_SPAN = 1e-5


@dataclass(frozen=True)
class BaseProducts:
    """What the row norms ``‖W0 + B A‖`` need of the base weight, from one pass over it: ``‖w_j‖²`` per row and
    ``W0 Sᵀ`` (out x Σ r_i) for the stacked right factors ``S = [A_1; …; A_n]`` of a module's inputs. A merge's
    output whose ``A`` lies in the span of ``S`` (every linear merge, every core-space merge) reuses them."""

    squared: torch.Tensor  # ‖w_j‖² (out)
    stacked: torch.Tensor  # S (Σ r_i x in)
    crosses: torch.Tensor  # W0 Sᵀ (out x Σ r_i)


def base_products(weight: torch.Tensor, terms: Sequence[LowRank]) -> BaseProducts:
    stacked = torch.cat([term.A for term in terms])
    squared = torch.linalg.vector_norm(weight, dim=1).square()  # no out x in temporary, unlike square().sum()
    return BaseProducts(squared, stacked, weight @ stacked.T)


def _norms(products: BaseProducts, cross: torch.Tensor, term: LowRank) -> torch.Tensor:
    """``‖w_j + b_j A‖ = sqrt(‖w_j‖² + 2 (W0 Aᵀ)_j · b_j + b_j (A Aᵀ) b_jᵀ)`` from ``cross = W0 Aᵀ``."""
    own = ((term.B @ (term.A @ term.A.T)) * term.B).sum(dim=1)
    return (products.squared + 2 * (cross * term.B).sum(dim=1) + own).clamp_min(0).sqrt()


def input_norms(products: BaseProducts, terms: Sequence[LowRank]) -> list[torch.Tensor]:
    """``‖W0 + B_i A_i‖_row`` of each input term, in the order they were stacked."""
    norms, start = [], 0
    for term in terms:
        norms.append(_norms(products, products.crosses[:, start : start + term.rank], term))
        start += term.rank
    return norms


def output_norms(products: BaseProducts, weight: torch.Tensor, term: LowRank) -> torch.Tensor:
    """``‖W0 + B A‖_row`` of a merge's output: ``W0 Aᵀ = (W0 Sᵀ) C`` where ``Aᵀ = Sᵀ C`` (least squares, kept
    when exact to float32 round-off), else one more pass over ``W0``."""
    coefficients = torch.linalg.lstsq(products.stacked.T, term.A.T).solution
    residual = torch.linalg.matrix_norm(products.stacked.T @ coefficients - term.A.T)
    if residual <= _IN_SPAN * torch.linalg.matrix_norm(term.A).clamp_min(1e-30):
        return _norms(products, products.crosses @ coefficients, term)
    return _norms(products, weight @ term.A.T, term)


def row_norms(weight: torch.Tensor, term: LowRank) -> torch.Tensor:
    """``‖W0 + B A‖`` of each row, from ``W0 Aᵀ`` (out x r) and ``A Aᵀ`` (r x r): no ``out x in`` matrix."""
    return input_norms(base_products(weight, [term]), [term])[0]


def own_terms(modules: Sequence[LoraModule], device: torch.device | str) -> list[LowRank]:
    """The modules' own ``s B A`` (scale folded, no row scale): what their row norms are of."""
    return [replace(module, row_scale=None).factors(device=device) for module in modules]


def with_row_scales(
    modules: Sequence[LoraModule], terms: Sequence[LowRank], products: BaseProducts
) -> list[LoraModule]:
    """The modules with their ``row_scale`` ``g = m / ‖W0 + s B A‖_row`` set (plain LoRA modules unchanged), from
    their ``own_terms`` and the products of the base weight with them, stacked in this order."""
    device = products.crosses.device
    return [
        replace(module, row_scale=module.magnitude.to(device, torch.float32) / norm) if module.dora else module
        for module, norm in zip(modules, input_norms(products, terms), strict=True)
    ]


def combined_row_scale(modules: Sequence[LoraModule], weights: Sequence[float], rows: int) -> torch.Tensor:
    """``c = 1 + Σ w_i (g_i − 1)``: the row scaling a weighted sum of DoRA (and LoRA, ``g = 1``) deltas puts
    on the base."""
    scales = [module.row_scale for module in modules if module.row_scale is not None]
    scale = torch.ones(rows, device=scales[0].device if scales else "cpu")
    for module, weight in zip(modules, weights, strict=True):
        if module.row_scale is not None:
            scale += weight * (module.row_scale.to(torch.float32) - 1)
    return scale


def dora_module(
    direction: LowRank, row_scale: torch.Tensor, weight: torch.Tensor, products: BaseProducts
) -> LoraModule:
    """The DoRA module whose fold is ``diag(c) W0 + L`` for ``c = row_scale`` and ``L = direction``."""
    if bool((row_scale.abs() < _VANISHING_SCALE).any()):
        row = int(torch.argmin(row_scale.abs()))
        raise BadInput(
            f"the merged DoRA row scalings cancel in row {row} (1 + Σ w_i (g_i − 1) = "
            f"{float(row_scale[row]):.2g}); these weights give no DoRA adapter"
        )
    B = direction.B / row_scale.unsqueeze(1)
    magnitude = row_scale * output_norms(products, weight, LowRank(B, direction.A))
    return LoraModule(A=direction.A, B=B, scale=1.0, magnitude=magnitude)


def dora_delta(module: LoraModule, weight: torch.Tensor) -> torch.Tensor:
    """The dense delta PEFT's fold of a DoRA module adds to ``W0`` (float32; for tests and folding)."""
    direct = replace(module, row_scale=None, magnitude=None).delta()
    folded = weight + direct
    g = module.magnitude.to(torch.float32) / torch.linalg.vector_norm(folded, dim=1)
    return g.unsqueeze(1) * folded - weight


def base_to_read(
    adapters: Sequence[LoraAdapter], base: str | BaseReader | None, options: MergeOptions
) -> str | BaseReader | None:
    """The base a merge reads: where an input is DoRA (its row norms) or LARV scales the merge (its diagnostics);
    None otherwise, so a merge of plain LoRA never opens a base it was given for folding or scoring.
    Single-file (diffusion) LoRAs read a diffusion model's weights by their own module names
    (``DiffusionBaseWeights``)."""
    from loramerge.adapters.diffusion_base import DiffusionBaseWeights
    from loramerge.adapters.single_file import FORMAT_KEY

    if not options.layer_scaled and not any(adapter.needs_base for adapter in adapters):
        return None
    if isinstance(base, str) and any(adapter.config.get(FORMAT_KEY) for adapter in adapters):
        return DiffusionBaseWeights(base)
    return base


class BaseReader(Protocol):
    """Where a merge reads the base (DoRA's row norms, LARV's diagnostics): a checkpoint (``BaseWeights``) or a live
    model's layers."""

    ref: str  # how messages name the base

    def shape(self, module: str) -> tuple[int, ...]: ...

    def weight(self, module: str) -> torch.Tensor: ...


class BaseWeights:
    """The base model's weights by module name, read one at a time in float32 and ``out x in`` (4-bit
    weights dequantized, Conv1D weights transposed): what DoRA's row norms and LARV's diagnostics are computed
    from."""

    def __init__(self, ref: str, fan_in_fan_out: bool = False) -> None:
        self.ref = ref
        self.checkpoint: Checkpoint = open_checkpoint(ref)
        self.quantized = bnb4bit.quantized_weights(self.checkpoint.names)
        self.fan_in_fan_out = fan_in_fan_out

    def shape(self, module: str) -> tuple[int, ...]:
        key = self._key(module)
        shape = bnb4bit.stored_shape(self.checkpoint, key, self.quantized)
        return tuple(reversed(shape)) if self.fan_in_fan_out else shape

    def weight(self, module: str) -> torch.Tensor:
        """One module's weight (its shape checked by the caller's plan, from ``shape``)."""
        tensor = bnb4bit.read_weight(self.checkpoint, self._key(module), self.quantized).to(torch.float32)
        return tensor.T if self.fan_in_fan_out else tensor

    def identity(self, module: str) -> tuple[object, ...]:
        """What one module's weight is read from (file, size, modification time, tensor, orientation): equal
        identities, equal weights, so a quantity of the base alone can be kept across merges."""
        key = self._key(module)
        path = self.checkpoint.files[key]
        stat = path.stat()
        return str(path.resolve()), stat.st_size, stat.st_mtime_ns, key, self.fan_in_fan_out

    def _key(self, module: str) -> str:
        key = f"{module}.weight"
        if key not in self.checkpoint.files:
            raise BadInput(f"module {module}: the base {self.ref} has no tensor {key}")
        return key
