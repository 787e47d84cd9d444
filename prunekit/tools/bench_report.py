"""What ``prunekit bench`` writes: the performance targets as measured ratios, the tables and the plots."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .bench import ModelRow, SelectionRow


def _short(model: str) -> str:
    return model.split(",")[0].split(" (")[0]


def check_targets(selection: Sequence[SelectionRow], models: Sequence[ModelRow]) -> list[dict]:
    """The performance targets (docs/performance.md) as measured ratios: ``ok`` is None where the run did not measure it."""
    out = []
    for row in selection:
        limit = 0.02 if row.n <= 2880 else 0.05
        value = row.fraction_of_prefill
        out.append({"target": f"TOPS selection <= {limit:.0%} of unpruned prefill, N={row.n}",
                    "value": value, "ok": None if value is None else value <= limit})
    by = {(r.model, r.method, r.keep_tokens): r for r in models if r.error is None}
    for (model, method, t), row in by.items():
        if method == "tops" and (model, "visionzip", t) in by:
            vz = by[(model, "visionzip", t)]
            # each against its own interleaved unpruned baseline, so that drift between the two runs cancels
            ratio = vz.speedup / row.speedup
            out.append({"target": f"{_short(model)}: TOPS prefill <= VisionZip + 5%, T={t}", "value": ratio,
                        "ok": ratio <= 1.05})
    for row in models:
        if row.error is None and row.efficiency is not None and row.method != "oracle":
            out.append({"target": f"{_short(row.model)}: {row.method} T={row.keep_tokens}: speed-up >= 90% of "
                                  "FLOP ideal", "value": row.efficiency, "ok": row.efficiency >= 0.9})
    base = {r.model: r for r in models if r.method == "unpruned"}
    for row in models:
        if row.error is None and row.method != "unpruned" and row.peak_mib is not None:
            ref = base[row.model].peak_mib
            if ref is not None and ref > 0:
                out.append({"target": f"{_short(row.model)}: {row.method} T={row.keep_tokens}: peak memory <= "
                                      "unpruned",
                            "value": row.peak_mib / ref, "ok": row.peak_mib <= ref})
    return out


def _fmt(x, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def tables(selection: Sequence[SelectionRow], models: Sequence[ModelRow], targets: Sequence[dict]) -> str:
    lines = []
    if selection:
        lines += ["| N | K | incremental (ms) | naive (ms) | speed-up | same selection | unpruned prefill, 32 layers "
                  "(ms) | selection / prefill |", "|---|---|---|---|---|---|---|---|"]
        for r in selection:
            naive = _fmt(r.naive_ms, ".0f") + (" (extrapolated)" if r.naive_extrapolated else "")
            same = "—" if r.identical is None else ("yes" if r.identical else "NO")
            lines.append(f"| {r.n} | {r.k} | {r.fast_ms:.1f} | {naive} | {r.speedup:.1f}x | {same} | "
                         f"{_fmt(r.prefill_ms_32_layers, '.0f')} | {_pct(r.fraction_of_prefill)} |")
        lines.append("")
    if models:
        meaning = next((r.budget_meaning for r in models if r.method not in ("unpruned", "oracle")), "nominal")
        lines += [f"| model | method | T ({meaning}) | tokens (layer avg) | prefill ms (scaled) | decode ms/token (scaled) | "
                  "peak MiB | TFLOPs (scaled) | speed-up | FLOP ideal | speed-up / ideal |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in models:
            if r.error is not None:
                lines.append(f"| {r.model} | {r.method} | {r.keep_tokens} | not run: {r.error} |||||||")
                continue
            lines.append(
                f"| {r.model} | {r.method} | {_fmt(r.keep_tokens, 'd')} | {_fmt(r.tokens_layer_average)} | "
                f"{_fmt(r.prefill_ms, '.0f')} ({r.prefill_ms_scaled:.0f}) | {_fmt(r.decode_ms)} ({_fmt(r.decode_ms_scaled)}) | "
                f"{_fmt(r.peak_mib)} | {r.flops / 1e12:.3f} ({r.flops_scaled / 1e12:.2f}) | "
                f"{_fmt(r.speedup, '.2f')} | {_fmt(r.ideal_speedup, '.2f')} | {_fmt(r.efficiency, '.2f')} |")
        lines.append("")
    if targets:
        lines += ["| target | measured | met |", "|---|---|---|"]
        for t in targets:
            met = "—" if t["ok"] is None else ("yes" if t["ok"] else "**no**")
            lines.append(f"| {t['target']} | {_fmt(t['value'], '.3f')} | {met} |")
    return "\n".join(lines)


def plots(selection: Sequence[SelectionRow], models: Sequence[ModelRow], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if selection:
        fig, ax = plt.subplots(figsize=(5, 4))
        ns = [r.n for r in selection]
        ax.loglog(ns, [r.fast_ms for r in selection], "o-", label="TOPS, incremental (exact)")
        ax.loglog(ns, [r.naive_ms for r in selection], "s--", label="TOPS, naive loop")
        if all(r.prefill_ms_32_layers for r in selection):
            ax.loglog(ns, [r.prefill_ms_32_layers for r in selection], "k:", label="unpruned prefill, 7B width")
        ax.set_xlabel("visual tokens N (K = 256 / 1,280 / 4,096)")
        ax.set_ylabel("time (ms)")
        ax.set_title(f"Selection time ({selection[0].device})")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        written.append(out / "selection_time.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    for model in dict.fromkeys(r.model for r in models):
        rows = [r for r in models if r.model == model and r.error is None and r.method not in ("unpruned", "oracle")]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in dict.fromkeys(r.method for r in rows):
            pts = sorted((r.keep_tokens, r.speedup) for r in rows if r.method == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
        oracle = sorted((r.keep_tokens, r.speedup) for r in models if r.model == model and r.method == "oracle"
                        and r.error is None)
        if oracle:
            ax.plot([p[0] for p in oracle], [p[1] for p in oracle], "k--", label="unpatched model on T tokens")
        tops = sorted((r.keep_tokens, r.ideal_speedup) for r in rows if r.method == "tops")
        if tops:
            ax.plot([p[0] for p in tops], [p[1] for p in tops], "k:", label="FLOP ideal (TOPS)")
        ax.set_xlabel("retained visual tokens T (layer average)")
        ax.set_ylabel("prefill speed-up vs unpruned")
        ax.set_title(model, fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        slug = "".join(c if c.isalnum() else "_" for c in model.split(",")[0].lower()).strip("_")
        written.append(out / f"speedup_{slug}.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written
