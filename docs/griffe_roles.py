"""A griffe extension for the API reference: prunekit's docstrings are prose written for both ``help()`` and the
docs, with Sphinx-style cross-reference roles (``:class:`~prunekit.plugin.Method```) and doctest examples. Markdown
knows neither, so each role becomes an inline code span (its last component with ``~``, as Sphinx shows it) and each
run of ``>>>`` lines becomes a fenced Python block.

Attributes are documented the Sphinx way too: a ``#:`` comment above them, a ``# comment`` after them, or (pydantic
config fields) ``Field(description=...)``. griffe reads none of these, so an attribute without a docstring gets the
first one found. Nothing is imported or fetched: the sources are read as text."""

from __future__ import annotations

import ast
import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|obj|exc|const):`(~?)([^`]+)`")


def _role(match: re.Match) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def markdown(text: str) -> str:
    """``text`` with roles as code spans and doctest runs fenced."""
    out: list[str] = []
    in_doctest = False
    for line in ROLE.sub(_role, text).splitlines():
        doctest = line.lstrip().startswith((">>>", "..."))
        if doctest and not in_doctest:
            out.append("```python")
        elif not doctest and in_doctest:
            out.append("```")
        in_doctest = doctest
        out.append(line.strip() if doctest else line)
    if in_doctest:
        out.append("```")
    return "\n".join(out)


def _field_description(node) -> str | None:
    value = getattr(node, "value", None)
    if isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", "")) == "Field":
        for keyword in value.keywords:
            if keyword.arg == "description" and isinstance(keyword.value, ast.Constant):
                return keyword.value.value
    return None


def _comment(obj) -> str | None:
    """The ``#:`` lines right above ``obj`` or the ``#`` comment ending its first line."""
    try:
        lines = obj.lines_collection[obj.filepath]
    except Exception:  # noqa: BLE001 - no source text: nothing to read
        return None
    first = obj.lineno - 1
    above = []
    while first - 1 >= 0 and lines[first - 1].strip().startswith("#:"):
        first -= 1
        above.insert(0, lines[first].strip()[2:].strip())
    if above:
        return " ".join(above)
    code, sep, comment = lines[obj.lineno - 1].partition("  # ")
    return comment.strip() if sep and not comment.lstrip().startswith(("noqa", "type:", "pragma")) else None


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj, node=None, **kwargs) -> None:
        if obj.docstring is None and getattr(obj, "kind", None) is griffe.Kind.ATTRIBUTE:
            text = _field_description(node) or _comment(obj)
            if text:
                obj.docstring = griffe.Docstring(text, parent=obj)
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
