"""prunekit: training-free visual token pruning for multimodal LLMs on native transformers models.

This namespace is the user API (build, select, configs, reports, errors). Plugin authors import from
:mod:`prunekit.plugin`; test helpers and the conformance suite live in :mod:`prunekit.testing`; the bundled model,
``prunekit eval`` and ``prunekit bench`` in :mod:`prunekit.tools` (extra ``prunekit[tools]``).
"""

from .errors import (
    BudgetError,
    PrunekitError,
    PruningError,
    RegistryError,
    UnknownNameError,
    UnsupportedModelError,
)
from .contracts import ContractError, UnsupportedTransformersError
from .config import MethodConfig, BudgetConfig
from .report import PruningReport, StageRecord
from .saved import save_config, saved_config
from .api import (
    adapter_for,
    build,
    disabled,
    get_method,
    is_patched,
    list_adapters,
    list_insertion_points,
    list_methods,
    list_scorers,
    list_selectors,
    make_config,
    pruning_report,
    reduce,
    remove,
    select,
)

__version__ = "0.1.0"

__all__ = [
    # patching a model
    "build", "remove", "disabled", "is_patched", "pruning_report", "adapter_for", "save_config", "saved_config",
    # model-free selection
    "select", "reduce",
    # configuration and discovery
    "make_config", "get_method", "MethodConfig", "BudgetConfig",
    "list_methods", "list_adapters", "list_scorers", "list_selectors", "list_insertion_points",
    # results
    "PruningReport", "StageRecord",
    # errors
    "PrunekitError", "PruningError", "BudgetError", "RegistryError", "UnknownNameError", "UnsupportedModelError",
    "ContractError", "UnsupportedTransformersError",
]
from . import plugin  # the plugin-author namespace (prunekit.plugin), loaded with the package
