import importlib
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import yaml

import prunekit
from prunekit import hookspecs
from prunekit.plugin import registry

ROOT = pathlib.Path(__file__).resolve().parent.parent
REFERENCE = (ROOT / "docs" / "plugins.md").read_text()


@pytest.mark.parametrize("kind", ["scorers", "selectors", "insertion_points", "methods", "adapters"])
def test_every_registered_plugin_is_documented(kind):
    builtin = {n for n in registry.names(kind) if registry.entry(kind, n).cls.__module__.startswith("prunekit_plugins")}
    for name in builtin:
        assert f"`{name}`" in REFERENCE, f"{kind[:-1]} {name!r} is missing from docs/plugins.md"


def test_every_hook_is_documented():
    for name in dir(hookspecs):
        if name.startswith("prunekit_register_"):
            assert f"`{name}`" in REFERENCE


def test_every_method_has_a_page():
    for name in prunekit.list_methods():
        assert (ROOT / "docs" / "methods" / f"{name}.md").exists()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site built once with ``mkdocs build --strict`` (offline, CPU; about ten seconds)."""
    out = tmp_path_factory.mktemp("site")
    mkdocs = shutil.which("mkdocs") or str(pathlib.Path(sys.executable).parent / "mkdocs")
    result = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(out)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return out


def test_mkdocs_builds_strict(site):
    assert (site / "index.html").exists()


@pytest.mark.parametrize("module, pages", [
    ("prunekit", ["prunekit", "errors"]),
    ("prunekit.plugin", ["plugin"]),
])
def test_api_reference_lists_every_public_name(site, module, pages):
    """Every name a public module exports has an entry in the API reference generated from the docstrings."""
    exported = importlib.import_module(module).__all__
    html = "".join((site / "reference" / page / "index.html").read_text() for page in pages)
    missing = [name for name in exported if f'id="{module}.{name}"' not in html]
    assert not missing, f"docs/reference/ does not render {module}.{', '.join(missing)}"


def _nav_pages() -> set[str]:
    def walk(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)
        elif isinstance(node, dict):
            for value in node.values():
                yield from walk(value)

    return set(walk(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]))


@pytest.mark.parametrize("kind, folder", [("adapters", "adapters"), ("methods", "methods")])
def test_every_adapter_and_method_has_a_page_in_the_nav(kind, folder):
    """A registered adapter or method (built-in or from an installed plugin) without a page in the site fails here."""
    nav = _nav_pages()
    for name in registry.names(kind):
        page = f"{folder}/{name}.md"
        assert (ROOT / "docs" / page).exists() and page in nav, f"{kind[:-1]} {name!r}: add docs/{page} to the nav"


@pytest.mark.parametrize("name", prunekit.list_adapters())
def test_adapter_page_names_its_classes_points_and_units(name):
    cls = registry.get("adapters", name)
    page = (ROOT / "docs" / "adapters" / f"{name}.md").read_text()
    for item in (*cls.model_classes, *cls.insertion_points):
        assert f"`{item}`" in page, f"docs/adapters/{name}.md does not name `{item}`"
    units = page.split("## Budget units\n")[1].split("\n## ")[0]
    for unit in cls.budget_units:
        assert f'"{unit}"' in units, f"docs/adapters/{name}.md: its Budget units section does not name {unit!r}"
    assert "## What it cannot do" in page


@pytest.mark.parametrize("name", prunekit.list_methods())
def test_every_method_page_lists_its_config_fields(name):
    """A method page's config table names every field of its Config (the budget fields may be grouped)."""
    page = (ROOT / "docs" / "methods" / f"{name}.md").read_text()
    assert "arxiv" in page.lower() or name in ("random", "pool"), f"{name}: no paper link"
    for field in prunekit.get_method(name).Config.model_fields:
        assert f"`{field}`" in page, f"docs/methods/{name}.md does not document `{field}`"
    assert f"methods/{name}.md" in (ROOT / "mkdocs.yml").read_text()


def test_compatibility_page_lists_every_contract():
    from prunekit import contracts

    page = (ROOT / "docs" / "compatibility.md").read_text()
    table = page.split("<!-- contracts:start -->\n")[1].split("<!-- contracts:end -->")[0]
    assert table == contracts.describe(), "docs/compatibility.md is out of date: paste the table `prunekit contracts` prints"
    assert contracts.SUPPORTED in page and contracts.OLDEST in page


def test_writing_a_plugin_guide_runs():
    """The guide's Python blocks, run in order in one namespace: they use only the public API and still work."""
    page = (ROOT / "docs" / "writing-a-plugin.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", page, flags=re.S | re.M)
    assert len(blocks) >= 4
    for block in blocks:
        imported = {m for m in re.findall(r"^\s*(?:from|import) (prunekit[\w.]*)", block, flags=re.M)}
        assert imported <= {"prunekit", "prunekit.plugin", "prunekit.testing"}, imported
    namespace: dict = {"__name__": "writing_a_plugin"}
    try:
        for block in blocks:
            exec(compile(block, "docs/writing-a-plugin.md", "exec"), namespace)
    finally:
        registry.reset()
    assert "feature_norm" not in prunekit.list_scorers() and "norm_topk" not in prunekit.list_methods()
