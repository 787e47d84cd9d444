"""What ``prunekit bench`` writes: the performance targets as measured ratios, the tables and the plots."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from .bench import ModelRow, SelectionRow


def _short(model: str) -> str:
    return model.split(",")[0].split(" (")[0]


#: how the unpruned prefill next to a selection was measured (``SelectionRow.prefill``)
PREFILL_LABELS = {"decoder": "32-layer 7B decoder", "layer": "1 layer x 32"}

#: the selection-time targets (docs/performance.md): TOPS's selection as a fraction of the unpruned prefill
SELECTION_LIMITS = ((2880, 0.02), (10816, 0.05))


def _selection_limit(n: int) -> float | None:
    """The issue's limit at ``n`` visual tokens: 2 % up to 2,880, 5 % at 10,816 (the video scale) and between."""
    return next((limit for top, limit in SELECTION_LIMITS if n <= top), None)


def check_targets(selection: Sequence[SelectionRow], models: Sequence[ModelRow]) -> list[dict]:
    """The performance targets (docs/performance.md) as measured ratios, per batch size: ``ok`` is None where the
    run did not measure it. Nothing is assumed: a target the run did not measure is listed as not measured."""
    out = []
    for row in selection:
        limit = _selection_limit(row.n)
        value = row.fraction_of_prefill
        name = (f"TOPS selection <= {limit:.0%} of unpruned prefill, N={row.n}, K={row.k}, batch {row.batch}"
                if limit is not None else f"TOPS selection / unpruned prefill, N={row.n} (no target above 10,816)")
        out.append({"target": name, "batch": row.batch, "value": value,
                    "ok": None if value is None or limit is None else value <= limit})
    by = {(r.model, r.batch, r.method, r.keep_tokens): r for r in models}
    pairs = dict.fromkeys((m, b, t) for (m, b, method, t) in by if method == "tops" and (m, b, "visionzip", t) in by)
    for model, batch, t in pairs:
        row, vz = by[(model, batch, "tops", t)], by[(model, batch, "visionzip", t)]
        name = f"{_short(model)}: TOPS prefill <= VisionZip + 5%, T={t} ({row.budget_meaning}), batch {batch}"
        if row.error is not None or vz.error is not None:  # one of them did not run: not measured, and why
            out.append({"target": name, "batch": batch, "value": None, "ok": None,
                        "why": row.error if row.error is not None else vz.error})
            continue
        # each against its own interleaved unpruned baseline, so that drift between the two runs cancels
        ratio = vz.speedup / row.speedup
        out.append({"target": name, "batch": batch, "value": ratio, "ok": ratio <= 1.05,
                    "tokens_layer_average": {"tops": row.tokens_layer_average, "visionzip": vz.tokens_layer_average},
                    "tflops": {"tops": row.flops_scaled / 1e12, "visionzip": vz.flops_scaled / 1e12}})
    for row in models:
        if row.error is None and row.efficiency is not None and row.method != "oracle":
            out.append({"target": f"{_short(row.model)}: {row.method} T={row.keep_tokens}, batch {row.batch}: "
                                  "speed-up >= 90% of FLOP ideal", "batch": row.batch, "value": row.efficiency,
                        "ok": row.efficiency >= 0.9})
    base = {(r.model, r.batch): r for r in models if r.method == "unpruned"}
    for row in models:
        if row.error is None and row.method != "unpruned" and row.peak_mib is not None and (row.model, row.batch) in base:
            ref = base[(row.model, row.batch)].peak_mib
            if ref is not None and ref > 0:
                out.append({"target": f"{_short(row.model)}: {row.method} T={row.keep_tokens}, batch {row.batch}: "
                                      "peak memory <= unpruned", "batch": row.batch,
                            "value": row.peak_mib / ref, "ok": row.peak_mib <= ref})
    return out


def _fmt(x, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def tables(selection: Sequence[SelectionRow], models: Sequence[ModelRow], targets: Sequence[dict]) -> str:
    lines = []
    if selection:
        lines += ["| N | K | batch | incremental (ms) | naive (ms) | speed-up | same selection | unpruned prefill (ms) | "
                  "prefill measured as | selection / prefill |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in selection:
            naive = "not run" if r.naive_ms is None else (
                _fmt(r.naive_ms, ".0f") + (" (extrapolated)" if r.naive_extrapolated else ""))
            same = "—" if r.identical is None else ("yes" if r.identical else "NO")
            how = "—" if r.prefill is None else f"{PREFILL_LABELS[r.prefill]}, {r.prefill_tokens} tokens, {r.prefill_dtype}"
            speed = "—" if r.speedup is None else f"{r.speedup:.1f}x"
            lines.append(f"| {r.n} | {r.k} | {r.batch} | {r.fast_ms:.1f} | {naive} | {speed} | {same} | "
                         f"{_fmt(r.prefill_ms, '.1f')} | {how} | {_pct(r.fraction_of_prefill)} |")
        lines.append("")
    if models:
        meaning = next((r.budget_meaning for r in models if r.method not in ("unpruned", "oracle")), "nominal")
        lines += [f"| model | batch | method | budget T ({meaning}) | tokens (layer avg) | prefill ms (scaled) | "
                  "decode ms/token (scaled) | peak MiB | TFLOPs (scaled) | speed-up | FLOP ideal | speed-up / ideal |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in models:
            if r.error is not None:
                lines.append(f"| {r.model} | {r.batch} | {r.method} | {r.keep_tokens} | not run: {r.error} |||||||")
                continue
            lines.append(
                f"| {r.model} | {r.batch} | {r.method} | {_fmt(r.keep_tokens, 'd')} | {_fmt(r.tokens_layer_average)} | "
                f"{_fmt(r.prefill_ms, '.1f')} ({r.prefill_ms_scaled:.1f}) | {_fmt(r.decode_ms)} ({_fmt(r.decode_ms_scaled)}) | "
                f"{_fmt(r.peak_mib)} | {r.flops / 1e12:.3f} ({r.flops_scaled / 1e12:.2f}) | "
                f"{_fmt(r.speedup, '.2f')} | {_fmt(r.ideal_speedup, '.2f')} | {_fmt(r.efficiency, '.2f')} |")
        lines.append("")
    if targets:
        lines += ["| target | measured | met |", "|---|---|---|"]
        for t in targets:
            met = "not measured" if t["value"] is None else ("—" if t["ok"] is None else ("yes" if t["ok"] else "**no**"))
            lines.append(f"| {t['target']} | {_fmt(t['value'], '.3f')} | {met} |")
    return "\n".join(lines)


def plots(selection: Sequence[SelectionRow], models: Sequence[ModelRow], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if selection:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for i, batch in enumerate(dict.fromkeys(r.batch for r in selection)):
            rows = sorted((r for r in selection if r.batch == batch), key=lambda r: r.n)
            color = f"C{i}"
            tag = f"batch {batch}"
            ns = [r.n for r in rows]
            ax.loglog(ns, [r.fast_ms for r in rows], "o-", color=color, label=f"TOPS, incremental, {tag}")
            naive = [(r.n, r.naive_ms) for r in rows if r.naive_ms is not None]
            if naive:
                ax.loglog(*zip(*naive), "s--", color=color, alpha=0.6, label=f"TOPS, naive loop, {tag}")
            prefill = [(r.n, r.prefill_ms) for r in rows if r.prefill_ms]
            if prefill:
                ax.loglog(*zip(*prefill), ":", color=color, marker="x", label=f"unpruned 7B prefill, {tag}")
        ks = " / ".join(f"{k:,}" for k in dict.fromkeys(r.k for r in sorted(selection, key=lambda r: r.n)))
        ax.set_xlabel(f"visual tokens N (K = {ks})")
        ax.set_ylabel("time (ms)")
        ax.set_title(f"Selection time ({selection[0].device})")
        ax.legend(fontsize=6)
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
        batches = list(dict.fromkeys(r.batch for r in models if r.model == model))
        styles = ["-", "--", "-.", ":"]
        for j, batch in enumerate(batches):
            style = styles[j % len(styles)]
            tag = f", batch {batch}" if len(batches) > 1 else ""
            mine = [r for r in rows if r.batch == batch]
            for i, method in enumerate(dict.fromkeys(r.method for r in rows)):
                # x: the measured layer-averaged tokens (the budget T where the report gave none)
                pts = sorted((r.tokens_layer_average or r.keep_tokens, r.speedup) for r in mine if r.method == method)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o" + style, color=f"C{i + 1}",
                            label=f"{method}{tag}")
            oracle = sorted((r.keep_tokens, r.speedup) for r in models if r.model == model and r.method == "oracle"
                            and r.error is None and r.batch == batch)
            if oracle:
                ax.plot([p[0] for p in oracle], [p[1] for p in oracle], "k" + style, alpha=0.7,
                        label=f"unpatched model on T tokens{tag}")
        ideal = sorted((r.tokens_layer_average or r.keep_tokens, r.ideal_speedup) for r in rows
                       if r.method == "tops" and r.batch == batches[0] and r.ideal_speedup)
        if ideal:
            ax.plot([p[0] for p in ideal], [p[1] for p in ideal], "k:", label="FLOP ideal (TOPS)")
        ax.set_xlabel("retained visual tokens (layer average)")
        ax.set_ylabel("prefill speed-up vs unpruned")
        ax.set_title(model, fontsize=8)
        ax.legend(fontsize=6)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        slug = "".join(c if c.isalnum() else "_" for c in model.split(",")[0].lower()).strip("_")
        written.append(out / f"speedup_{slug}.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written
