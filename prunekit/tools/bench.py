"""``prunekit bench``: what pruning costs and saves, measured.

Two parts, both written to JSON and drawn as plots, each at one or more batch sizes (``batch``):

* **selection**: TOPS's selection alone at N = 576 / 2,880 / 10,816 visual tokens (K = 256 / 1,280 / 4,096 by
  default), the incremental exact greedy against the naive loop that recomputes every coverage gain every step
  (the same exact gains, ``coverage_scorer="facility_location_naive"``), next to the unpruned prefill at the same
  batch over those N tokens and the prompt's text: on a GPU at the real depth, the 7B's whole 32-layer language
  model (random weights, built on the device in the run's dtype); else one 7B-width decoder layer measured, times
  32 (:func:`selection_prefill_kind`; a float32 7B does not fit a CPU machine's memory);
* **model**: prefill time (time to first token), decode time per token, peak memory and exact FLOPs (counted by
  ``torch.utils.flop_counter``), unpruned vs each method and budget, on a LLaVA with the real width of a 7B
  backbone (CLIP-L/14-336 width, Llama hidden 4096, 32 heads, MLP 11008), built directly on the device. With
  fewer layers than the real 32 + 24, time and FLOPs spent inside vision-encoder layers and decoder layers are
  measured separately (module hooks) and scaled to the real depth: ``scaled = measured + (real/used - 1) *
  in_layers``; everything else (embeddings, projector, selection, lm head) is counted once, as measured. At the
  real depth (``decoder_layers=32, vision_layers=24``) the factor is 0, no layer is hooked, and scaled = measured.

Random weights throughout: the timings of a forward pass do not depend on what the weights are.

This module is the two benchmarks' measurement code (kept together: both share the model builders and a run
reads top to bottom); its clocks and counters are in :mod:`.measure`, its tables and plots in
:mod:`.bench_report`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .bench_report import PREFILL_LABELS, _fmt, check_targets, plots, tables
from .measure import LayerClock, _StepClock, _progress, _say, _timed, count_flops, peak_memory_mib

#: the paper's selection sizes: LLaVA-1.5 (576 → 256), LLaVA-NeXT (2,880 → 1,280), LLaVA-Video (64 × 169 → 4,096)
SELECTION_SIZES = ((576, 256), (2880, 1280), (10816, 4096))
DEFAULT_METHODS = ("tops", "visionzip", "fastv", "pdrop", "sparsevlm", "dart", "divprune", "scope", "cdpruner")
DEFAULT_BUDGETS = (192, 128, 64)
REAL_DECODER_LAYERS, REAL_VISION_LAYERS = 32, 24


# ---------------------------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------------------------
def clustered_features(n: int, dim: int, *, batch: int = 1, clusters: int = 64, seed: int = 0,
                       device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Synthetic visual tokens: a shared offset (real projected tokens are far from zero-mean), ``clusters``
    centres and per-token noise, plus relevance in [0, 1). Deterministic per seed."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(dim, generator=g)
    centres = torch.randn(clusters, dim, generator=g)
    which = torch.randint(0, clusters, (batch, n), generator=g)
    feats = 1.5 * offset + centres[which] + 0.8 * torch.randn(batch, n, dim, generator=g)
    relevance = torch.rand(batch, n, generator=g)
    return feats.to(device=device, dtype=dtype), relevance.to(device)


def llava_7b_config(decoder_layers: int = REAL_DECODER_LAYERS, vision_layers: int = REAL_VISION_LAYERS):
    """LLaVA-1.5-7B's shapes: CLIP ViT-L/14-336 (1024 wide, 16 heads, 576 patches) and a Llama of hidden 4096,
    32 heads, MLP 11008, vocabulary 32,064; ``decoder_layers`` / ``vision_layers`` of its 32 / 24 layers."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=decoder_layers,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, pad_token_id=0,
                       max_position_embeddings=4096)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000)


def _on_device(build: Callable[[], Any], device: torch.device, seed: int = 0):
    """``build()`` with every parameter and buffer created (and randomly initialised) directly on ``device``:
    a full-depth 7B never passes through host memory, and its random initialisation runs on the device."""
    torch.manual_seed(seed)
    with torch.device(device):
        return build().eval()


def prefill_decoder(text_config, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A random-weight causal language model of ``text_config`` (all its layers), built on ``device`` in
    ``dtype``: what the unpruned prefill next to a selection is timed on."""
    from transformers import LlamaForCausalLM

    return _on_device(lambda: LlamaForCausalLM._from_config(text_config, attn_implementation="sdpa", dtype=dtype),
                      torch.device(device))


def decoder_prefill_ms(model, tokens: int, *, batch: int = 1, repeats: int = 1,
                       device: str | torch.device = "cpu") -> float:
    """Median time of ``model``'s prefill (``logits_to_keep=1``) of ``batch`` sequences of ``tokens`` random
    input embeddings, after a warm-up."""
    device = torch.device(device)
    dtype = next(model.parameters()).dtype
    width = model.config.hidden_size
    x = torch.randn(batch, tokens, width, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    with torch.no_grad():
        run = lambda: model(inputs_embeds=x, logits_to_keep=1)  # noqa: E731
        run()  # warm-up
        times = [_timed(run, device) for _ in range(repeats)]
    del x
    return statistics.median(times)


def _decoder_layer(dim: int, heads: int, mlp: int, device, dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=dim, intermediate_size=mlp, num_attention_heads=heads, num_key_value_heads=heads,
                      num_hidden_layers=1, max_position_embeddings=32768)
    cfg._attn_implementation = "sdpa"
    device = torch.device(device)
    layer = _on_device(lambda: LlamaDecoderLayer(cfg, layer_idx=0).to(dtype=dtype), device)
    return layer, _on_device(lambda: LlamaRotaryEmbedding(cfg), device)


def decoder_layer_prefill_ms(tokens: int, *, dim: int = 4096, heads: int = 32, mlp: int = 11008, batch: int = 1,
                             repeats: int = 1, device: str | torch.device = "cpu",
                             dtype: torch.dtype = torch.float32) -> float:
    """Median time of one causal 7B-width decoder layer over ``batch`` sequences of ``tokens`` tokens (sdpa),
    after a warm-up."""
    device = torch.device(device)
    layer, rotary = _decoder_layer(dim, heads, mlp, device, dtype)
    x = torch.randn(batch, tokens, dim, device=device, dtype=dtype)
    pos = torch.arange(tokens, device=device)[None]
    emb = rotary(x, pos)
    with torch.no_grad():
        run = lambda: layer(x, attention_mask=None, position_ids=pos, position_embeddings=emb)  # noqa: E731
        run()  # warm-up
        times = [_timed(run, device) for _ in range(repeats)]
    del layer, x
    return statistics.median(times)


#: how the unpruned prefill next to a selection is measured (``prefill`` of :func:`selection_benchmark`)
SELECTION_PREFILLS = ("auto", "decoder", "layer", "none")
#: the text tokens of :func:`model_inputs`' prompt (BOS, system prefix, question): a prefill next to a selection
#: of N visual tokens runs over N + these
PROMPT_TEXT_TOKENS = 1 + 35 + 30


def selection_prefill_kind(prefill: str | bool, device: str | torch.device, decoder_layers: int) -> str | None:
    """Which unpruned prefill a selection is compared with: ``"decoder"`` (the 7B config's whole language model,
    all 32 layers, timed as one forward), ``"layer"`` (one 7B-width decoder layer timed, times 32) or None.

    ``"auto"``: the whole decoder when the run is at the real depth (``decoder_layers`` = 32) on a device other
    than the CPU, where a 7B fits (bf16: 13.5 GB); else the one-layer estimate (a float32 7B takes 28 GB)."""
    if prefill is True:
        prefill = "auto"
    if prefill is False or prefill is None:
        prefill = "none"
    if prefill not in SELECTION_PREFILLS:
        raise ValueError(f"--selection-prefill must be one of {', '.join(SELECTION_PREFILLS)}; got {prefill!r}")
    if prefill == "auto":
        real = decoder_layers == REAL_DECODER_LAYERS and torch.device(device).type != "cpu"
        return "decoder" if real else "layer"
    return None if prefill == "none" else prefill


@dataclass
class SelectionRow:
    n: int
    k: int
    dim: int
    batch: int
    device: str
    fast_ms: float
    #: None where the naive loop was not run (``naive_up_to``)
    naive_ms: float | None
    naive_extrapolated: bool
    identical: bool | None
    #: the unpruned prefill at the same batch over n + ``prefill_tokens - n`` text tokens (ms)
    prefill_ms: float | None = None
    #: how it was measured: "decoder" (the 7B's 32-layer language model, one forward) or "layer" (one layer x 32)
    prefill: str | None = None
    prefill_tokens: int | None = None
    prefill_dtype: str | None = None
    #: the similarity-matrix memory cap passed to TOPS (MiB; None: the library default)
    max_similarity_mib: float | None = None
    speedup: float | None = field(init=False)
    fraction_of_prefill: float | None = field(init=False)

    def __post_init__(self) -> None:
        self.speedup = None if self.naive_ms is None else self.naive_ms / self.fast_ms
        self.fraction_of_prefill = None if not self.prefill_ms else self.fast_ms / self.prefill_ms


def _check_batches(batches: Sequence[int]) -> tuple[int, ...]:
    batches = tuple(batches)
    if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
        raise ValueError(f"--batch must be one or more integers >= 1; got {list(batches)}")
    return batches


def selection_benchmark(
    sizes: Sequence[tuple[int, int]] = SELECTION_SIZES,
    *,
    dim: int = 4096,
    batch: int | Sequence[int] = 1,
    repeats: int = 3,
    full_naive_up_to: int = 1000,
    naive_up_to: int | None = None,
    prefill: str | bool = "auto",
    decoder_layers: int = 4,
    dtype: torch.dtype = torch.float32,
    max_similarity_mib: float | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    rows: list | None = None,
    decoder_config=None,
) -> list[SelectionRow]:
    """Time TOPS's selection (default config) against the naive loop, at each size and batch.

    On a GPU the time is the steady state (the median of ``repeats`` calls after the first two, which compile the
    kernels and record the selection's CUDA graph): what a model that prunes the same shapes call after call pays.

    The naive loop is run in full up to ``full_naive_up_to`` tokens (and checked to select the same tokens);
    above, its per-step cost is constant (every step recomputes all N² terms), so it is timed for 4 and 44 steps
    (12 where that would take long) and extrapolated linearly to K steps (``naive_extrapolated``); above
    ``naive_up_to`` tokens it is not run. Next to each selection, the unpruned prefill at the same batch over the N
    visual tokens and the prompt's text (:func:`selection_prefill_kind` says which prefill; its model is built
    once, in ``dtype``; ``decoder_config``: its text config, default the 7B's at 32 layers). ``rows``: a list the
    rows are appended to as they are measured (what was measured survives an interruption)."""
    import prunekit

    device = torch.device(device)
    batches = _check_batches([batch] if isinstance(batch, int) else batch)
    kind = selection_prefill_kind(prefill, device, decoder_layers)
    rows = [] if rows is None else rows
    extra = {} if max_similarity_mib is None else {"max_similarity_mib": max_similarity_mib}
    decoder = None
    try:
        for (n, k), b in _progress([(s, b) for s in sizes for b in batches], "selection", progress):
            feats, rel = clustered_features(n, dim, batch=b, device=device)
            select = lambda kk, scorer: prunekit.select("tops", feats, rel, k=kk, coverage_scorer=scorer,  # noqa: E731
                                                        **extra)
            select(min(k, 4), "facility_location")  # warm-up
            if device.type == "cuda":  # the steady state: a key's first call runs as is, the second records its
                for _ in range(2):    # CUDA graph (prunekit.kernels.GraphCache), later calls replay it
                    select(k, "facility_location")
            kept: dict[str, torch.Tensor] = {}
            keep = lambda scorer: kept.__setitem__(scorer, select(k, scorer))  # noqa: E731
            fast = statistics.median(_timed(lambda: keep("facility_location"), device) for _ in range(repeats))
            naive, extrapolated, identical = None, False, None
            if naive_up_to is not None and n > naive_up_to:
                pass  # not run: too long for this run
            elif n <= full_naive_up_to:
                naive = _timed(lambda: keep("facility_location_naive"), device)
                identical = bool(torch.equal(kept["facility_location_naive"], kept["facility_location"]))
            else:  # a short and a longer prefix of the naive loop; their difference is the per-step cost
                a = 4
                ta = _timed(lambda: select(a, "facility_location_naive"), device)
                bb = a + 8
                tb = _timed(lambda: select(bb, "facility_location_naive"), device)
                per_step = max(tb - ta, 0.0) / (bb - a)
                if per_step * 32 < 30_000:  # cheap enough: a longer prefix for a steadier estimate
                    bb = a + 40
                    tb = _timed(lambda: select(bb, "facility_location_naive"), device)
                    per_step = max(tb - ta, 0.0) / (bb - a)
                naive, extrapolated = ta + (k - a) * per_step, True
            del feats, rel, kept
            _free(device)
            prefill_ms = tokens = None
            if kind is not None:
                tokens = n + PROMPT_TEXT_TOKENS
                if kind == "decoder":
                    if decoder is None:
                        decoder = prefill_decoder(decoder_config or _long_text_config(), device=device, dtype=dtype)
                    prefill_ms = decoder_prefill_ms(decoder, tokens, batch=b, repeats=repeats, device=device)
                else:
                    prefill_ms = REAL_DECODER_LAYERS * decoder_layer_prefill_ms(tokens, dim=dim, batch=b,
                                                                                device=device, dtype=dtype)
                _free(device)
            row = SelectionRow(n, k, dim, b, str(device), fast, naive, extrapolated, identical, prefill_ms,
                               kind, tokens, None if kind is None else str(dtype).replace("torch.", ""),
                               max_similarity_mib)
            rows.append(row)
            naive_text = "not run" if naive is None else f"{naive:.0f} ms{' (extrapolated)' if extrapolated else ''}"
            prefill_text = "" if prefill_ms is None else (f", unpruned prefill {prefill_ms:.0f} ms "
                                                          f"({PREFILL_LABELS[kind]}, {tokens} tokens)")
            _say(f"  selection N={n} K={k} batch={b}: incremental {fast:.1f} ms, naive {naive_text}{prefill_text}",
                 progress)
    finally:
        del decoder
        _free(device)
    return rows


def _long_text_config():
    """The 7B's language model at its 32 layers, with positions for video-scale prompts (10,816 + text)."""
    text = llava_7b_config(REAL_DECODER_LAYERS).text_config
    text.max_position_embeddings = 32768
    return text


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ModelSetting:
    name: str
    decoder_layers: int
    vision_layers: int
    real_decoder_layers: int
    real_vision_layers: int
    visual_tokens: int
    prompt_tokens: int


def build_model(kind: str, *, decoder_layers: int = 4, vision_layers: int = 2, dtype=torch.float32, device="cpu"):
    """``7b``: LLaVA-1.5-7B widths with ``decoder_layers`` of 32 and ``vision_layers`` of 24 layers (all of them:
    the real 7B's shapes), built and randomly initialised directly on ``device`` in ``dtype``; ``demo``: the CLI
    demo model; ``tiny``: the test model."""
    from transformers import LlavaForConditionalGeneration

    device = torch.device(device)
    if kind == "demo":
        from .demo import demo_model

        model = demo_model().to(device=device, dtype=dtype)
        setting = ModelSetting("demo (random LLaVA, 8-layer 512-wide Llama)", 8, 4, 8, 4, 576, 0)
    elif kind == "tiny":
        from ..testing import tiny_llava

        model = tiny_llava(num_layers=decoder_layers).to(device=device, dtype=dtype)
        n = model.config.vision_config.image_size // model.config.vision_config.patch_size
        layers = model.config.vision_config.num_hidden_layers
        setting = ModelSetting("tiny (test model)", decoder_layers, layers, decoder_layers, layers, n * n, 0)
    elif kind == "7b":
        for name, value, real in (("--decoder-layers", decoder_layers, REAL_DECODER_LAYERS),
                                  ("--vision-layers", vision_layers, REAL_VISION_LAYERS)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= real:
                raise ValueError(f"{name} must be an integer in 1..{real} for the 7b model; got {value!r}")
        config = llava_7b_config(decoder_layers, vision_layers)
        model = _on_device(lambda: LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa",
                                                                              dtype=dtype), device)
        real = decoder_layers == REAL_DECODER_LAYERS and vision_layers == REAL_VISION_LAYERS
        name = ("LLaVA-1.5-7B shapes, all 32 decoder and 24 vision layers" if real else
                f"LLaVA-1.5-7B widths, {decoder_layers} of 32 decoder layers, {vision_layers} of 24 vision layers")
        setting = ModelSetting(name, decoder_layers, vision_layers, REAL_DECODER_LAYERS, REAL_VISION_LAYERS, 576, 0)
    else:
        raise ValueError(f"--model must be one of 7b, demo, tiny; got {kind!r}")
    return model.eval(), setting


def model_inputs(model, *, batch: int = 1, system: int = 35, question: int = 30, seed: int = 0):
    """``batch`` copies of one LLaVA-1.5-style prompt (a system prefix, the image tokens, a question), each with
    its own random image: every sequence has the same length, so the attention mask is all ones."""
    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    image_id = cfg.image_token_id
    g = torch.Generator().manual_seed(seed)
    vocab = min(cfg.text_config.vocab_size, image_id) - 10
    ids = torch.cat([torch.tensor([1]), torch.randint(10, vocab, (system,), generator=g),
                     torch.full((side * side,), image_id), torch.randint(10, vocab, (question,), generator=g)])
    param = next(model.parameters())
    size = cfg.vision_config.image_size
    pixel = torch.randn(batch, 3, size, size, generator=g)
    return {
        "input_ids": ids[None].expand(batch, -1).contiguous().to(param.device),
        "attention_mask": torch.ones(batch, ids.numel(), dtype=torch.long, device=param.device),
        "pixel_values": pixel.to(device=param.device, dtype=param.dtype),
    }


def _layers(model):
    inner = model.model
    tower = getattr(inner.vision_tower, "vision_model", inner.vision_tower)
    return list(inner.language_model.layers), list(tower.encoder.layers)


@dataclass
class ModelRow:
    model: str
    method: str
    #: the budget T given to the method (counted as ``budget_meaning`` says); None: unpruned
    keep_tokens: int | None
    tokens_layer_average: float | None
    budget_meaning: str = "nominal"
    batch: int = 1
    prefill_ms: float | None = None
    prefill_ms_scaled: float | None = None
    decode_ms: float | None = None
    decode_ms_scaled: float | None = None
    peak_mib: float | None = None
    flops: int | None = None
    flops_scaled: int | None = None
    #: the unpruned model's scaled prefill, measured alternately with this row's (speed-up = its ratio)
    baseline_ms_scaled: float | None = None
    speedup: float | None = None
    ideal_speedup: float | None = None
    efficiency: float | None = None
    error: str | None = None


def _unpatched(model):
    """A context in which the model runs unpruned (prunekit's hooks stay, switched off)."""
    import prunekit

    return prunekit.disabled(model) if prunekit.is_patched(model) else contextlib.nullcontext()


class _DepthScaler:
    """Times calls and counts their FLOPs, scaling what runs inside decoder and vision-encoder layers from the
    layers the model has to the real depth: ``scaled = measured + (real/used - 1) * inside layers``.

    Layers are clocked only where they are scaled: a clock synchronises the device at every layer boundary,
    which on a GPU would stall the host's launches and add time that an unhooked forward does not spend. At the
    real depth (factor 0) nothing is hooked, and measured = scaled."""

    def __init__(self, model, setting: ModelSetting, device) -> None:
        dec_layers, vis_layers = _layers(model)
        self.model = model
        self.device = device
        self.dec_scale = setting.real_decoder_layers / setting.decoder_layers - 1
        self.vis_scale = setting.real_vision_layers / setting.vision_layers - 1
        self.dec = LayerClock(dec_layers if self.dec_scale else [], device)
        self.vis = LayerClock(vis_layers if self.vis_scale else [], device)
        # the flop counter names modules by path; match the layers by their path suffix
        dec_names = tuple(f"language_model.layers.{i}" for i in range(len(dec_layers)))
        vis_names = tuple(f"encoder.layers.{i}" for i in range(len(vis_layers)))
        self.groups = {"decoder_layers": lambda m: m.endswith(dec_names),
                       "vision_layers": lambda m: m.endswith(vis_names)}

    def __enter__(self) -> "_DepthScaler":
        return self

    def __exit__(self, *exc) -> None:
        self.dec.remove()
        self.vis.remove()

    def time(self, *fns: Callable[[], Any]) -> tuple[float, float, float]:
        """Milliseconds of ``fns`` run one after the other: measured, scaled, and inside decoder layers (0 where
        the decoder is not scaled)."""
        self.dec.reset(), self.vis.reset()
        t = sum(_timed(fn, self.device) for fn in fns)
        return t, t + self.dec_scale * self.dec.total + self.vis_scale * self.vis.total, self.dec.total

    def flops(self, *fns: Callable[[], Any]) -> tuple[int, int]:
        """Exact FLOPs of ``fns`` together: measured and scaled. Counted with eager attention, which computes the
        same products as sdpa: torch's counter has no formula for the CPU sdpa kernel and would leave attention out."""
        before = self.model.config._attn_implementation
        self.model.set_attn_implementation("eager")
        try:
            counts = [count_flops(fn, self.groups) for fn in fns]
        finally:
            self.model.set_attn_implementation(before)
        total = sum(c["total"] for c in counts)
        inside = sum(self.dec_scale * c["decoder_layers"] + self.vis_scale * c["vision_layers"] for c in counts)
        return total, int(total + inside)


def _measure(model, inputs, setting: ModelSetting, *, repeats: int, new_tokens: int, device,
             memory: bool = True) -> dict:
    """Prefill (alternating with the unpruned model, so that drift of the machine cancels in their ratio),
    decode (``new_tokens`` > 1), peak memory (``memory``) and FLOPs of the model as it is patched now."""
    with _DepthScaler(model, setting, device) as depth, torch.no_grad():
        prefill = lambda: model(**inputs, logits_to_keep=1)  # noqa: E731
        prefill()  # warm-up
        times, scaled, in_layers, baseline = [], [], [], []
        for _ in range(repeats):
            with _unpatched(model):
                baseline.append(depth.time(prefill)[1])
            t, ts, layers = depth.time(prefill)
            times.append(t)
            scaled.append(ts)
            in_layers.append(layers)
        decode = decode_scaled = None
        if new_tokens > 1:
            clock = _StepClock(device)
            generate = lambda n: model.generate(  # noqa: E731
                **inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                logits_processor=[clock])
            _, _, layers = depth.time(lambda: generate(new_tokens))
            decode = clock.step_ms()
            # decoder-layer time of the decode steps: generate(n)'s minus one prefill's
            decode_layers = max(0.0, layers - statistics.median(in_layers)) / (new_tokens - 1)
            decode_scaled = decode + depth.dec_scale * decode_layers
        peak = peak_memory_mib(prefill, torch.device(device)) if memory else None
        flops, flops_scaled = depth.flops(prefill)
    return {
        "prefill_ms": statistics.median(times),
        "prefill_ms_scaled": statistics.median(scaled),
        "baseline_ms_scaled": statistics.median(baseline),
        "decode_ms": decode,
        "decode_ms_scaled": decode_scaled,
        "peak_mib": peak,
        "flops": flops,
        "flops_scaled": flops_scaled,
    }


def _oracle(model, inputs, setting: ModelSetting, keep: int, *, repeats: int, device) -> dict:
    """The unpatched model with only ``keep`` visual tokens in every layer: the vision tower and projector on
    the whole images, then the language model on prompts whose image part is ``keep`` tokens long. The best a
    pruning method that keeps ``keep`` tokens from the first layer can do on this hardware."""
    batch, length = int(inputs["input_ids"].shape[0]), int(inputs["input_ids"].shape[1])
    length += keep - setting.visual_tokens
    width = model.config.text_config.hidden_size
    dtype = next(model.parameters()).dtype
    embeds = torch.randn(batch, length, width, generator=torch.Generator().manual_seed(0)).to(device=device,
                                                                                              dtype=dtype)
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    prefill = lambda: model(**inputs, logits_to_keep=1)  # noqa: E731
    image = lambda: model.model.get_image_features(inputs["pixel_values"])  # noqa: E731
    text = lambda: model(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=1)  # noqa: E731
    with _DepthScaler(model, setting, device) as depth, torch.no_grad():
        image(), text()  # warm-up
        measured, scaled, baseline = [], [], []
        for _ in range(repeats):
            baseline.append(depth.time(prefill)[1])
            t, ts, _ = depth.time(image, text)
            measured.append(t)
            scaled.append(ts)
        flops, flops_scaled = depth.flops(image, text)
    return {"prefill_ms": statistics.median(measured), "prefill_ms_scaled": statistics.median(scaled),
            "baseline_ms_scaled": statistics.median(baseline), "flops": flops, "flops_scaled": flops_scaled}


def model_benchmark(
    kind: str = "7b",
    methods: Sequence[str] = DEFAULT_METHODS,
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    *,
    decoder_layers: int = 4,
    vision_layers: int = 2,
    batch: int | Sequence[int] = 1,
    repeats: int = 3,
    new_tokens: int = 8,
    memory: bool = True,
    oracle: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    budget_meaning: str = "nominal",
    progress: bool = True,
    rows: list | None = None,
) -> tuple[ModelSetting, list[ModelRow]]:
    """Unpruned, the oracle (``oracle``) and every (method, budget) on one model, at each batch size; a budget a
    method cannot reach is a row with ``error``. ``budget_meaning``: what each method's budget T counts (see
    :class:`prunekit.config.BudgetConfig`). ``rows``: a list the rows are appended to as they are measured."""
    import prunekit

    device = torch.device(device)
    batches = _check_batches([batch] if isinstance(batch, int) else batch)
    model, setting = build_model(kind, decoder_layers=decoder_layers, vision_layers=vision_layers, dtype=dtype,
                                 device=device)
    setting.prompt_tokens = int(model_inputs(model)["input_ids"].shape[1])
    runs = ([("unpruned", None)] + ([("oracle", t) for t in budgets] if oracle else [])
            + [(m, t) for m in methods for t in budgets])
    rows = [] if rows is None else rows
    try:
        for b in batches:
            inputs = model_inputs(model, batch=b)
            base: ModelRow | None = None
            for method, budget in _progress(runs, f"model {kind}, batch {b}", progress):
                if method == "unpruned":
                    row = ModelRow(setting.name, "unpruned", None, float(setting.visual_tokens), batch=b)
                    row.__dict__.update(_measure(model, inputs, setting, repeats=repeats, new_tokens=new_tokens,
                                                 device=device, memory=memory))
                    base = row
                elif method == "oracle":
                    row = ModelRow(setting.name, "oracle", budget, float(budget), batch=b)
                    row.__dict__.update(_oracle(model, inputs, setting, budget, repeats=repeats, device=device))
                else:
                    try:  # a budget a method cannot reach raises at build or at the first forward (BudgetError)
                        prunekit.build(method, model, keep_tokens=budget, budget_meaning=budget_meaning)
                        try:
                            measured = _measure(model, inputs, setting, repeats=repeats, new_tokens=new_tokens,
                                                device=device, memory=memory)
                            report = prunekit.pruning_report(model)
                            avg = (statistics.mean(report.layer_average)
                                   if report is not None and report.layer_average else None)
                        finally:
                            prunekit.remove(model)
                    except (ValueError, RuntimeError) as err:
                        rows.append(ModelRow(setting.name, method, budget, None, budget_meaning, batch=b,
                                             error=str(err).splitlines()[0]))
                        _say(f"  {method} T={budget} batch={b}: not run: {rows[-1].error}", progress)
                        _free(device)
                        continue
                    row = ModelRow(setting.name, method, budget, avg, budget_meaning, batch=b)
                    row.__dict__.update(measured)
                if method != "unpruned":
                    assert base is not None
                    row.speedup = row.baseline_ms_scaled / row.prefill_ms_scaled
                    row.ideal_speedup = base.flops_scaled / row.flops_scaled
                    row.efficiency = row.speedup / row.ideal_speedup
                rows.append(row)
                _say(f"  {method}{'' if budget is None else f' T={budget}'} batch={b}: prefill "
                     f"{_fmt(row.prefill_ms, '.1f')} ms (scaled {row.prefill_ms_scaled:.1f}), layer-avg tokens "
                     f"{_fmt(row.tokens_layer_average)}, {row.flops_scaled / 1e12:.2f} TFLOPs scaled, speed-up "
                     f"{_fmt(row.speedup, '.2f')}", progress)
            del inputs
            _free(device)
    finally:
        del model
        _free(device)
    return setting, rows


def environment(device: str | torch.device) -> dict:
    import platform

    import transformers

    device = torch.device(device)
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "device": str(device), "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _scaling(selection: Sequence[SelectionRow], settings: Sequence[dict]) -> str:
    parts = []
    for s in settings:
        if (s["decoder_layers"], s["vision_layers"]) == (s["real_decoder_layers"], s["real_vision_layers"]):
            parts.append(f"{s['name']}: measured at full depth, not scaled")
        else:
            parts.append(f"{s['name']}: time and FLOPs inside vision-encoder and decoder layers scaled from "
                         f"{s['vision_layers']} and {s['decoder_layers']} layers to {s['real_vision_layers']} and "
                         f"{s['real_decoder_layers']}")
    for kind in dict.fromkeys(r.prefill for r in selection if r.prefill):
        parts.append(f"selection prefill: {PREFILL_LABELS[kind]}"
                     + (", one forward" if kind == "decoder" else ", one layer measured") +
                     f" over N + {PROMPT_TEXT_TOKENS} text tokens at the selection's batch")
    return "; ".join(parts)


def run(
    out: str | Path,
    *,
    parts: Sequence[str] = ("selection", "model"),
    models: Sequence[str] = ("7b", "demo"),
    methods: Sequence[str] = DEFAULT_METHODS,
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    sizes: Sequence[tuple[int, int]] = SELECTION_SIZES,
    dim: int = 4096,
    decoder_layers: int = 4,
    vision_layers: int = 2,
    batch: int | Sequence[int] = 1,
    repeats: int = 3,
    new_tokens: int = 8,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    prefill: str | bool = "auto",
    naive_up_to: int | None = None,
    max_similarity_mib: float | None = None,
    memory: bool = True,
    oracle: bool = True,
    budget_meaning: str = "nominal",
    progress: bool = True,
) -> dict:
    """Run the chosen parts, print the tables, write ``bench.json``, ``bench.md`` and the plots into ``out``.

    Interrupted (Ctrl-C, or ``timeout -s INT``), it writes what was measured so far, marked ``"interrupted"``."""
    allowed = {"selection", "model"}
    if not parts or set(parts) - allowed:
        raise ValueError(f"--parts must be a non-empty subset of {sorted(allowed)}; got {list(parts)}")
    batches = _check_batches([batch] if isinstance(batch, int) else batch)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"--repeats must be an integer >= 1; got {repeats!r}")
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"--new-tokens must be an integer >= 1 (1: no decode timing); got {new_tokens!r}")
    if "model" in parts and any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in budgets):
        raise ValueError(f"--budgets must be integers >= 1; got {list(budgets)}")
    if max_similarity_mib is not None and not max_similarity_mib >= 0:
        raise ValueError(f"--max-similarity-mib must be a number of MiB >= 0; got {max_similarity_mib!r}")
    if "selection" in parts:
        selection_prefill_kind(prefill, device, decoder_layers)  # an unknown choice fails before anything runs
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    selection: list[SelectionRow] = []
    model_rows: list[ModelRow] = []
    settings: list[dict] = []
    interrupted = None
    try:
        if "selection" in parts:
            selection_benchmark(sizes, dim=dim, batch=batches, repeats=repeats, prefill=prefill,
                                decoder_layers=decoder_layers, dtype=dtype, naive_up_to=naive_up_to,
                                max_similarity_mib=max_similarity_mib, device=device, progress=progress,
                                rows=selection)
        if "model" in parts:
            for kind in models:
                setting, _ = model_benchmark(kind, methods, budgets, decoder_layers=decoder_layers,
                                             vision_layers=vision_layers, batch=batches, repeats=repeats,
                                             new_tokens=new_tokens, memory=memory, oracle=oracle, device=device,
                                             dtype=dtype, budget_meaning=budget_meaning, progress=progress,
                                             rows=model_rows)
                settings.append(asdict(setting))
    except KeyboardInterrupt:
        interrupted = "interrupted: the rows are those measured before the interruption"
        print(f"\n{interrupted}", flush=True)
    targets = check_targets(selection, model_rows)
    result = {
        "environment": environment(device),
        "dtype": str(dtype).replace("torch.", ""),
        "batches": list(batches),
        "scaling": _scaling(selection, settings),
        "budget_meaning": budget_meaning,
        "models": settings,
        "selection": [asdict(r) for r in selection],
        "model": [asdict(r) for r in model_rows],
        "targets": targets,
    }
    if interrupted:
        result["interrupted"] = interrupted
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    text = tables(selection, model_rows, targets)
    (out / "bench.md").write_text((f"**{interrupted}**\n\n" if interrupted else "") + text + "\n")
    plots(selection, model_rows, out)
    print(text)
    return result
