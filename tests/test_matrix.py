"""Every registered method on every registered adapter: it prunes, or says why not; the docs table is current."""

import pathlib
import re

from prunekit import compat

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "adapters" / "overview.md"


def test_matrix_runs_and_the_docs_table_is_current():
    cells = compat.matrix()  # any error other than a reasoned ValueError/PruningError fails here
    assert all(c.reason for c in cells if not c.ok)
    table = compat.markdown(cells)
    documented = re.search(r"<!-- matrix:start -->\n(.*?)<!-- matrix:end -->", DOC.read_text(), re.S).group(1)
    assert documented == table, "docs/adapters/overview.md is out of date: paste the output of `prunekit matrix`"
    # the methods that need only the LLM's input or layers run everywhere
    for c in cells:
        if c.method in ("tops", "random", "fastv", "divprune", "cdpruner"):
            assert c.ok, (c.adapter, c.method, c.reason)
