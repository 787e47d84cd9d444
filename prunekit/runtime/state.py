"""Per-call state that stays with the thread that runs the call.

A patched model can be called from several threads at once: the hooks are shared, so whatever one call
records for its later hooks (the visual tokens found, the encoder's outputs, the pruned prefill being run) is kept
per thread. Copies (``copy.deepcopy``, pickling) start with no per-call state.
"""

from __future__ import annotations

import threading
from typing import Any, Callable


class PerThread:
    """A class attribute whose value is per instance *and* per thread (``default()`` until set in a thread)."""

    def __init__(self, default: Callable[[], Any] = lambda: None) -> None:
        self.default = default
        self.name = ""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    @staticmethod
    def _local(obj) -> threading.local:
        local = obj.__dict__.get("_per_thread")
        if local is None:
            local = obj.__dict__.setdefault("_per_thread", threading.local())
        return local

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        local = self._local(obj)
        try:
            return getattr(local, self.name)
        except AttributeError:
            value = self.default()
            setattr(local, self.name, value)
            return value

    def __set__(self, obj, value) -> None:
        setattr(self._local(obj), self.name, value)


class ThreadStateMixin:
    """Drops the per-thread state when the object is copied or pickled (a copy starts between calls)."""

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_per_thread", None)
        return state

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
