"""FasterVLM (arXiv:2412.01818): keep the patches the vision encoder's [CLS] token attends to most.

Relevance is the [CLS] attention at the feature layer (LLaVA: the penultimate), mean over heads, recomputed from the
layer's q/k so sdpa stays on; pruning happens on the vision features, before the projector.
"""

from __future__ import annotations

from torch import Tensor

from prunekit.plugin import Method, MethodConfig, ModelSpec, Stage, StagePlan, StrictModel, hookimpl, make_stages, topk
from prunekit_plugins.methods.common import relevance_topk


class FasterVLMConfig(MethodConfig):
    pass


class FasterVLM(Method):
    name = "fastervlm"
    Config = FasterVLMConfig
    SelectionConfig = StrictModel
    description = "Top-k patches by [CLS] attention, before the projector."
    #: the official code keeps `visual_token_num` tokens of every crop (llava_arch.py L145-149)
    official_budget_per = "crop"

    def plan(self, spec: ModelSpec) -> list[Stage]:
        plan = StagePlan("vision_features", relevance_topk("cls_attention"), label="fastervlm", signals=("cls_attention",))
        return make_stages(self.config, spec, [plan], method=self.name)

    @classmethod
    def select(cls, features: Tensor, relevance: Tensor | None, k: int, config) -> Tensor:
        if relevance is None:
            raise ValueError("fastervlm selects by [CLS] attention: pass relevance=[B, N]")
        return topk(relevance, k)


@hookimpl
def prunekit_register_methods(register):
    register(FasterVLM)
