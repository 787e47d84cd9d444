"""``prunekit eval``: accuracy of every method × budget on a VQA set, against the same model unpruned.

Each sample is answered by greedy ``generate`` (the answer's token count, taken from the longest reference answer),
so pruning runs exactly where it runs for users: inside ``generate``, with the KV cache and left-padded batches.
For every method, budget (a fraction of each sample's visual tokens), budget meaning (``nominal``: the method's own
accounting, so a paper's table can be reproduced; ``layer_average``: equal layer-averaged tokens, equal compute) and
position mode it reports:

* accuracy with its 95% Wilson interval, and per question type;
* relative accuracy (% of the unpruned model's accuracy);
* agreement: the share of samples whose answer equals the unpruned model's answer;
* KL(unpruned ‖ pruned) of the first answer token's distribution over the whole vocabulary (mean over samples);
* the nominal budget, the layer-averaged visual-token count actually used and the language model's prefill FLOPs
  (from ``prunekit.pruning_report``), side by side.

A method whose stages keep the same counts under both meanings (every method that prunes once before the LLM) is run
once and its result shown under both.

A method that cannot reach a budget on the model (for instance a method that starts pruning inside the language model
when the budget is below what the layers before it already see) is reported as not run, with the reason.

(~410 lines: the run and its output formats stay together; the output section is short.)
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..api import build, is_patched, pruning_report, list_methods, remove
from .data.shapes import VQASample

#: 33 / 22 / 11 / 5.6 % of the visual tokens: LLaVA-1.5's 192 / 128 / 64 / 32 of 576
DEFAULT_BUDGETS = (0.333, 0.222, 0.111, 0.056)
POSITION_MODES = ("renumber", "original")
BUDGET_MEANINGS = ("nominal", "layer_average")
PRINCIPLES = ("relevance", "coverage", "diversity")


@dataclass(frozen=True)
class Variant:
    """One pruning setting to evaluate: a registered method plus config overrides, under a display label."""

    label: str
    method: str
    overrides: dict = field(default_factory=dict)


def method_variants(methods: Sequence[str]) -> list[Variant]:
    known = list_methods()
    bad = [m for m in methods if m not in known]
    if bad:
        raise ValueError(f"methods must be registered methods ({', '.join(known)}); unknown: {', '.join(bad)}")
    return [Variant(m, m) for m in methods]


def tops_ablations() -> list[Variant]:
    """TOPS with each of the seven non-empty subsets of its principles (the paper's Table 5)."""
    out = []
    for r in range(1, 4):
        for subset in itertools.combinations(PRINCIPLES, r):
            label = "tops[" + "+".join(p[0].upper() for p in subset) + "]"
            out.append(Variant(label, "tops", {"principles": list(subset)}))
    return out


def tops_relevance_variants() -> list[Variant]:
    """TOPS with each stage-I relevance signal: [CLS] attention (the paper) and the two substitutes for
    encoders without [CLS] (text similarity, attention received)."""
    return [
        Variant("tops[cls_attention]", "tops", {"projector_relevance": "cls_attention"}),
        Variant("tops[text_similarity]", "tops", {"projector_relevance": "text_similarity"}),
        Variant("tops[attention_received]", "tops", {"projector_relevance": "attention_received"}),
    ]


@dataclass
class Result:
    label: str
    method: str
    budget: float | None  # None: unpruned
    positions: str | None
    status: str = "ok"  # "ok" or "not run: <reason>"
    n: int = 0
    accuracy: float = math.nan
    ci_low: float = math.nan
    ci_high: float = math.nan
    relative: float = math.nan  # % of the unpruned accuracy
    delta: float = math.nan  # accuracy minus the unpruned accuracy, on the same samples
    delta_low: float = math.nan  # its paired 95% interval
    delta_high: float = math.nan
    agreement: float = math.nan
    kl: float = math.nan
    budget_meaning: str = "nominal"
    tokens: float = math.nan  # layer-averaged visual tokens actually used (mean over samples)
    visual_tokens: float = math.nan  # before pruning (mean over samples)
    gflops: float = math.nan  # the language model's prefill GFLOPs (analytic, mean over samples)
    flops_relative: float = math.nan  # % of the same prefills unpruned
    per_type: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    overrides: dict = field(default_factory=dict)
    hits: list[int] = field(default_factory=list, repr=False)  # per sample: 1 where the answer was right


def wilson(hits: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return math.nan, math.nan
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(hits: Sequence[int], base_hits: Sequence[int], z: float = 1.959964) -> tuple[float, float, float]:
    """Mean of per-sample differences and its 95% interval (normal approximation): on the same questions this is much
    tighter than comparing two independent intervals, because most answers do not change."""
    n = len(hits)
    d = [a - b for a, b in zip(hits, base_hits)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(var / n)
    return mean, mean - half, mean + half


def normalize_answer(text: str) -> str:
    return re.sub(r"[^\w\s]", "", text).strip().lower()


@dataclass
class Prepared:
    batches: list[dict]
    answers: list[str]
    types: list[str]
    new_tokens: int


def prepare(samples: Sequence[VQASample], processor, prompt, batch_size: int) -> Prepared:
    """Processor outputs for every sample, in left-padded batches (computed once, reused by every run)."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        batches.append(dict(processor(images=[s.image for s in chunk], text=[prompt(s.question) for s in chunk],
                                      padding=True, return_tensors="pt")))
    longest = max((len(tokenizer(s.answer, add_special_tokens=False).input_ids) for s in samples), default=1)
    return Prepared(batches, [s.answer for s in samples], [s.type for s in samples], max(1, longest))


@torch.no_grad()
def answer(model, prepared: Prepared, tokenizer, *, progress=None) -> tuple[list[str], torch.Tensor, list[float], list[float]]:
    """Greedy answers, first-token log-probabilities, layer-averaged and original visual-token counts per sample,
    and per sample the prefill FLOPs with and without pruning (pruned runs only)."""
    texts, logps, used, before, flops = [], [], [], [], []
    for batch in prepared.batches:
        batch = {k: v.to(model.device) for k, v in batch.items()}
        out = model.generate(**batch, max_new_tokens=prepared.new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
        new = out.sequences[:, batch["input_ids"].shape[1]:]
        texts += tokenizer.batch_decode(new, skip_special_tokens=True)
        logps.append(torch.log_softmax(out.logits[0].float(), -1).cpu())
        report = pruning_report(model) if is_patched(model) else None
        rows = len(new)
        if report is not None:
            used += report.layer_average
            before += [float(n) for n in report.visual_tokens]
            flops += list(zip(report.prefill_flops, report.prefill_flops_unpruned))
        else:
            image = model.config.image_token_id
            counts = (batch["input_ids"] == image).sum(1).float().tolist()
            used += counts
            before += counts
        if progress is not None:
            progress.update(rows)
    return texts, torch.cat(logps), used, before, flops


def _summarise(res: Result, texts, logp, used, before, prepared: Prepared, base: Result | None,
               base_texts=None, base_logp=None, flops=()) -> Result:
    hits = [int(normalize_answer(t) == normalize_answer(a)) for t, a in zip(texts, prepared.answers)]
    res.n = len(hits)
    res.accuracy = sum(hits) / len(hits)
    res.ci_low, res.ci_high = wilson(sum(hits), len(hits))
    by_type: dict[str, list[int]] = {}
    for t, h in zip(prepared.types, hits):
        by_type.setdefault(t, []).append(h)
    res.per_type = {t: sum(v) / len(v) for t, v in by_type.items()}
    res.hits = hits
    res.tokens = sum(used) / len(used)
    res.visual_tokens = sum(before) / len(before)
    if flops and all(f is not None and u for f, u in flops):
        res.gflops = sum(f for f, _ in flops) / len(flops) / 1e9
        res.flops_relative = 100.0 * sum(f for f, _ in flops) / sum(u for _, u in flops)
    if base is None:
        res.relative, res.agreement, res.kl = 100.0, 1.0, 0.0
        res.delta = res.delta_low = res.delta_high = 0.0
    else:
        res.relative = 100.0 * res.accuracy / base.accuracy if base.accuracy > 0 else math.nan
        res.delta, res.delta_low, res.delta_high = paired_difference(hits, base.hits)
        res.agreement = sum(normalize_answer(a) == normalize_answer(b) for a, b in zip(texts, base_texts)) / len(texts)
        p = base_logp.exp()
        res.kl = float((p * (base_logp - logp)).sum(-1).clamp(min=0).mean())
    return res


def evaluate(model, processor, samples: Sequence[VQASample], variants: Sequence[Variant], *,
             budgets: Sequence[float] = DEFAULT_BUDGETS, positions: Sequence[str] = POSITION_MODES, prompt=None,
             budget_meanings: Sequence[str] = ("nominal",), batch_size: int = 50,
             progress: bool = True) -> list[Result]:
    """The unpruned model first, then every variant × budget × budget meaning × position mode, on ``samples``."""
    from tqdm.auto import tqdm

    bad = [p for p in positions if p not in POSITION_MODES]
    if bad:
        raise ValueError(f"positions must be among {', '.join(POSITION_MODES)}; got {', '.join(bad)}")
    bad = [m for m in budget_meanings if m not in BUDGET_MEANINGS]
    if bad or not budget_meanings:
        raise ValueError(f"budget_meanings must be among {', '.join(BUDGET_MEANINGS)}; got {list(budget_meanings)}")
    bad_b = [b for b in budgets if not 0 < b <= 1]
    if bad_b:
        raise ValueError(f"budgets are fractions of the visual tokens in (0, 1]; got {bad_b}")
    if not samples:
        raise ValueError("samples is empty")
    prompt = prompt or default_prompt(processor)
    remove(model)
    prepared = prepare(samples, processor, prompt, batch_size)
    tok = processor.tokenizer
    runs = [(v, b, m, p) for v in variants for b in budgets for m in budget_meanings for p in positions]
    bar = tqdm(total=len(samples) * (1 + len(runs)), desc="eval", unit="answer", disable=not progress,
               dynamic_ncols=True)
    t0 = time.perf_counter()
    base_texts, base_logp, used, before, _ = answer(model, prepared, tok, progress=bar)
    base = _summarise(Result("unpruned", "none", None, None), base_texts, base_logp, used, before, prepared, None)
    base.seconds = time.perf_counter() - t0
    results = [base]
    counts = sorted({int(n) for n in before})
    done: dict[tuple, Result] = {}  # (label, budget, positions, the stages' counts) -> result
    for variant, budget, meaning, pos in runs:
        bar.set_postfix_str(f"{variant.label} {budget:g} {meaning} {pos}")
        options = dict(keep_ratio=budget, positions=pos, budget_meaning=meaning, **variant.overrides)
        key = (variant.label, budget, pos, _stage_counts(model, variant.method, options, counts))
        if key[-1] is not None and key in done:  # the same stages under the other meaning: the same run
            results.append(dataclasses.replace(done[key], budget_meaning=meaning))
            bar.update(len(samples))
            continue
        res = Result(variant.label, variant.method, budget, pos, budget_meaning=meaning,
                     overrides=dict(variant.overrides))
        t0 = time.perf_counter()
        try:
            build(variant.method, model, **options)
            texts, logp, used, before, flops = answer(model, prepared, tok, progress=bar)
        except ValueError as err:  # budget out of reach, or a method that cannot run on this model
            res.status = f"not run: {err}"
            bar.update(len(samples))
        else:
            _summarise(res, texts, logp, used, before, prepared, base, base_texts, base_logp, flops)
            if math.isnan(base.gflops) and not math.isnan(res.gflops):
                base.gflops, base.flops_relative = sum(u for _, u in flops) / len(flops) / 1e9, 100.0
        finally:
            remove(model)
        res.seconds = time.perf_counter() - t0
        results.append(res)
        done[key] = res
    bar.close()
    return results


def _stage_counts(model, method: str, options: dict, visual_counts: Sequence[int]) -> tuple | None:
    """Where the method's stages prune and what they keep for each of ``visual_counts`` (None if it cannot plan)."""
    from ..api import adapter_for, make_config

    try:
        cls, config = make_config(method, **options)
        stages = cls(config).plan(adapter_for(model).describe())
        return tuple((s.point, s.layer, tuple(s.keep(n) for n in visual_counts)) for s in stages)
    except ValueError:
        return None


def default_prompt(processor):
    """The processor's chat template applied to one user turn (image, then question), or ``<image>\n{question}``
    when the processor has no template. The bundled model's template gives exactly ``bundled.prompt``."""
    image_token = getattr(processor, "image_token", "<image>")
    if getattr(processor, "chat_template", None):
        def chat(question: str) -> str:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return chat
    return lambda question: f"{image_token}\n{question}"


# ---------------------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------------------
def table(results: Sequence[Result]) -> str:
    types = sorted({t for r in results for t in r.per_type})
    head = ["method", "budget", "meaning", "positions", "layer-avg tokens", "LLM prefill GFLOPs (% unpruned)",
            "accuracy (95% CI)", "Δ vs unpruned (paired 95% CI)", "relative %", "agreement", "KL", *types]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        budget = "—" if r.budget is None else f"{100 * r.budget:.1f}%"
        meaning = "—" if r.budget is None else r.budget_meaning
        if r.status != "ok":
            lines.append(f"| {r.label} | {budget} | {meaning} | {r.positions} | — | — | {r.status} |"
                         + " |" * (len(head) - 7))
            continue
        flops = "—" if math.isnan(r.gflops) else f"{r.gflops:.3g} ({r.flops_relative:.0f}%)"
        cells = [r.label, budget, meaning, r.positions or "—", f"{r.tokens:.1f}", flops,
                 f"{100 * r.accuracy:.1f} ({100 * r.ci_low:.1f}–{100 * r.ci_high:.1f})",
                 f"{100 * r.delta:+.1f} ({100 * r.delta_low:+.1f}…{100 * r.delta_high:+.1f})", f"{r.relative:.1f}",
                 f"{100 * r.agreement:.1f}", f"{r.kl:.3f}", *(f"{100 * r.per_type.get(t, math.nan):.1f}" for t in types)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(results: Sequence[Result]) -> str:
    """One row per method (and budget meaning, when several were run), one column per budget: accuracy in each
    position mode (renumber / original) and the layer-averaged tokens, with the unpruned accuracy in the header;
    '—' where the method could not reach the budget."""
    base = next((r for r in results if r.budget is None), None)
    budgets = sorted({r.budget for r in results if r.budget is not None}, reverse=True)
    modes = [m for m in POSITION_MODES if any(r.positions == m for r in results)]
    labels = list(dict.fromkeys(_label(r, results) for r in results if r.budget is not None))
    cells = {(_label(r, results), r.budget, r.positions): r for r in results if r.budget is not None}
    unpruned = f"unpruned {100 * base.accuracy:.1f}" if base is not None else ""
    head = [f"method ({' / '.join(modes)}); {unpruned}"] + [f"{100 * b:.1f}% of the visual tokens" for b in budgets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in labels:
        row = [label]
        for b in budgets:
            vals = [cells.get((label, b, m)) for m in modes]
            acc = " / ".join("—" if r is None or r.status != "ok" else f"{100 * r.accuracy:.1f}" for r in vals)
            tokens = [r.tokens for r in vals if r is not None and r.status == "ok"]
            row.append(acc + (f" ({tokens[0]:.0f} tok)" if tokens else ""))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _label(r: Result, results: Sequence[Result]) -> str:
    """The method's label, with its budget meaning when the results hold more than one."""
    several = len({x.budget_meaning for x in results if x.budget is not None}) > 1
    return f"{r.label} ({r.budget_meaning})" if several else r.label


def write(results: Sequence[Result], out: str | Path, meta: dict | None = None) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{k: v for k, v in asdict(r).items() if k != "hits"} for r in results]
    (out / "results.json").write_text(json.dumps({"meta": meta or {}, "results": rows}, indent=1) + "\n")
    types = sorted({t for r in results for t in r.per_type})
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        cols = ["label", "method", "budget", "budget_meaning", "positions", "status", "n", "tokens", "visual_tokens",
                "gflops", "flops_relative", "accuracy",
                "ci_low", "ci_high", "delta", "delta_low", "delta_high", "relative", "agreement", "kl", "seconds"]
        w.writerow(cols + [f"acc_{t}" for t in types])
        for r in rows:
            w.writerow([r[c] for c in cols] + [r["per_type"].get(t, "") for t in types])
    (out / "results.md").write_text(table(results) + "\n\n" + summary(results) + "\n")
    return [out / "results.json", out / "results.csv", out / "results.md", plot(results, out / "accuracy.png")]


def plot(results: Sequence[Result], path: str | Path) -> Path:
    """Accuracy vs. layer-averaged visual tokens, one line per method, one panel per position mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    path = Path(path)
    base = next((r for r in results if r.budget is None), None)
    modes = [m for m in POSITION_MODES if any(r.positions == m for r in results)] or ["renumber"]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.2 * len(modes), 4.6), squeeze=False, sharey=True)
    labels = list(dict.fromkeys(_label(r, results) for r in results if r.budget is not None))
    cmap = plt.get_cmap("tab20")
    for ax, mode in zip(axes[0], modes):
        for i, label in enumerate(labels):
            rows = sorted((r for r in results if _label(r, results) == label and r.positions == mode
                           and r.status == "ok"), key=lambda r: r.tokens)
            if not rows:
                continue
            x = [r.tokens for r in rows]
            y = [100 * r.accuracy for r in rows]
            err = [[100 * (r.accuracy - r.ci_low) for r in rows], [100 * (r.ci_high - r.accuracy) for r in rows]]
            style = dict(lw=2.4, color="black") if label.split(" ")[0] == "tops" else dict(lw=1.2, color=cmap(i % 20))
            ax.errorbar(x, y, yerr=err, marker="o", ms=3, capsize=2, label=label, **style)
        if base is not None:
            ax.axhline(100 * base.accuracy, ls="--", color="grey", lw=1, label="unpruned")
        ax.set_xscale("log")
        ticks = sorted({round(r.tokens) for r in results if r.positions == mode and r.status == "ok"})
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("layer-averaged visual tokens kept")
        ax.set_title(f"positions: {mode}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%) with 95% CI")
    axes[0][-1].legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
