"""TOPS: Token Optimal Preservation Sets (arXiv:2606.27161).

Pick the visual tokens that maximise task relevance + information coverage, with semantic diversity as a
necessary condition, greedily:

    score_i = N(r)_i + α·N(d)_i + λ·N(c)_i

once after the projector (relevance = [CLS] attention) and again at two decoder layers p1 < p2 (relevance =
attention from the text raters). With a preset, ``keep_tokens=T`` is the paper's nominal T and each stage keeps
the paper's count for it (Appendix C, Tables 9 and 10: LLaVA 2T → T → T/4); ``budget_meaning="layer_average"``
(and every model without a preset) reads T as the layer-averaged count instead. Choices the paper leaves open are
config fields, documented in docs/methods/tops.md.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Literal

from pydantic import Field, PositiveInt, field_validator, model_validator
from torch import Tensor

from prunekit.plugin import (
    Method,
    MethodConfig,
    ModelSpec,
    SelectionInput,
    Selector,
    Stage,
    StageContext,
    StagePlacement,
    StrictModel,
    hookimpl,
    registered_name,
    registry,
    resolve_counts,
)
from prunekit_plugins.methods.common import rater_attention, rater_signals

Principle = Literal["relevance", "coverage", "diversity"]
Point = Literal["after_projector", "decoder_layer"]

#: The stages TOPS can run, in order: stage I (after the projector) and stage II at p1 and p2.
STAGES = ("after_projector", "p1", "p2")
_LLAVA_COUNTS = {128: (256, 128, 32), 64: (128, 64, 16), 32: (64, 32, 8)}
_NEXT_COUNTS = {640: (1280, 640, 160), 320: (640, 320, 80), 160: (320, 160, 40)}
_QWEN_COUNTS = {512: (512, 281, 77), 256: (256, 139, 39), 128: (128, 71, 19)}

#: Per backbone: the decoder layers (p1, p2); ``counts``: for each nominal T the paper lists, the tokens each of the
#: preset's stages keeps (Appendix C, Tables 9 and 10; ``stages`` names them, default all three); and
#: ``decoder_weights``: the stage-II (α, λ) the paper used at each T it gives them for.
PRESETS: dict[str, dict] = {
    "llava-1.5-7b": {"family": "llava", "num_layers": 32, "layers": (12, 24), "model_id": "llava-hf/llava-1.5-7b-hf",
                     "counts": _LLAVA_COUNTS, "decoder_weights": {128: (0.5, 0.5), 64: (0.5, 1.0), 32: (0.5, 1.0)}},
    "llava-1.5-13b": {"family": "llava", "num_layers": 40, "layers": (15, 30), "model_id": "llava-hf/llava-1.5-13b-hf",
                      "counts": _LLAVA_COUNTS, "decoder_weights": {128: (0.5, 0.4), 64: (0.5, 0.4), 32: (0.5, 0.4)}},
    "llava-next-7b": {"family": "llava_next", "num_layers": 32, "layers": (12, 24),
                      "model_id": "llava-hf/llava-v1.6-vicuna-7b-hf", "counts": _NEXT_COUNTS,
                      "decoder_weights": {640: (0.5, 0.5), 320: (0.5, 0.4), 160: (0.5, 0.5)}},
    "llava-next-13b": {"family": "llava_next", "num_layers": 40, "layers": (15, 30),
                       "model_id": "llava-hf/llava-v1.6-vicuna-13b-hf", "counts": _NEXT_COUNTS,
                       "decoder_weights": {640: (0.5, 0.5), 320: (0.5, 0.5), 160: (0.5, 0.5)}},
    "qwen2.5-vl-7b": {"family": "qwen2_5_vl", "num_layers": 28, "layers": (12, 16),
                      "model_id": "Qwen/Qwen2.5-VL-7B-Instruct", "counts": _QWEN_COUNTS,
                      "decoder_weights": {512: (0.5, 0.4), 256: (0.5, 0.4), 128: (0.5, 0.4)}},
    # (α, λ) given at 80 % and 90 % pruned of 1,280 tokens (T = 256, 128); none for T = 512.
    "internvl3-8b": {"family": "internvl", "num_layers": 28, "layers": (12, 16), "model_id": "OpenGVLab/InternVL3-8B-hf",
                     "counts": _QWEN_COUNTS, "decoder_weights": {256: (0.2, 0.2), 128: (0.3, 0.2)}},
    # Stage I only, T per frame; named only (LLaVA-OneVision-7B images share the class and depth).
    "llava-video-7b": {"family": "llava_onevision", "num_layers": 28, "layers": None, "auto": False,
                       "model_id": "llava-hf/LLaVA-Video-7B-Qwen2-hf", "stages": ("after_projector",),
                       "counts": {64: (64,), 32: (32,), 16: (16,)}, "decoder_weights": {64: (0.5, 0.5)},
                       "insertion_points": ["after_projector"], "budget_per": "image"},
}
#: Stage shape of a model without a preset: the paper's LLaVA schedule 2T → T → T/4.
STAGE_SHAPE = {"after_projector": 2.0, "p1": 1.0, "p2": 0.25}


def nearest_listed(listed, budget: float) -> int:
    """The listed T closest to ``budget`` (a tie goes to the smaller T)."""
    return min(sorted(listed), key=lambda t: abs(t - budget))


def check_listed(preset: dict, stages: tuple[str, ...]) -> None:
    """Raise when the paper gives the preset no counts for one of ``stages``."""
    missing = [s for s in stages if s not in preset.get("stages", STAGES)]
    if missing:
        raise ValueError(f"the paper gives no counts for TOPS stage(s) {missing} with this preset; set "
                         "budget_meaning='layer_average' or an explicit schedule")


def preset_shape(preset: dict, budget: float) -> dict[str, float]:
    """Each stage's count as a multiple of T, from the listed T nearest to ``budget``."""
    ref = nearest_listed(preset["counts"], budget)
    return {stage: count / ref for stage, count in zip(preset.get("stages", STAGES), preset["counts"][ref])}


def paper_counts(preset: dict, budget: float, n: int, stages: tuple[str, ...] | None = None) -> list[int]:
    """The tokens each stage keeps at nominal budget ``budget`` with ``n`` visual tokens.

    A T the paper lists gives its counts; any other T scales those of the nearest listed T by ``T / T_listed``,
    rounded half up. Every count is at least 1, at most the stage before's and at most ``n``; ``T >= n`` keeps
    everything (as every method does at ``keep_ratio=1.0``).
    """
    stages = tuple(preset.get("stages", STAGES)) if stages is None else stages
    check_listed(preset, stages)
    ref = nearest_listed(preset["counts"], budget)
    listed = dict(zip(preset.get("stages", STAGES), preset["counts"][ref]))
    if budget >= n:
        return [n for _ in stages]
    out, cap = [], n
    for stage in stages:
        cap = min(cap, max(1, math.floor(listed[stage] * budget / ref + 0.5)))
        out.append(cap)
    return out


class TopsSelection(StrictModel):
    """The fields of one TOPS selection (also accepted by ``prunekit.select("tops", ...)``)."""

    principles: list[Principle] = Field(
        default_factory=lambda: ["relevance", "coverage", "diversity"], min_length=1,
        description="Which principles enter the score (the paper's Table 5 ablates all 7 subsets).",
    )
    diversity_weight: float = Field(0.5, ge=0.0, description="α, weight of the diversity term.")
    coverage_weight: float = Field(0.5, ge=0.0, description="λ, weight of the coverage term.")
    normalize: Literal["minmax", "mean"] = Field(
        "minmax", description="Per-step normalisation over candidates: main text min-max, Algorithms 1-2 mean."
    )
    relevance_scorer: str = Field("relevance", description="Registered scorer used for the relevance principle.")
    coverage_scorer: str = Field("facility_location", description="Registered scorer used for coverage.")
    diversity_scorer: str = Field("diversity", description="Registered scorer used for diversity.")
    max_similarity_mib: float | None = Field(
        None, ge=0.0,
        description="Hold the N×N similarity matrix only below this size (MiB, whole batch); above, rows are "
                    "computed on demand (less memory, slower). None: 1024.",
    )

    @field_validator("principles")
    @classmethod
    def _unique(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"principles must not repeat, got {v}")
        return v

    @field_validator("relevance_scorer", "coverage_scorer", "diversity_scorer")
    @classmethod
    def _registered(cls, v):
        return registered_name("scorers", v)

    def selector(self) -> Selector:
        """The registered ``greedy`` selector over this selection's scorers and weights."""
        alpha, lam = self.diversity_weight, self.coverage_weight
        scorer = lambda field: registry.get("scorers", getattr(self, field))()  # noqa: E731
        terms, seed = [], None
        if "relevance" in self.principles:
            seed = scorer("relevance_scorer")  # the paper seeds with the most relevant token
            terms.append((seed, 1.0))
        if "diversity" in self.principles:
            terms.append((scorer("diversity_scorer"), alpha))
        if "coverage" in self.principles:
            terms.append((scorer("coverage_scorer"), lam))
        limit = None if self.max_similarity_mib is None else int(self.max_similarity_mib * 2**20)
        return registry.get("selectors", "greedy")(terms, combine="sum", normalize=self.normalize, seed=seed,
                                                   max_similarity_bytes=limit)

    @property
    def needs_relevance(self) -> bool:
        """True when the relevance term reads an external relevance vector (a swapped-in scorer may not)."""
        return "relevance" in self.principles and registry.get("scorers", self.relevance_scorer).requires_relevance


class TopsConfig(TopsSelection, MethodConfig):
    """Full TOPS configuration for ``prunekit.build("tops", model, ...)``."""

    preset: str | None = Field(
        None, description=f"Named paper setting: {', '.join(PRESETS)}; None picks one from the model when it matches."
    )
    insertion_points: list[Point] = Field(
        default_factory=lambda: ["after_projector", "decoder_layer"], min_length=1,
        description="Stages to run: stage I after the projector, stage II at the decoder layers.",
    )
    budget_meaning: Literal["nominal", "layer_average"] = Field(
        "nominal",
        description="'nominal': with a preset, keep_tokens (or keep_ratio × tokens) is the paper's T and each stage "
        "keeps the paper's count for it (LLaVA: 2T, T, T/4); without a preset T is the layer average. "
        "'layer_average': T is always the layer-averaged count (the preset's stage proportions scaled to it), "
        "to compare with other methods at equal compute.",
    )
    layers: tuple[PositiveInt, PositiveInt] | None = Field(
        None, description="(p1, p2): first decoder layers that see the stage-II counts. None: preset or 12/32, 24/32 of depth."
    )
    decoder_diversity_weight: float | None = Field(None, ge=0.0, description="α at stage II (None: preset or α).")
    decoder_coverage_weight: float | None = Field(None, ge=0.0, description="λ at stage II (None: preset or λ).")
    raters: Literal["sparsevlm", "last_token", "all_text"] = Field(
        "sparsevlm", description="Text tokens whose attention rates visual tokens at stage II."
    )
    projector_relevance: Literal["auto", "cls_attention", "text_similarity", "attention_received"] = Field(
        "auto",
        description="Relevance signal at stage I: the encoder's [CLS] attention (the paper); each token's mean "
        "cosine similarity to the instruction's input embeddings; or the mean attention its patches receive from "
        "the other patches at the encoder's feature layer. 'auto': cls_attention when the encoder has [CLS], "
        "else text_similarity.",
    )

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v):
        if v is not None and v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; presets: {', '.join(PRESETS)}")
        return v

    @field_validator("insertion_points")
    @classmethod
    def _unique_points(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"insertion_points must not repeat, got {v}")
        return v

    @model_validator(mode="after")
    def _ordered_layers(self):
        if self.layers is not None and not self.layers[0] < self.layers[1]:
            raise ValueError(f"layers must be (p1, p2) with p1 < p2, got {self.layers}")
        return self


class Tops(Method):
    name = "tops"
    Config = TopsConfig
    SelectionConfig = TopsSelection
    description = "Relevance + facility-location coverage + diversity, greedy, after the projector and in the LLM."

    @classmethod
    def batch_rule(cls, inputs: SelectionInput, k: int, config: TopsSelection) -> Tensor:
        return config.selector().select(inputs, k)

    @classmethod
    def check_selection(cls, relevance: Tensor | None, query: Tensor | None, config: TopsSelection) -> None:
        if config.needs_relevance and relevance is None:
            raise ValueError(
                "TOPS with the 'relevance' principle needs relevance=[B, N]; pass it or set principles without it"
            )

    def _preset(self, spec: ModelSpec) -> dict | None:
        if self.config.preset is not None:
            return PRESETS[self.config.preset]
        for preset in PRESETS.values():
            if preset.get("auto", True) and (preset["family"], preset["num_layers"]) == (spec.family, spec.num_layers):
                return preset
        return None

    def budget_per(self, spec: ModelSpec) -> str:
        """A preset's budget unit (LLaVA-Video: per frame) applies unless the user set ``budget_per``."""
        preset = self._preset(spec)
        if preset is not None and "budget_per" in preset and "budget_per" not in self.config.model_fields_set:
            return preset["budget_per"]
        return self.config.budget_per

    def _layers(self, spec: ModelSpec, preset: dict | None) -> tuple[int, int]:
        if self.config.layers is not None:
            layers = self.config.layers
        elif preset is not None and preset["layers"] is not None:
            layers = preset["layers"]
        else:  # the paper's 12/32 and 24/32 of depth
            layers = (max(1, int(spec.num_layers * 12 / 32 + 0.5)), int(spec.num_layers * 24 / 32 + 0.5))
        p1, p2 = layers
        if not 1 <= p1 < p2 <= spec.num_layers - 1:
            raise ValueError(
                f"layers={layers} does not fit a {spec.num_layers}-layer decoder: need 1 <= p1 < p2 <= "
                f"{spec.num_layers - 1}"
            )
        return p1, p2

    def _decoder_weights(self, preset: dict | None, budget_hint: float | None) -> tuple[float, float]:
        alpha, lam = self.config.diversity_weight, self.config.coverage_weight
        if preset is not None and budget_hint is not None:
            alpha, lam = preset["decoder_weights"][nearest_listed(preset["decoder_weights"], budget_hint)]
        if self.config.decoder_diversity_weight is not None:
            alpha = self.config.decoder_diversity_weight
        if self.config.decoder_coverage_weight is not None:
            lam = self.config.decoder_coverage_weight
        return alpha, lam

    def plan(self, spec: ModelSpec) -> list[Stage]:
        cfg = self.config
        cfg.selector()  # a selector or scorer plugin that is not registered fails here, at build, not at a forward
        preset = self._preset(spec)
        insertion_points = cfg.insertion_points
        # a preset's stages apply unless the user set them (its budget unit: see budget_per)
        if preset is not None and "insertion_points" in preset and "insertion_points" not in cfg.model_fields_set:
            insertion_points = preset["insertion_points"]
        points: list[tuple[str, int | None, str, str]] = []  # point, layer, stage key, label
        if "after_projector" in insertion_points:
            points.append(("after_projector", None, "after_projector", "stage I"))
        if "decoder_layer" in insertion_points:
            p1, p2 = self._layers(spec, preset)
            points += [("decoder_layer", p1, "p1", "stage II (p1)"), ("decoder_layer", p2, "p2", "stage II (p2)")]
        if cfg.schedule is not None and len(cfg.schedule) != len(points):
            raise ValueError(f"schedule has {len(cfg.schedule)} counts but TOPS runs {len(points)} stages here")
        keys = tuple(key for _, _, key, _ in points)
        nominal = preset is not None and cfg.budget_meaning == "nominal"
        if nominal and cfg.schedule is None:
            check_listed(preset, keys)
        listed = preset is not None and all(key in preset.get("stages", STAGES) for key in keys)
        counts_cache: dict[int, list[int]] = {}

        def counts(n: int) -> list[int]:
            if n not in counts_cache:
                if cfg.schedule is not None:
                    counts_cache[n] = [min(n, k) for k in cfg.schedule]
                elif nominal:
                    counts_cache[n] = paper_counts(preset, cfg.target(n), n, keys)
                else:
                    shape = preset_shape(preset, cfg.target(n)) if listed else STAGE_SHAPE
                    placements = [StagePlacement(0 if layer is None else layer, shape[key])
                                  for _, layer, key, _ in points]
                    counts_cache[n] = resolve_counts(n, cfg.target(n), placements, spec.num_layers)
            return counts_cache[n]

        hint = None
        if cfg.keep_tokens is not None:
            hint = float(cfg.keep_tokens)
        elif spec.visual_tokens_per_image:
            hint = cfg.target(spec.visual_tokens_per_image)
        decoder_weights = self._decoder_weights(preset, hint)

        # stage II runs the same rule with its own weights
        alpha, lam = decoder_weights
        decoder_cfg = cfg.model_copy(update={"diversity_weight": alpha, "coverage_weight": lam})
        stages = []
        for i, (point, layer, _, label) in enumerate(points):
            if point == "after_projector":
                stage_cfg = cfg
                signal = cfg.projector_relevance
                if signal == "auto":
                    signal = "cls_attention" if spec.has_cls else "text_similarity"
                signals = (signal,)
                relevance_of = partial(StageContext.relevance, signal=signal)
            else:  # stage II: the text raters' attention (the SparseVLM rule on layer p-1's normalised input)
                stage_cfg = decoder_cfg
                signals = rater_signals(cfg.raters)
                relevance_of = partial(rater_attention, raters=cfg.raters)
            stages.append(Stage(
                point=point, layer=layer, label=label,
                keep=lambda n, i=i: counts(n)[i],
                choose=self.chooser(relevance_of if cfg.needs_relevance else None, config=stage_cfg),
                signals=signals if cfg.needs_relevance else (),
            ))
        return stages


@hookimpl
def prunekit_register_methods(register):
    register(Tops)
