"""Every registered method on every registered adapter: it prunes, or says why not; the docs table is current."""

import pathlib
import re

from prunekit.tools import matrix as compat

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "adapters" / "overview.md"


def test_matrix_runs_and_the_docs_table_is_current():
    cells = compat.matrix()  # any error other than a reasoned ValueError/PruningError fails here
    assert all(c.reason for c in cells if not c.ok)
    table = compat.markdown(cells)
    documented = re.search(r"<!-- matrix:start -->\n(.*?)<!-- matrix:end -->", DOC.read_text(), re.S).group(1)
    assert documented == table, "docs/adapters/overview.md is out of date: paste the output of `prunekit matrix`"
    # methods that need only the LLM's input run everywhere; in-LLM ones wherever in-LLM pruning is possible
    from prunekit.registry import registry

    for c in cells:
        in_llm_ok = not registry.get("adapters", c.adapter).no_decoder_pruning
        if c.method in ("random", "divprune", "cdpruner") or (c.method in ("tops", "fastv") and in_llm_ok):
            assert c.ok, (c.adapter, c.method, c.reason)
        if c.method in ("tops", "fastv") and not in_llm_ok:
            assert "sliding-window" in c.reason
