import pathlib
import shutil
import subprocess
import sys

import pytest

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


def test_mkdocs_builds_strict(tmp_path):
    mkdocs = shutil.which("mkdocs") or str(pathlib.Path(sys.executable).parent / "mkdocs")
    result = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


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
