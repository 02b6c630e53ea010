"""What an adapter holds and, for several, what they share and where they conflict (``loramerge inspect``)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from loramerge.adapters.checks import check_base_models, check_layouts, check_shapes
from loramerge.adapters.model import LoraAdapter
from loramerge.errors import BadInput
from loramerge.io.peft_config import module_rank_and_alpha
from loramerge.lowrank import frobenius_inner


@dataclass
class AdapterSummary:
    source: str
    kind: str  # LoRA, DoRA, LoHa, LoKr (+bias)
    base_model: str | None
    modules: int
    ranks: dict[int, int]  # rank -> number of modules
    alphas: list[float]
    scales: list[float]
    dtype: str
    use_rslora: bool
    fan_in_fan_out: bool
    target_modules: list[str] | str
    dense_tensors: list[str]
    parameters: int
    module_norms: dict[str, float]  # ||scale · B A||_F per module

    @property
    def norm_mean(self) -> float:
        return sum(self.module_norms.values()) / max(len(self.module_norms), 1)


@dataclass
class PairSummary:
    first: int
    second: int
    shared_modules: int
    cosine_mean: float  # mean over shared modules of cos(Δ_first, Δ_second)
    opposed_modules: int  # shared modules whose deltas point against each other (cosine < 0)


@dataclass
class SetSummary:
    shared_modules: list[str]
    only_in: dict[str, list[str]]
    conflicts: list[str] = field(default_factory=list)
    pairs: list[PairSummary] = field(default_factory=list)


def delta_norm(adapter: LoraAdapter, name: str) -> float:
    factors = adapter.modules[name].factors()
    return math.sqrt(max(frobenius_inner(factors, factors).item(), 0.0))


def summarize_adapter(adapter: LoraAdapter) -> AdapterSummary:
    config = adapter.config
    modules = adapter.modules.values()
    if str(config.get("peft_type", "LORA")).upper() not in ("LOHA", "LOKR"):  # LoRA, DoRA: the scale's alpha
        alphas = sorted({m.scale * (math.sqrt(m.rank) if config.get("use_rslora") else m.rank) for m in modules})
    else:  # LoHa and LoKr: ranks here are the exact factors' (r², rank(W1)·rank(W2)), not the config's r
        alphas = sorted({module_rank_and_alpha(config, name)[1] for name in adapter.modules})
    return AdapterSummary(
        source=adapter.name,
        kind=adapter.kind,
        base_model=adapter.base_model,
        modules=len(adapter.modules),
        ranks=dict(sorted(Counter(m.rank for m in modules).items())),
        alphas=[round(alpha, 6) for alpha in alphas],
        scales=sorted({round(m.scale, 6) for m in modules}),
        dtype=str(adapter.dtype).removeprefix("torch."),
        use_rslora=bool(config.get("use_rslora")),
        fan_in_fan_out=adapter.fan_in_fan_out,
        target_modules=config.get("target_modules") or [],
        dense_tensors=sorted(adapter.dense),
        parameters=adapter.stored_parameters or _parameters(adapter),
        module_norms={name: delta_norm(adapter, name) for name in adapter.modules},
    )


def _parameters(adapter: LoraAdapter) -> int:
    """Entries of an adapter's tensors: factors, DoRA magnitudes, lora_bias vectors and dense copies."""
    vectors = (v for m in adapter.modules.values() for v in (m.magnitude, m.bias) if v is not None)
    factors = sum(m.A.numel() + m.B.numel() for m in adapter.modules.values())
    return factors + sum(v.numel() for v in vectors) + sum(t.numel() for t in adapter.dense.values())


def _pair(adapters: Sequence[LoraAdapter], first: int, second: int, shared: list[str]) -> PairSummary:
    cosines = []
    for name in shared:
        x = adapters[first].modules[name].factors()
        y = adapters[second].modules[name].factors()
        denominator = math.sqrt(max(frobenius_inner(x, x).item() * frobenius_inner(y, y).item(), 0.0))
        cosines.append(frobenius_inner(x, y).item() / denominator if denominator > 0 else 0.0)
    mean = sum(cosines) / len(cosines) if cosines else float("nan")
    return PairSummary(first, second, len(shared), mean, sum(cos < 0 for cos in cosines))


def _conflict(check: Callable[..., object], adapters: Sequence[LoraAdapter], **keywords: object) -> str | None:
    """What ``check`` refuses in the set, or None."""
    try:
        check(adapters, **keywords)
    except BadInput as conflict:
        return str(conflict)
    return None


def summarize_set(adapters: Sequence[LoraAdapter]) -> SetSummary:
    names = [set(adapter.modules) for adapter in adapters]
    shared = sorted(set.intersection(*names))
    summary = SetSummary(
        shared_modules=shared,
        only_in={a.name: sorted(n - set.intersection(*names)) for a, n in zip(adapters, names, strict=True)},
    )
    shape_conflict = _conflict(check_shapes, adapters)
    found = (shape_conflict, _conflict(check_layouts, adapters), _conflict(check_base_models, adapters, strict=True))
    summary.conflicts += [conflict for conflict in found if conflict]
    dtypes = {adapter.dtype for adapter in adapters}
    if len(dtypes) > 1:
        summary.conflicts.append(
            f"dtypes differ ({', '.join(sorted(str(d) for d in dtypes))}); merge computes in float32"
        )
    if shape_conflict is None:  # factors of different shapes have no cosine
        for first in range(len(adapters)):
            for second in range(first + 1, len(adapters)):
                both = sorted(set(adapters[first].modules) & set(adapters[second].modules))
                summary.pairs.append(_pair(adapters, first, second, both))
    return summary
