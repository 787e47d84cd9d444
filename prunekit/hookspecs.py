"""The hooks a prunekit plugin may implement.

Each hook is handed a ``register`` callback. A plugin calls it once per class it contributes; the class
carries its own name in the class attribute ``name``. The host (``prunekit.registry``) owns storage,
duplicate checks and lazy loading, so a plugin never touches a global table.

A plugin is any module or object with functions decorated by :data:`prunekit.plugin.hookimpl`, exposed through
the ``prunekit`` entry-point group::

    [project.entry-points.prunekit]
    my_method = "my_package.my_method"

There is no hook for insertion points: the three places where tokens can be cut are what the runtime implements,
defined in :mod:`prunekit.insertion_points`.
"""

from __future__ import annotations

from typing import Callable

import pluggy

#: marks the hook specifications below (prunekit's own; a plugin does not need it)
hookspec = pluggy.HookspecMarker("prunekit")
#: decorates a plugin's ``prunekit_register_*`` functions
hookimpl = pluggy.HookimplMarker("prunekit")


@hookspec
def prunekit_register_scorers(register: Callable[[type], None]) -> None:
    """Register :class:`prunekit.plugin.Scorer` subclasses (per-token gains, possibly set-dependent)."""


@hookspec
def prunekit_register_selectors(register: Callable[[type], None]) -> None:
    """Register :class:`prunekit.plugin.Selector` subclasses (turn features and scores into kept indices)."""


@hookspec
def prunekit_register_methods(register: Callable[[type], None]) -> None:
    """Register :class:`prunekit.plugin.Method` subclasses (a pruning method usable with ``prunekit.build``)."""


@hookspec
def prunekit_register_adapters(register: Callable[[type], None]) -> None:
    """Register :class:`prunekit.plugin.ModelAdapter` subclasses (hook a model family's insertion points)."""
