"""FasterVLM (arXiv:2412.01818): keep the patches the vision encoder's [CLS] token attends to most.

Relevance is the [CLS] attention at the feature layer (LLaVA: the penultimate), mean over heads, recomputed from the
layer's q/k so sdpa stays on; pruning happens on the vision features, before the projector.
"""

from __future__ import annotations

from prunekit.plugin import MethodConfig, ModelSpec, Stage, StagePlan, hookimpl, make_stages
from prunekit_plugins.methods.common import KeepMostRelevant


class FasterVLMConfig(MethodConfig):
    pass


class FasterVLM(KeepMostRelevant):
    name = "fastervlm"
    Config = FasterVLMConfig
    description = "Top-k patches by [CLS] attention, before the projector."
    relevance_input = "the [CLS] attention"
    #: the official code keeps `visual_token_num` tokens of every crop (llava_arch.py L145-149)
    official_budget_per = "crop"

    def plan(self, spec: ModelSpec) -> list[Stage]:
        choose = self.chooser(lambda ctx: [r.float() for r in ctx.relevance("cls_attention")])
        plan = StagePlan("vision_features", choose, label="fastervlm", signals=("cls_attention",))
        return make_stages(self.config, spec, [plan], method=self.name)


@hookimpl
def prunekit_register_methods(register):
    register(FasterVLM)
