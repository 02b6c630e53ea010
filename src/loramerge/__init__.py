"""loramerge: merge LoRA adapters of one base model in low-rank space.

The public API loads on first use, so the command line starts without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "BadInput": "loramerge.errors",
    "LoraAdapter": "loramerge.adapters.model",
    "LoraModule": "loramerge.adapters.model",
    "MergeOptions": "loramerge.adapters.options",
    "MergePlan": "loramerge.adapters.merge",
    "execute_plan": "loramerge.adapters.merge",
    "merge_adapters": "loramerge.adapters.merge",
    "plan_merge": "loramerge.adapters.merge",
    "load_adapter": "loramerge.adapters.files",
    "add_weighted_adapter": "loramerge.adapters.live",
    "calibration_grams": "loramerge.evaluate.activations",
    "fold": "loramerge.folding.stream",
    "merge_checkpoints": "loramerge.dense.engine",
    "extract_lora": "loramerge.folding.extract",
    "save_adapter": "loramerge.adapters.files",
}
__all__ = [
    "BadInput",
    "LoraAdapter",
    "LoraModule",
    "MergeOptions",
    "MergePlan",
    "add_weighted_adapter",
    "calibration_grams",
    "execute_plan",
    "extract_lora",
    "fold",
    "load_adapter",
    "merge_adapters",
    "merge_checkpoints",
    "plan_merge",
    "save_adapter",
]

if TYPE_CHECKING:
    from loramerge.adapters.files import load_adapter, save_adapter
    from loramerge.adapters.live import add_weighted_adapter
    from loramerge.adapters.merge import MergePlan, execute_plan, merge_adapters, plan_merge
    from loramerge.adapters.model import LoraAdapter, LoraModule
    from loramerge.adapters.options import MergeOptions
    from loramerge.dense.engine import merge_checkpoints
    from loramerge.errors import BadInput
    from loramerge.evaluate.activations import calibration_grams
    from loramerge.folding.extract import extract_lora
    from loramerge.folding.stream import fold


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'loramerge' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
