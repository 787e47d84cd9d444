"""What ``prunekit.inspect(model)`` returns: the pruning of the last forward pass that had visual tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class StageRecord:
    label: str
    point: str
    layer: int | None  # first decoder layer that sees the pruned sequence; None before the LLM
    #: per sample: kept indices into that sample's original visual tokens, in sequence order
    kept: list[Tensor] = field(default_factory=list)
    #: per sample, aligned with ``kept``: True where the token's value is a merge of several tokens
    merged: list[Tensor] = field(default_factory=list)

    @property
    def counts(self) -> list[int]:
        return [int(k.numel()) for k in self.kept]

    @property
    def merged_counts(self) -> list[int]:
        """Per sample, how many of the kept tokens carry merged values (0 for pure pruning)."""
        return [int(m.sum()) for m in self.merged] if self.merged else [0] * len(self.kept)


@dataclass
class PruningReport:
    method: str
    num_layers: int
    visual_tokens: list[int]  # per sample, before pruning
    stages: list[StageRecord] = field(default_factory=list)
    #: False when the prefill ran inside ``prunekit.disabled``: nothing was pruned
    enabled: bool = True

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

    def summary(self) -> str:
        lines = [f"method {self.method}: visual tokens per sample {self.visual_tokens}"]
        if not self.enabled:
            lines.append("  disabled (prunekit.disabled): nothing was pruned")
        for s in self.stages:
            where = "before the LLM" if s.layer is None else f"from decoder layer {s.layer}"
            merged = f" of which merged {s.merged_counts}" if any(s.merged_counts) else ""
            lines.append(f"  {s.label or s.point} ({where}): kept {s.counts}{merged}")
        avg = ", ".join(f"{a:.1f}" for a in self.layer_average)
        lines.append(f"  layer-averaged visual tokens: {avg}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()
