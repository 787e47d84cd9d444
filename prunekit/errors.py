"""Every error prunekit raises on purpose, in one place, all importable from ``prunekit``.

Each is a :class:`PrunekitError` and also the built-in exception a caller would expect (a bad budget is a
``ValueError``, an unknown name a ``KeyError``), so ``except ValueError`` keeps working where it did.
"""

from __future__ import annotations


class PrunekitError(Exception):
    """Base of the errors prunekit raises on purpose; the message says what to change."""


class PruningError(PrunekitError, RuntimeError):
    """Pruning cannot be applied to this input (the message says why)."""


class BudgetError(PrunekitError, ValueError):
    """A budget that cannot be met at the given stages."""


class RegistryError(PrunekitError, RuntimeError):
    """A plugin could not be registered (duplicate or missing name, unknown hook, failed import)."""


class UnknownNameError(PrunekitError, KeyError):
    """A name that no plugin registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class UnsupportedModelError(PrunekitError, TypeError):
    """No registered adapter handles this model class."""


__all__ = ["PrunekitError", "PruningError", "BudgetError", "RegistryError", "UnknownNameError",
           "UnsupportedModelError"]
