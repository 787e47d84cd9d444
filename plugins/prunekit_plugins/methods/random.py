"""Random: a uniformly random subset of the visual tokens, seeded (the control every method must beat)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveInt, model_validator
from torch import Tensor

from prunekit.plugin import Method, MethodConfig, ModelSpec, Stage, StagePlan, check_layers, hookimpl, make_stages
from prunekit_plugins.methods.common import SeedSelection


def random_subset(n: int, k: int, seed: int, device=None) -> Tensor:
    """``k`` of ``n`` indices drawn uniformly without replacement with ``seed``, ascending."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].sort().values.to(device)


class RandomConfig(SeedSelection, MethodConfig):
    insertion_point: Literal["after_projector", "decoder_layer"] = Field(
        "after_projector", description="Where to drop tokens."
    )
    layer: PositiveInt = Field(2, description="First decoder layer that sees the pruned tokens (decoder_layer only).")

    @model_validator(mode="after")
    def _layer_needs_decoder(self):
        if "layer" in self.model_fields_set and self.insertion_point != "decoder_layer":
            raise ValueError(
                f"layer is only used with insertion_point='decoder_layer' (got insertion_point={self.insertion_point!r})"
            )
        return self


class RandomPruning(Method):
    name = "random"
    Config = RandomConfig
    SelectionConfig = SeedSelection
    description = "Uniformly random visual tokens, seeded."

    def plan(self, spec: ModelSpec) -> list[Stage]:
        cfg = self.config
        layer = None
        if cfg.insertion_point == "decoder_layer":
            layer = check_layers([cfg.layer], spec.num_layers, "layer")[0]
        plan = StagePlan(cfg.insertion_point, self.chooser(), layer, label="random")
        return make_stages(cfg, spec, [plan], method=self.name)

    @classmethod
    def rule(cls, features: Tensor, relevance: Tensor | None, k: int, config: SeedSelection) -> Tensor:
        """The same seeded subset for every sample of a size."""
        return random_subset(features.shape[0], k, config.seed, features.device)


@hookimpl
def prunekit_register_methods(register):
    register(RandomPruning)
