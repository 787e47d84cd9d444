"""Plugin registry: loads the ``prunekit`` entry points lazily, once, and keeps one table per kind.

Environment:
    PRUNEKIT_LOAD_PLUGINS: comma-separated allow-list of entry-point names to load (unset: load all;
        empty string: load none).
"""

from __future__ import annotations

import fnmatch
import os
import threading
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Iterable

import pluggy

from . import hookspecs
from .errors import RegistryError, UnknownNameError
from .insertion_points import INSERTION_POINTS

ENTRY_POINT_GROUP = "prunekit"
#: the kinds plugins register (one hook each, ``prunekit_register_<kind>``)
KINDS = ("scorers", "selectors", "methods", "adapters")
#: kinds the library defines itself and plugins cannot extend, looked up like the others (the insertion points are
#: what the runtime implements: see :mod:`prunekit.insertion_points`)
BUILT_IN_KINDS = {"insertion_points": INSERTION_POINTS}
#: the plugin name their entries carry
LIBRARY = "prunekit"


@dataclass(frozen=True)
class Entry:
    name: str
    cls: type
    plugin: str  # the plugin (entry point or registered object) that contributed it


def _discover_entry_points() -> Iterable[EntryPoint]:
    return entry_points(group=ENTRY_POINT_GROUP)


class Registry:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._pm: pluggy.PluginManager | None = None
        self._tables: dict[str, dict[str, Entry]] | None = None
        self._extra: list[tuple[Any, str]] = []

    # -- loading --------------------------------------------------------------------------------
    def _plugin_manager(self) -> pluggy.PluginManager:
        if self._pm is None:
            pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
            pm.add_hookspecs(hookspecs)
            allow = os.environ.get("PRUNEKIT_LOAD_PLUGINS")
            allowed = None if allow is None else {n.strip() for n in allow.split(",") if n.strip()}
            for ep in _discover_entry_points():
                if allowed is not None and ep.name not in allowed:
                    continue
                if pm.has_plugin(ep.name):
                    continue  # the same distribution seen twice on sys.path
                try:
                    module = ep.load()
                except Exception as exc:  # name the plugin; the traceback follows as the cause
                    raise RegistryError(f"prunekit plugin {ep.name!r} ({ep.value}) failed to import: {exc}") from exc
                pm.register(module, name=ep.name)
            for obj, name in self._extra:
                pm.register(obj, name=name)
            for name, plugin in pm.list_name_plugin():
                if hasattr(plugin, "prunekit_register_insertion_points"):
                    raise RegistryError(
                        f"prunekit plugin {name!r} registers insertion points, which are not a plugin kind: the "
                        f"runtime implements {', '.join(INSERTION_POINTS)} and nothing else (see prunekit.insertion_points)"
                    )
            pm.check_pending()  # an implementation that matches no hook spec is a typo: fail loudly
            self._pm = pm
        return self._pm

    def _load(self) -> dict[str, dict[str, Entry]]:
        with self._lock:
            if self._tables is None:
                pm = self._plugin_manager()
                tables: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
                for kind, classes in BUILT_IN_KINDS.items():
                    tables[kind] = {name: Entry(name, cls, LIBRARY) for name, cls in classes.items()}
                for kind in KINDS:
                    caller = getattr(pm.hook, f"prunekit_register_{kind}")
                    for impl in caller.get_hookimpls():
                        impl.function(register=self._register_callback(tables[kind], kind, impl.plugin_name))
                self._tables = tables
            return self._tables

    @staticmethod
    def _register_callback(table: dict[str, Entry], kind: str, plugin: str):
        def register(cls: type) -> None:
            name = getattr(cls, "name", None)
            if not isinstance(name, str) or not name:
                raise RegistryError(f"{cls!r} from plugin {plugin!r} has no `name` class attribute ({kind})")
            if name in table:
                other = table[name]
                raise RegistryError(
                    f"duplicate {kind[:-1].replace('_', ' ')} name {name!r}: registered by plugin "
                    f"{other.plugin!r} ({other.cls.__module__}.{other.cls.__qualname__}) and by plugin "
                    f"{plugin!r} ({cls.__module__}.{cls.__qualname__})"
                )
            table[name] = Entry(name, cls, plugin)

        return register

    # -- public -------------------------------------------------------------------------------------
    def register(self, plugin: Any, name: str) -> None:
        """Register an in-process plugin object (a module or any object with hook implementations)."""
        with self._lock:
            self._extra.append((plugin, name))
            self.reset(keep_extra=True)

    def unregister(self, name: str) -> None:
        with self._lock:
            self._extra = [(p, n) for p, n in self._extra if n != name]
            self.reset(keep_extra=True)

    def reset(self, keep_extra: bool = False) -> None:
        """Forget everything loaded; the next lookup loads the entry points again."""
        with self._lock:
            self._pm = None
            self._tables = None
            if not keep_extra:
                self._extra = []

    def plugins(self) -> list[str]:
        self._load()
        return [name for name, _ in self._plugin_manager().list_name_plugin()]

    def names(self, kind: str, pattern: str | None = None) -> list[str]:
        names = sorted(self._load()[kind])
        return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]

    def entry(self, kind: str, name: str) -> Entry:
        table = self._load()[kind]
        if name not in table:
            raise UnknownNameError(
                f"unknown {kind[:-1].replace('_', ' ')} {name!r}; registered: {', '.join(sorted(table)) or '(none)'}"
            )
        return table[name]

    def get(self, kind: str, name: str) -> type:
        return self.entry(kind, name).cls

    def classes(self, kind: str) -> list[type]:
        return [e.cls for _, e in sorted(self._load()[kind].items())]


#: the process-wide plugin registry: ``registry.names(kind)``, ``registry.get(kind, name)``, ``registry.entry(kind,
#: name)`` (kind: "scorers", "selectors", "insertion_points", "methods" or "adapters"); loads the entry points once
registry = Registry()
