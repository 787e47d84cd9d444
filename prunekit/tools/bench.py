"""``prunekit bench``: what pruning costs and saves, measured.

Two parts, both written to JSON and drawn as plots:

* **selection**: TOPS's selection alone at N = 576 / 2,880 / 10,816 visual tokens (K = 256 / 1,280 / 4,096), the
  incremental exact greedy against the naive loop that recomputes every coverage gain every step (the same exact
  gains, ``coverage_scorer="facility_location_naive"``), next to the unpruned prefill of a 7B-width decoder at
  that N (one decoder layer measured, times 32);
* **model**: prefill time (time to first token), decode time per token, peak memory and exact FLOPs (counted by
  ``torch.utils.flop_counter``), unpruned vs each method and budget, on a LLaVA with the real width of a 7B
  backbone (CLIP-L/14-336 width, Llama hidden 4096, 32 heads, MLP 11008) and fewer layers. Time and FLOPs spent
  inside vision-encoder layers and decoder layers are measured separately (module hooks) and scaled to the real
  depth (24 and 32 layers): ``scaled = measured + (real/used - 1) * in_layers``. Everything else (embeddings,
  projector, selection, lm head) is counted once, as measured.

Random weights throughout: the timings of a forward pass do not depend on what the weights are.

This module is the two benchmarks' measurement code (~500 lines, kept together: both share the model builders and
a run reads top to bottom); its clocks and counters are in :mod:`.measure`, its tables and plots in
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

from .bench_report import _fmt, check_targets, plots, tables
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


def _decoder_layer(dim: int, heads: int, mlp: int, device, dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=dim, intermediate_size=mlp, num_attention_heads=heads, num_key_value_heads=heads,
                      num_hidden_layers=1, max_position_embeddings=32768)
    cfg._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(cfg, layer_idx=0).to(device=device, dtype=dtype).eval()
    return layer, LlamaRotaryEmbedding(cfg).to(device)


def decoder_layer_prefill_ms(tokens: int, *, dim: int = 4096, heads: int = 32, mlp: int = 11008, repeats: int = 1,
                             device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """Median time of one causal 7B-width decoder layer over ``tokens`` tokens (sdpa attention)."""
    device = torch.device(device)
    layer, rotary = _decoder_layer(dim, heads, mlp, device, dtype)
    x = torch.randn(1, tokens, dim, device=device, dtype=dtype)
    pos = torch.arange(tokens, device=device)[None]
    emb = rotary(x, pos)
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            times.append(_timed(lambda: layer(x, attention_mask=None, position_ids=pos, position_embeddings=emb),
                                device))
    del layer, x
    return statistics.median(times)


@dataclass
class SelectionRow:
    n: int
    k: int
    dim: int
    batch: int
    device: str
    fast_ms: float
    naive_ms: float
    naive_extrapolated: bool
    identical: bool | None
    prefill_ms_32_layers: float | None = None
    speedup: float = field(init=False)
    fraction_of_prefill: float | None = field(init=False)

    def __post_init__(self) -> None:
        self.speedup = self.naive_ms / self.fast_ms
        self.fraction_of_prefill = None if not self.prefill_ms_32_layers else self.fast_ms / self.prefill_ms_32_layers


def selection_benchmark(
    sizes: Sequence[tuple[int, int]] = SELECTION_SIZES,
    *,
    dim: int = 4096,
    batch: int = 1,
    repeats: int = 3,
    full_naive_up_to: int = 1000,
    prefill: bool = True,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> list[SelectionRow]:
    """Time TOPS's selection (default config) against the naive loop.

    The naive loop is run in full up to ``full_naive_up_to`` tokens (and checked to select the same tokens);
    above, its per-step cost is constant (every step recomputes all N² terms), so it is timed for 4 and 44 steps
    (12 where that would take long) and extrapolated linearly to K steps (``naive_extrapolated``)."""
    import prunekit

    device = torch.device(device)
    rows = []
    for n, k in _progress(sizes, "selection", progress):
        feats, rel = clustered_features(n, dim, batch=batch, device=device)
        select = lambda kk, scorer: prunekit.select("tops", feats, rel, k=kk, coverage_scorer=scorer)  # noqa: E731
        select(min(k, 4), "facility_location")  # warm-up
        kept: dict[str, torch.Tensor] = {}
        keep = lambda scorer: kept.__setitem__(scorer, select(k, scorer))  # noqa: E731
        fast = statistics.median(_timed(lambda: keep("facility_location"), device) for _ in range(repeats))
        if n <= full_naive_up_to:
            naive, extrapolated = _timed(lambda: keep("facility_location_naive"), device), False
            identical = bool(torch.equal(kept["facility_location_naive"], kept["facility_location"]))
        else:  # a short and a longer prefix of the naive loop; their difference is the per-step cost
            a = 4
            ta = _timed(lambda: select(a, "facility_location_naive"), device)
            b = a + 8
            tb = _timed(lambda: select(b, "facility_location_naive"), device)
            per_step = max(tb - ta, 0.0) / (b - a)
            if per_step * 32 < 30_000:  # cheap enough: a longer prefix for a steadier estimate
                b = a + 40
                tb = _timed(lambda: select(b, "facility_location_naive"), device)
                per_step = max(tb - ta, 0.0) / (b - a)
            naive, extrapolated, identical = ta + (k - a) * per_step, True, None
        del feats, rel
        gc.collect()
        prefill_ms = None
        if prefill:
            prefill_ms = REAL_DECODER_LAYERS * decoder_layer_prefill_ms(n, dim=dim, device=device)
        row = SelectionRow(n, k, dim, batch, str(device), fast, naive, extrapolated, identical, prefill_ms)
        rows.append(row)
        _say(f"  selection N={n} K={k}: incremental {fast:.0f} ms, naive {naive:.0f} ms"
             f"{' (extrapolated)' if extrapolated else ''}", progress)
    return rows


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
    """``7b``: LLaVA-1.5-7B widths with fewer layers; ``demo``: the CLI demo model; ``tiny``: the test model."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if kind == "demo":
        from .demo import demo_model

        model = demo_model()
        setting = ModelSetting("demo (random LLaVA, 8-layer 512-wide Llama)", 8, 4, 8, 4, 576, 0)
    elif kind == "tiny":
        from ..testing import tiny_llava

        model = tiny_llava(num_layers=decoder_layers)
        n = model.config.vision_config.image_size // model.config.vision_config.patch_size
        layers = model.config.vision_config.num_hidden_layers
        setting = ModelSetting("tiny (test model)", decoder_layers, layers, decoder_layers, layers, n * n, 0)
    elif kind == "7b":
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=decoder_layers,
                           num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, pad_token_id=0,
                           max_position_embeddings=4096)
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000)
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)
        setting = ModelSetting(f"LLaVA-1.5-7B widths, {decoder_layers} of 32 decoder layers, {vision_layers} of 24 "
                               "vision layers", decoder_layers, vision_layers, REAL_DECODER_LAYERS,
                               REAL_VISION_LAYERS, 576, 0)
    else:
        raise ValueError(f"model must be one of '7b', 'demo', 'tiny'; got {kind!r}")
    return model.to(device).eval(), setting


def model_inputs(model, *, system: int = 35, question: int = 30, seed: int = 0):
    """One LLaVA-1.5-style prompt: a system prefix, the image tokens, a question."""
    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    image_id = cfg.image_token_id
    g = torch.Generator().manual_seed(seed)
    vocab = min(cfg.text_config.vocab_size, image_id) - 10
    ids = torch.cat([torch.tensor([1]), torch.randint(10, vocab, (system,), generator=g),
                     torch.full((side * side,), image_id), torch.randint(10, vocab, (question,), generator=g)])
    device = next(model.parameters()).device
    pixel = torch.randn(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=g)
    return {
        "input_ids": ids[None].to(device),
        "attention_mask": torch.ones(1, ids.numel(), dtype=torch.long, device=device),
        "pixel_values": pixel.to(device=device, dtype=next(model.parameters()).dtype),
    }


def _layers(model):
    inner = model.model
    tower = getattr(inner.vision_tower, "vision_model", inner.vision_tower)
    return list(inner.language_model.layers), list(tower.encoder.layers)


@dataclass
class ModelRow:
    model: str
    method: str
    keep_tokens: int | None
    tokens_layer_average: float | None
    budget_meaning: str = "nominal"
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
    layers the model has to the real depth: ``scaled = measured + (real/used - 1) * inside layers``."""

    def __init__(self, model, setting: ModelSetting, device) -> None:
        dec_layers, vis_layers = _layers(model)
        self.model = model
        self.device = device
        self.dec, self.vis = LayerClock(dec_layers, device), LayerClock(vis_layers, device)
        self.dec_scale = setting.real_decoder_layers / setting.decoder_layers - 1
        self.vis_scale = setting.real_vision_layers / setting.vision_layers - 1
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
        """Milliseconds of ``fns`` run one after the other: measured, scaled, and inside decoder layers."""
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


def _measure(model, inputs, setting: ModelSetting, *, repeats: int, new_tokens: int, device) -> dict:
    """Prefill (alternating with the unpruned model, so that drift of the machine cancels in their ratio),
    decode, peak memory and FLOPs of the model as it is patched now."""
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
        peak = peak_memory_mib(prefill, torch.device(device))
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
    the whole image, then the language model on a prompt whose image part is ``keep`` tokens long. The best a
    pruning method that keeps ``keep`` tokens from the first layer can do on this hardware."""
    length = int(inputs["input_ids"].shape[1]) - setting.visual_tokens + keep
    width = model.config.text_config.hidden_size
    dtype = next(model.parameters()).dtype
    embeds = torch.randn(1, length, width, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    mask = torch.ones(1, length, dtype=torch.long, device=device)
    prefill = lambda: model(**inputs, logits_to_keep=1)  # noqa: E731
    image = lambda: model.model.get_image_features(inputs["pixel_values"])  # noqa: E731
    text = lambda: model(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=1)  # noqa: E731
    with _DepthScaler(model, setting, device) as depth, torch.no_grad():
        image(), text()  # warm-up
        scaled, baseline = [], []
        for _ in range(repeats):
            baseline.append(depth.time(prefill)[1])
            scaled.append(depth.time(image, text)[1])
        flops, flops_scaled = depth.flops(image, text)
    return {"prefill_ms_scaled": statistics.median(scaled), "baseline_ms_scaled": statistics.median(baseline),
            "flops": flops, "flops_scaled": flops_scaled}


def model_benchmark(
    kind: str = "7b",
    methods: Sequence[str] = DEFAULT_METHODS,
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    *,
    decoder_layers: int = 4,
    vision_layers: int = 2,
    repeats: int = 3,
    new_tokens: int = 8,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    budget_meaning: str = "nominal",
    progress: bool = True,
) -> tuple[ModelSetting, list[ModelRow]]:
    """Unpruned and every (method, budget) on one model; a budget a method cannot reach is a row with ``error``.
    ``budget_meaning``: what each method's budget T counts (see :class:`prunekit.config.BudgetConfig`)."""
    import prunekit

    device = torch.device(device)
    model, setting = build_model(kind, decoder_layers=decoder_layers, vision_layers=vision_layers, dtype=dtype,
                                 device=device)
    inputs = model_inputs(model)
    setting.prompt_tokens = int(inputs["input_ids"].shape[1])
    runs = [("unpruned", None)] + [("oracle", t) for t in budgets] + [(m, t) for m in methods for t in budgets]
    rows: list[ModelRow] = []
    base: ModelRow | None = None
    for method, budget in _progress(runs, f"model {kind}", progress):
        if method == "unpruned":
            row = ModelRow(setting.name, "unpruned", None, float(setting.visual_tokens))
            row.__dict__.update(_measure(model, inputs, setting, repeats=repeats, new_tokens=new_tokens,
                                         device=device))
            base = row
        elif method == "oracle":
            row = ModelRow(setting.name, "oracle", budget, float(budget))
            row.__dict__.update(_oracle(model, inputs, setting, budget, repeats=repeats, device=device))
            assert base is not None
            row.speedup = row.baseline_ms_scaled / row.prefill_ms_scaled
            row.ideal_speedup = base.flops_scaled / row.flops_scaled
            row.efficiency = row.speedup / row.ideal_speedup
        else:
            try:  # a budget a method cannot reach raises at build or at the first forward (BudgetError)
                prunekit.build(method, model, keep_tokens=budget, budget_meaning=budget_meaning)
                try:
                    measured = _measure(model, inputs, setting, repeats=repeats, new_tokens=new_tokens,
                                        device=device)
                    report = prunekit.pruning_report(model)
                    avg = report.layer_average[0] if report is not None and report.layer_average else None
                finally:
                    prunekit.remove(model)
            except (ValueError, RuntimeError) as err:
                rows.append(ModelRow(setting.name, method, budget, None, budget_meaning,
                                     error=str(err).splitlines()[0]))
                _say(f"  {method} T={budget}: not run: {rows[-1].error}", progress)
                continue
            row = ModelRow(setting.name, method, budget, avg, budget_meaning)
            row.__dict__.update(measured)
            assert base is not None
            row.speedup = row.baseline_ms_scaled / row.prefill_ms_scaled
            row.ideal_speedup = base.flops_scaled / row.flops_scaled
            row.efficiency = row.speedup / row.ideal_speedup
        rows.append(row)
        _say(f"  {method}{'' if budget is None else f' T={budget}'}: prefill {_fmt(row.prefill_ms, '.0f')} ms "
             f"(scaled {row.prefill_ms_scaled:.0f}), {row.flops_scaled / 1e12:.2f} TFLOPs scaled", progress)
    del model
    gc.collect()
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
    repeats: int = 3,
    new_tokens: int = 8,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    prefill: bool = True,
    budget_meaning: str = "nominal",
    progress: bool = True,
) -> dict:
    """Run the chosen parts, print the tables, write ``bench.json``, ``bench.md`` and the plots into ``out``."""
    allowed = {"selection", "model"}
    if not parts or set(parts) - allowed:
        raise ValueError(f"parts must be a non-empty subset of {sorted(allowed)}; got {list(parts)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    selection = selection_benchmark(sizes, dim=dim, repeats=repeats, prefill=prefill, device=device,
                                    progress=progress) if "selection" in parts else []
    model_rows: list[ModelRow] = []
    settings = []
    if "model" in parts:
        for kind in models:
            setting, rows = model_benchmark(kind, methods, budgets, decoder_layers=decoder_layers,
                                            vision_layers=vision_layers, repeats=repeats, new_tokens=new_tokens,
                                            device=device, dtype=dtype, budget_meaning=budget_meaning,
                                            progress=progress)
            settings.append(asdict(setting))
            model_rows += rows
    targets = check_targets(selection, model_rows)
    result = {
        "environment": environment(device),
        "dtype": str(dtype).replace("torch.", ""),
        "scaling": "time and FLOPs inside vision-encoder and decoder layers are scaled from the layers used to "
                   f"{REAL_VISION_LAYERS} and {REAL_DECODER_LAYERS}; selection prefill = one decoder layer x 32",
        "budget_meaning": budget_meaning,
        "models": settings,
        "selection": [asdict(r) for r in selection],
        "model": [asdict(r) for r in model_rows],
        "targets": targets,
    }
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    text = tables(selection, model_rows, targets)
    (out / "bench.md").write_text(text + "\n")
    plots(selection, model_rows, out)
    print(text)
    return result
