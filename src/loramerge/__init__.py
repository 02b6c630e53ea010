"""loramerge: merge LoRA adapters of one base model in low-rank space.

The public API loads on first use, so the command line starts without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "BadInput": "loramerge.errors",
    "LoraAdapter": "loramerge.adapter",
    "LoraModule": "loramerge.adapter",
    "MergeOptions": "loramerge.options",
    "MergePlan": "loramerge.adapter_merge",
    "execute_plan": "loramerge.adapter_merge",
    "merge_adapters": "loramerge.adapter_merge",
    "plan_merge": "loramerge.adapter_merge",
    "load_adapter": "loramerge.io.adapters",
    "add_weighted_adapter": "loramerge.live",
    "fold": "loramerge.fold_checkpoint",
    "merge_checkpoints": "loramerge.checkpoint_merge",
    "extract_lora": "loramerge.extract",
    "save_adapter": "loramerge.io.adapters",
}
__all__ = [
    "BadInput",
    "LoraAdapter",
    "LoraModule",
    "MergeOptions",
    "MergePlan",
    "add_weighted_adapter",
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
    from loramerge.adapter import LoraAdapter, LoraModule
    from loramerge.adapter_merge import MergePlan, execute_plan, merge_adapters, plan_merge
    from loramerge.checkpoint_merge import merge_checkpoints
    from loramerge.errors import BadInput
    from loramerge.extract import extract_lora
    from loramerge.fold_checkpoint import fold
    from loramerge.io.adapters import load_adapter, save_adapter
    from loramerge.live import add_weighted_adapter
    from loramerge.options import MergeOptions


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'loramerge' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
