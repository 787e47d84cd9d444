"""FastV (ECCV'24, arXiv:2403.06764): after decoder layer K-1, keep the visual tokens the last token attends to most.

Relevance is layer K-1's attention of the last prompt token to each visual token, mean over heads, recomputed for
that one query row (sdpa stays on). Nominally (the default), ``keep_tokens=T`` keeps ``T`` tokens from layer K on,
as the comparisons in the literature count FastV; layers 0..K-1 see every token, so the layer average is higher
(``prunekit.pruning_report`` shows it). With ``budget_meaning="layer_average"`` the count kept after layer K is solved so
that the layer average is ``T``; a ``T`` below ``K·n/L`` cannot be met (an error says so).
"""

from __future__ import annotations

from pydantic import Field, PositiveInt

from prunekit.plugin import ModelSpec, Stage, StagePlan, check_layers, hookimpl, make_stages
from prunekit_plugins.methods.common import (
    DecoderStageConfig,
    KeepMostRelevant,
    OriginalPositionsConfig,
    rater_attention,
    rater_signals,
)


class FastVConfig(OriginalPositionsConfig, DecoderStageConfig):
    layer: PositiveInt = Field(2, description="K: the first decoder layer that sees the pruned tokens (paper: K=2).")


class FastV(KeepMostRelevant):
    name = "fastv"
    Config = FastVConfig
    description = "Top-k visual tokens by the last token's attention at layer K-1."
    relevance_input = "each token's attention from the text (e.g. the last token's)"

    def plan(self, spec: ModelSpec) -> list[Stage]:
        cfg = self.config
        layer = check_layers([cfg.layer], spec.num_layers, "layer")[0]
        choose = self.chooser(lambda ctx: [r.float() for r in rater_attention(ctx, cfg.raters)])
        plan = StagePlan("decoder_layer", choose, layer, label=f"fastv (layer {layer})",
                         signals=rater_signals(cfg.raters))
        return make_stages(cfg, spec, [plan], method=self.name, nominal=lambda n, t: [int(t + 0.5)])


@hookimpl
def prunekit_register_methods(register):
    register(FastV)
