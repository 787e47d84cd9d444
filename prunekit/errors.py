"""The errors prunekit raises when pruning cannot happen as asked (importable as ``prunekit.PruningError`` ...)."""

from __future__ import annotations


class PruningError(RuntimeError):
    """Raised when pruning cannot be applied to this input (the message says why)."""
