"""Which method runs on which adapter: every registered method on every registered adapter's tiny model.

A pair either prunes in a forward and in ``generate``, or raises an error that says why (a missing insertion
point or signal, a budget the model's depth cannot reach). Any other exception is a bug and propagates.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..budget import BudgetError
from ..errors import PruningError

#: errors that mean "this pair cannot work", with a reason
EXPECTED = (ValueError, PruningError, BudgetError)


@dataclass
class Cell:
    adapter: str
    method: str
    ok: bool
    reason: str = ""


def matrix(adapters=None, methods=None, keep_ratio: float = 0.5, num_layers: int = 8, progress: bool = False):
    """Run every method on every adapter's tiny model (``num_layers`` decoder layers); a list of :class:`Cell`."""
    import torch
    from tqdm.auto import tqdm

    from .. import api
    from ..registry import registry
    from ..testing import collate

    adapters = adapters or registry.names("adapters")
    methods = methods or registry.names("methods")
    cells = []
    bar = tqdm(total=len(adapters) * len(methods), disable=not progress, desc="method × adapter")
    for name in adapters:
        cls = registry.get("adapters", name)
        model = cls.tiny(num_layers=num_layers)
        rows = cls.tiny_rows(model)
        inputs = collate(rows, pad_token_id=model.config.get_text_config().pad_token_id or 0)
        for method in methods:
            bar.set_postfix_str(f"{method} on {name}")
            try:
                with torch.no_grad():
                    api.build(method, model, keep_ratio=keep_ratio)
                    model(**inputs)
                    model.generate(**inputs, max_new_tokens=2, do_sample=False)
                report = api.pruning_report(model)
                if not report.stages:
                    raise AssertionError(f"{method} on {name} ran but pruned nothing")
                cells.append(Cell(name, method, True))
            except EXPECTED as e:
                cells.append(Cell(name, method, False, str(e).split("\n")[0]))
            finally:
                api.remove(model)
                bar.update()
    bar.close()
    return cells


def markdown(cells) -> str:
    """The matrix as a table (methods as rows, adapters as columns) and the reasons below it."""
    adapters = list(dict.fromkeys(c.adapter for c in cells))
    methods = list(dict.fromkeys(c.method for c in cells))
    reasons: list[str] = []
    by = {(c.adapter, c.method): c for c in cells}
    lines = ["| method | " + " | ".join(f"`{a}`" for a in adapters) + " |",
             "|---|" + "---|" * len(adapters)]
    for m in methods:
        row = []
        for a in adapters:
            c = by[(a, m)]
            if c.ok:
                row.append("✓")
            else:  # one note per kind of reason: the pair's own names become placeholders
                reason = c.reason.replace(f"'{c.adapter}'", "{adapter}").replace(f"'{c.method}'", "{method}")
                if reason not in reasons:
                    reasons.append(reason)
                row.append(f"✗ {reasons.index(reason) + 1}")
        lines.append(f"| `{m}` | " + " | ".join(row) + " |")
    lines.append("")
    lines += [f"{i}. {r}" for i, r in enumerate(reasons, 1)]
    return "\n".join(lines) + "\n"
