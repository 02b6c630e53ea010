"""loramerge: merge LoRA adapters of one base model in low-rank space."""

from loramerge.adapter import LoraAdapter, LoraModule
from loramerge.adapter_merge import MergePlan, execute_plan, merge_adapters, plan_merge
from loramerge.errors import BadInput
from loramerge.io.adapters import load_adapter, save_adapter
from loramerge.options import MergeOptions

__all__ = [
    "BadInput",
    "LoraAdapter",
    "LoraModule",
    "MergeOptions",
    "MergePlan",
    "execute_plan",
    "load_adapter",
    "merge_adapters",
    "plan_merge",
    "save_adapter",
]
__version__ = "0.1.0"
