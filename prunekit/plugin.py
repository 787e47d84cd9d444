"""The plugin-author API: what a third-party scorer, selector, method or model adapter imports.

``prunekit`` itself exports what a user calls (``build``, ``select``, the configs, the report, the errors); this
module exports what a plugin subclasses or decorates. The built-in plugins (package ``prunekit_plugins``) import
only from here, from ``prunekit`` and from ``prunekit.contracts``, exactly as a third-party plugin would.
"""

from __future__ import annotations

from .hookspecs import hookimpl, hookspec
from .interfaces import (
    Choice,
    FusedTerm,
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
from .config import MethodConfig, StrictModel, registered_name
from .planning import StagePlan, check_layers, make_stages, scale_layers
from .budget import StagePlacement, resolve_counts
from .ops import cosine, minmax, same_buffer, shared_constant, take_rows, topk, true_indices
from .kernels import GraphCache, Kernel
from .runtime.state import PerThread
from .runtime.sequence import pad_left
from .adapters import MethodHook, MultimodalAdapter, VisualHooks

__all__ = [
    "hookimpl", "hookspec", "registry",
    "Scorer", "ScorerRun", "FusedTerm", "SelectionInput", "Selector", "Choice", "Reduction",
    "Method", "Stage", "StageContext", "InsertionPoint",
    "ModelAdapter", "ModelSpec", "Patch", "MultimodalAdapter", "VisualHooks", "MethodHook",
    # a method's options and its stages
    "MethodConfig", "StrictModel", "registered_name", "StagePlan", "make_stages", "check_layers", "scale_layers",
    "StagePlacement", "resolve_counts",
    # tensor helpers shared by the built-in selections
    "cosine", "minmax", "take_rows", "topk", "true_indices", "same_buffer", "shared_constant", "pad_left",
    "PerThread",
    # one fused step of a selection: a Triton kernel on CUDA, tensor operations elsewhere
    "Kernel", "GraphCache",
]
