"""PyramidDrop (CVPR'25, arXiv:2410.17247): FastV's rule at several depths, a pyramid of shrinking counts.

At each stage layer ℓ the last instruction token's attention ranks the visual tokens still present, computed as the
official code does with layer ℓ's *own* norm, query and key projections on layer ℓ's input (query × all keys,
rotary embedding, softmax, mean over heads) before layer ℓ runs on the survivors; the top ones go on. The paper keeps
50 %, 25 %, 12.5 % after layers 8, 16, 24 of 32 (ratio λ = 0.5); prunekit keeps that shape and scales it so
the layer-averaged count is the budget. Layers 0..7 see every token, so small budgets need earlier layers.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, field_validator

from prunekit.plugin import ModelSpec, Stage, StagePlan, check_layers, hookimpl, make_stages, scale_layers
from prunekit_plugins.methods.common import DecoderStageConfig, KeepMostRelevant, rater_attention, rater_signals


class PDropConfig(DecoderStageConfig):
    layers: list[PositiveInt] | None = Field(
        None, min_length=1,
        description="First decoder layers that see each stage's count; None: 8, 16, 24 of 32, scaled to depth.",
    )
    ratio: float = Field(0.5, gt=0.0, lt=1.0, description="λ: each stage keeps this fraction of the one before.")
    attention_layer: Literal["next", "previous"] = Field(
        "next", description="Whose attention ranks the tokens at stage layer ℓ: 'next' = layer ℓ's own on its input "
        "(the official code), 'previous' = layer ℓ-1's (FastV's rule).")

    @field_validator("layers")
    @classmethod
    def _increasing(cls, v):
        if v is not None and any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"layers must be strictly increasing, got {v}")
        return v


class PDrop(KeepMostRelevant):  # one stage's rule is FastV's: the top-k by the raters' attention
    name = "pdrop"
    Config = PDropConfig
    description = "Top-k by last-instruction-token attention at several layers, pyramid budgets."
    relevance_input = "each token's attention from the text (e.g. the last instruction token's)"

    def plan(self, spec: ModelSpec) -> list[Stage]:
        cfg = self.config
        if cfg.layers is not None:
            layers = check_layers(cfg.layers, spec.num_layers)
        else:
            layers = scale_layers((8, 16, 24), spec.num_layers)
        choose = self.chooser(lambda ctx: [r.float() for r in rater_attention(ctx, cfg.raters, cfg.attention_layer)])
        plans = [
            StagePlan("decoder_layer", choose,
                      layer,
                      shape=cfg.ratio ** (i + 1), label=f"pdrop stage {i + 1} (layer {layer})",
                      signals=rater_signals(cfg.raters))
            for i, layer in enumerate(layers)
        ]
        return make_stages(cfg, spec, plans, method=self.name)


@hookimpl
def prunekit_register_methods(register):
    register(PDrop)
