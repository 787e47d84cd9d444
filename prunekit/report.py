"""What ``prunekit.pruning_report(model)`` returns: the pruning of the last forward pass that had visual tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from .flops import LayerCost, prefill_flops


@dataclass
class StageRecord:
    """What one stage of the last prefill kept: per sample, the kept tokens' indices and which of them are merges."""

    label: str
    point: str
    layer: int | None  # first decoder layer that sees the pruned sequence; None before the LLM
    #: per sample: kept indices into that sample's original visual tokens, in sequence order
    kept: list[Tensor] = field(default_factory=list)
    #: per sample, aligned with ``kept``: True where the token's value is a merge of several tokens
    merged: list[Tensor] = field(default_factory=list)

    @property
    def counts(self) -> list[int]:
        """Per sample, how many tokens this stage kept."""
        return [int(k.numel()) for k in self.kept]

    @property
    def merged_counts(self) -> list[int]:
        """Per sample, how many of the kept tokens carry merged values (0 for pure pruning)."""
        return [int(m.sum()) for m in self.merged] if self.merged else [0] * len(self.kept)


@dataclass
class PruningReport:
    """What the last prefill of a patched model pruned: the visual tokens per sample, each stage's kept tokens, the
    budget and its meaning, and the counts (per layer, layer-averaged) and prefill FLOPs derived from them.

    Returned by :func:`prunekit.pruning_report`; ``summary()`` is a readable account, ``as_dict()`` the numbers."""

    method: str
    num_layers: int
    visual_tokens: list[int]  # per sample, before pruning
    stages: list[StageRecord] = field(default_factory=list)
    #: False when the prefill ran inside ``prunekit.disabled``: nothing was pruned
    enabled: bool = True
    #: per sample, the nominal budget ``T`` the method was given (None: no single number, e.g. a schedule)
    budget: list[float | None] = field(default_factory=list)
    #: what ``budget`` counts: "nominal" (the method's own accounting), "layer_average" or "schedule"
    budget_meaning: str = "nominal"
    #: what one budget covers: "prompt", or each "image" / video frame, or each "crop" of an image
    budget_per: str = "prompt"
    #: per sample, the tokens of its prefill at the language model's input before any pruning (text + visual)
    sequence_lengths: list[int] = field(default_factory=list)
    #: the cost of each decoder layer (for :attr:`prefill_flops`); empty when unknown
    layer_costs: list[LayerCost] = field(default_factory=list)

    @property
    def layer_counts(self) -> list[list[int]]:
        """Per sample, the visual-token count that each decoder layer sees."""
        out = []
        for b, n in enumerate(self.visual_tokens):
            row, count, stage_iter = [], n, iter(sorted(self.stages, key=lambda s: -1 if s.layer is None else s.layer))
            stage = next(stage_iter, None)
            for layer in range(self.num_layers):
                while stage is not None and (stage.layer is None or stage.layer <= layer):
                    count = stage.counts[b]
                    stage = next(stage_iter, None)
                row.append(count)
            out.append(row)
        return out

    @property
    def layer_average(self) -> list[float]:
        """Per sample, the layer-averaged visual-token count (the number papers quote)."""
        return [sum(row) / len(row) if row else 0.0 for row in self.layer_counts]

    def _flops(self, layer_counts: list[list[int]]) -> list[int | None]:
        if not self.layer_costs or len(self.sequence_lengths) != len(self.visual_tokens):
            return [None] * len(self.visual_tokens)
        return [prefill_flops(self.layer_costs, [s - n + c for c in row])
                for s, n, row in zip(self.sequence_lengths, self.visual_tokens, layer_counts)]

    @property
    def prefill_flops(self) -> list[int | None]:
        """Per sample, the decoder layers' prefill FLOPs with this pruning (analytic, :mod:`prunekit.flops`)."""
        return self._flops(self.layer_counts)

    @property
    def prefill_flops_unpruned(self) -> list[int | None]:
        """Per sample, the same prefill's FLOPs with every visual token in every layer."""
        return self._flops([[n] * self.num_layers for n in self.visual_tokens])

    def as_dict(self) -> dict:
        """The numbers of this report, for results files (JSON-ready)."""
        return {
            "method": self.method, "enabled": self.enabled, "budget": self.budget,
            "budget_meaning": self.budget_meaning, "budget_per": self.budget_per, "visual_tokens": self.visual_tokens,
            "layer_average": self.layer_average, "prefill_flops": self.prefill_flops,
            "prefill_flops_unpruned": self.prefill_flops_unpruned,
            "stages": [{"label": s.label, "point": s.point, "layer": s.layer, "kept": s.counts,
                        "merged": s.merged_counts} for s in self.stages],
        }

    def summary(self) -> str:
        """A readable account of the report: budget, counts per stage, layer average, FLOPs."""
        lines = [f"method {self.method}: visual tokens per sample {self.visual_tokens}"]
        if self.budget and any(b is not None for b in self.budget):
            budget = ", ".join("-" if b is None else f"{b:g}" for b in self.budget)
            per = "" if self.budget_per == "prompt" else f", per {self.budget_per}"
            lines.append(f"  budget ({self.budget_meaning}{per}): {budget}")
        if not self.enabled:
            lines.append("  disabled (prunekit.disabled): nothing was pruned")
        for s in self.stages:
            where = "before the LLM" if s.layer is None else f"from decoder layer {s.layer}"
            merged = f" of which merged {s.merged_counts}" if any(s.merged_counts) else ""
            lines.append(f"  {s.label or s.point} ({where}): kept {s.counts}{merged}")
        avg = ", ".join(f"{a:.1f}" for a in self.layer_average)
        lines.append(f"  layer-averaged visual tokens: {avg}")
        flops, full = self.prefill_flops, self.prefill_flops_unpruned
        if flops and flops[0] is not None:
            shown = ", ".join(f"{f / 1e9:.3g} ({100 * f / u:.0f}%)" if u else f"{f / 1e9:.3g}" for f, u in zip(flops, full))
            lines.append(f"  LLM prefill GFLOPs (% of unpruned): {shown}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()
