"""The layout is the architecture: the library imports only its four dependencies, tooling stays apart, there are
no import cycles, and the built-in plugins use nothing a third-party plugin could not."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]
PACKAGE = ROOT / "prunekit"
PLUGINS = ROOT / "plugins" / "prunekit_plugins"
#: the library's dependencies (pyproject.toml); packaging compares transformers releases, annotated_types carries
#: pydantic's field constraints (both come with transformers / pydantic)
CORE_DEPENDENCIES = {"torch", "transformers", "pydantic", "pluggy", "packaging", "annotated_types"}
#: optional: imported only inside the Triton implementations of selection's kernels, on CUDA (prunekit/kernels.py)
OPTIONAL = {"triton"}
KERNEL_MODULES = ("_greedy_triton.py", "_coverage_triton.py", "_triton_ops.py")
#: apart from the library: imported only by the tools that need them
APART = ("prunekit/tools", "prunekit/integrations")
#: what a plugin (built-in or not) imports from prunekit
PUBLIC = {"prunekit", "prunekit.plugin", "prunekit.contracts", "prunekit.testing"}


def _module(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT if path.is_relative_to(PACKAGE) else PLUGINS.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: pathlib.Path) -> list[str]:
    """Every module this file imports (at any depth of the file), absolute, with ``from X import name`` giving
    ``X.name`` where that is a module of the package and ``X`` otherwise."""
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in _walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                out.append(f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base)
    return out


def _walk(tree: ast.AST):
    """ast.walk, less the ``if TYPE_CHECKING:`` blocks (never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _is_module(name: str) -> bool:
    root, _, rest = name.partition(".")
    base = {"prunekit": PACKAGE, "prunekit_plugins": PLUGINS}.get(root)
    if base is None:
        return False
    path = base.joinpath(*rest.split(".")) if rest else base
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _files(base: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in base.rglob("*.py") if "__pycache__" not in p.parts)


CORE = [p for p in _files(PACKAGE) if not str(p.relative_to(ROOT)).startswith(APART)]


@pytest.mark.parametrize("path", CORE + _files(PLUGINS), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_imports_only_its_dependencies(path):
    allowed = CORE_DEPENDENCIES | {"prunekit", "prunekit_plugins"} | set(sys.stdlib_module_names)
    if path.name in KERNEL_MODULES or path.name == "kernels.py":
        allowed |= OPTIONAL
    for name in _imports(path):
        assert name.split(".")[0] in allowed, f"{path.relative_to(ROOT)} imports {name}"
        assert not name.startswith(("prunekit.tools", "prunekit.integrations")), \
            f"{path.relative_to(ROOT)} (library) imports {name} (tooling)"


@pytest.mark.parametrize("path", _files(PLUGINS), ids=lambda p: str(p.relative_to(ROOT)))
def test_built_in_plugins_use_only_the_public_api(path):
    for name in _imports(path):
        if name.split(".")[0] == "prunekit":
            assert name in PUBLIC, f"{path.relative_to(ROOT)} imports {name}: plugins use {sorted(PUBLIC)}"


def test_no_import_cycles():
    graph = {}
    for path in _files(PACKAGE) + _files(PLUGINS):
        graph[_module(path)] = {n for n in _imports(path) if n.split(".")[0] in ("prunekit", "prunekit_plugins")
                                and n != _module(path)}
    # importing a submodule runs its package's __init__ first, so the package is not an edge of its own modules
    graph = {m: {n for n in deps if n in graph and not m.startswith(n + ".")} for m, deps in graph.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_importing_prunekit_needs_no_tooling_dependency():
    """With matplotlib and pillow unimportable, the library still imports, lists its plugins and prunes."""
    code = (
        "import sys\n"
        "for name in ('matplotlib', 'PIL'):\n"
        "    sys.modules[name] = None\n"
        "import prunekit\n"
        "from prunekit.testing import tiny_llava, tiny_llava_inputs\n"
        "model = tiny_llava()\n"
        "prunekit.build('tops', model, keep_tokens=4)\n"
        "model(**tiny_llava_inputs(model))\n"
        "assert prunekit.pruning_report(model).stages[0].counts == [6, 6], prunekit.pruning_report(model)\n"
        "assert not any(m.startswith('prunekit.tools') for m in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_user_namespace_exports_every_error():
    import prunekit
    from prunekit import errors

    for name in errors.__all__ + ["ContractError", "UnsupportedTransformersError"]:
        assert name in prunekit.__all__ and issubclass(getattr(prunekit, name), prunekit.PrunekitError)
