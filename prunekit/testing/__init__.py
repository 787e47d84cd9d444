"""For tests, docs and plugin authors: tiny models built from configs (nothing is downloaded), their inputs, and
the conformance suite a third-party adapter or method runs in its own tests (:class:`PruningConformance`).

Imports only what the library does (torch, transformers, pydantic, pluggy): no test runner is needed to import it.
"""

from .conformance import CHECKS, PruningConformance, footprint_difference, own_state, patch_footprint, refusal
from .models import (
    assert_pruned,
    batch_of,
    collate,
    prompt_ids,
    prunable_points,
    registered,
    tiny_adapter_model,
    tiny_llava,
    tiny_llava_inputs,
)
from .ops import HOST_SYNC_OPS, OpCount, count_decode_step, count_ops

__all__ = [
    # tiny models and their inputs
    "tiny_llava", "tiny_llava_inputs", "tiny_adapter_model", "collate", "batch_of", "prompt_ids",
    "prunable_points",
    # registering a plugin for a block, asserting pruning happened
    "registered", "assert_pruned",
    # the conformance suite
    "PruningConformance", "CHECKS", "patch_footprint", "footprint_difference", "own_state", "refusal",
    # counting the kernel launches and host reads of a computation (what it costs on a GPU), on any machine
    "count_ops", "count_decode_step", "OpCount", "HOST_SYNC_OPS",
]
