"""prunekit: training-free visual token pruning for multimodal LLMs on native transformers models."""

from .errors import PruningError
from .contracts import ContractError, UnsupportedTransformersError
from .hookspecs import hookimpl, hookspec
from .interfaces import (
    Choice,
    InsertionPoint,
    Method,
    ModelAdapter,
    ModelSpec,
    Patch,
    Reduction,
    Scorer,
    ScorerRun,
    SelectionInput,
    Selector,
    Stage,
    StageContext,
)
from .registry import registry
from .config import MethodConfig, BudgetConfig
from .report import PruningReport, StageRecord
from .saved import save_config, saved_config
from .api import (
    UnsupportedModelError,
    adapter_for,
    build,
    disabled,
    get_method,
    inspect,
    is_patched,
    list_adapters,
    list_insertion_points,
    list_methods,
    list_scorers,
    list_selectors,
    make_config,
    reduce,
    remove,
    select,
)

__version__ = "0.1.0"

__all__ = [
    "hookimpl", "hookspec", "registry",
    "InsertionPoint", "Method", "ModelAdapter", "ModelSpec", "Patch", "Scorer", "ScorerRun", "SelectionInput",
    "Selector", "Stage", "StageContext", "MethodConfig", "BudgetConfig", "PruningReport", "StageRecord",
    "UnsupportedModelError", "adapter_for", "build", "disabled", "get_method", "inspect", "is_patched",
    "list_adapters", "list_insertion_points", "list_methods", "list_scorers", "list_selectors", "make_config",
    "reduce", "remove", "select", "Choice", "Reduction", "save_config", "saved_config",
    "PruningError", "ContractError", "UnsupportedTransformersError",
]
