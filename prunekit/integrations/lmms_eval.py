"""``lmms-eval --model prunekit``: any prunekit method on lmms-eval's benchmarks, with lmms-eval's own model wrappers.

lmms-eval (0.7 and later) loads out-of-tree models from the entry-point group ``lmms_eval.models``; prunekit registers
``prunekit`` there (``pyproject.toml``). The model is run by the wrapper lmms-eval itself ships for the checkpoint's
family (``llava_hf``, ``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``, ...), picked from ``config.model_type``, so prompts,
image processing and generation are exactly those of an unpruned ``--model llava_hf`` run; prunekit only patches the
loaded model::

    lmms-eval --model prunekit --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=tops,keep_tokens=64 \\
        --tasks pope,gqa --batch_size 1 --log_samples --output_path results/

``model_args`` holds the wrapper's own arguments (``pretrained``, ``device``, ``dtype``, ...) and prunekit's:
``method`` (a registered method, or ``none``) and any field of that method's config (``keep_tokens``, ``keep_ratio``,
``schedule=[128,32,16]``, ``positions``, ``budget_meaning``, ``budget_per``, ``preset``, method-specific fields). Without
``method``, the configuration saved with the checkpoint (:mod:`prunekit.saved`) applies, and without one the model
runs unpruned. Every request's pruning report (nominal budget, layer-averaged visual tokens, prefill FLOPs, per-stage
counts) goes into its sample record (``token_counts[0]["prunekit"]`` in the samples file), and their means into the
results file (``throughput``: ``avg_prunekit_*``). An unpruned run records the same fields (``method: "none"``):
its model carries a prunekit patch that stays disabled, which measures each prefill and prunes nothing.

Log-likelihood requests (multiple-choice tasks) go through the wrapper's own ``loglikelihood`` on the pruned
prefill (the wrapper's forward with ``labels`` is scored from the pruned logits, :class:`_LabelledForward`), and
count in the summary; a wrapper that has none fails the run saying so. Data parallel (``torchrun`` or
``accelerate launch``) runs as lmms-eval runs it; on CPUs, where lmms-eval's wrappers report a single process,
the process group's rank and size are used.

Failures are never answers: lmms-eval's chat wrappers turn an exception in ``generate`` into an empty answer and its
command line turns any exception into exit code 0, so an invalid option, a pruning error or any error in the
wrapper is raised as :class:`EvaluationAborted` (not an ``Exception``), which ends the run with exit code 1 and the
error's message.

One module (~420 lines) because every part of it is the one wrapper lmms-eval loads. This module is imported by
lmms-eval, never by ``import prunekit``; the classes lmms-eval loads are made on first use,
so importing it does not import lmms-eval.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import json
import os
from typing import Any

#: lmms-eval's wrappers per ``config.model_type``: (simple, chat) class paths; None where lmms-eval has none
WRAPPERS: dict[str, tuple[str | None, str | None]] = {
    "llava": ("lmms_eval.models.simple.llava_hf.LlavaHf", "lmms_eval.models.chat.llava_hf.LlavaHf"),
    "llava_next": ("lmms_eval.models.simple.llava_hf.LlavaHf", "lmms_eval.models.chat.llava_hf.LlavaHf"),
    "llava_onevision": ("lmms_eval.models.simple.llava_hf.LlavaHf", "lmms_eval.models.chat.llava_hf.LlavaHf"),
    "qwen2_vl": ("lmms_eval.models.simple.qwen2_vl.Qwen2_VL", None),
    "qwen2_5_vl": ("lmms_eval.models.simple.qwen2_5_vl.Qwen2_5_VL", "lmms_eval.models.chat.qwen2_5_vl.Qwen2_5_VL"),
    "qwen3_vl": ("lmms_eval.models.simple.qwen3_vl.Qwen3_VL", "lmms_eval.models.chat.qwen3_vl.Qwen3_VL"),
    "internvl": (None, "lmms_eval.models.chat.internvl_hf.InternVLHf"),
    "gemma3": ("lmms_eval.models.simple.gemma3.Gemma3", None),
    "video_llava": ("lmms_eval.models.simple.video_llava.VideoLLaVA", None),
}

#: ``method=none`` evaluates the unpruned model even when the checkpoint carries a saved configuration
NO_METHOD = "none"


class EvaluationAborted(BaseException):
    """A pruning run that cannot go on (its ``__cause__`` is prunekit's error). A ``BaseException``, so that neither
    a wrapper's ``except Exception`` (an empty answer) nor lmms-eval's command line (exit code 0) swallows it."""


def manifest():
    """The ``lmms_eval.models`` entry point: ``prunekit`` as a chat model, and a simple one with ``--force_simple``
    (each uses lmms-eval's wrapper of that kind for the checkpoint's family, or the other kind where it has one only)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="prunekit", simple_class_path=f"{__name__}.Prunekit",
                         chat_class_path=f"{__name__}.PrunekitChat")


def load(*, chat: bool = True, **model_args: Any):
    """The lmms-eval model for ``model_args`` (the parsed ``--model_args`` plus lmms-eval's ``batch_size`` and
    ``device``): an instance of lmms-eval's own wrapper class for the checkpoint, with prunekit's pruning applied."""
    import prunekit
    from prunekit.saved import read_block
    from transformers import AutoConfig

    pretrained = model_args.get("pretrained")
    if not pretrained:
        raise ValueError("model_args needs pretrained=<model id or folder>")
    config = AutoConfig.from_pretrained(pretrained, revision=model_args.get("revision", "main"))
    wrapper = _wrapper_class(config.model_type, chat)
    params = inspect.signature(wrapper.__init__).parameters
    wrapper_names = {n for n, p in params.items() if n != "self" and p.kind is not p.VAR_KEYWORD}

    method = model_args.pop("method", None)
    saved = read_block(config)
    options: dict[str, Any] = {}
    if method is None and saved is not None:
        method, options = saved["method"], dict(saved.get("options", {}))
    elif method == NO_METHOD:
        method = None
    fields = set(prunekit.get_method(method).Config.model_fields) if method else set()
    for key in [k for k in model_args if k in fields]:
        options[key] = _parse_option(model_args.pop(key))
    unknown = sorted(set(model_args) - wrapper_names)
    if unknown:
        pruning = {f for m in prunekit.list_methods() for f in prunekit.get_method(m).Config.model_fields}
        if method is None and set(unknown) & pruning:
            raise ValueError(f"{', '.join(sorted(set(unknown) & pruning))}: pruning options need method=<one of "
                             f"{', '.join(prunekit.list_methods())}>")
        raise ValueError(
            f"unknown model_args {', '.join(unknown)}: {wrapper.__module__}.{wrapper.__name__} takes "
            f"{', '.join(sorted(wrapper_names))}" + (f"; method {method!r} takes {', '.join(sorted(fields))}" if method else "")
        )
    if method is not None:
        prunekit.make_config(method, **options)  # an invalid option fails here, before the weights are loaded
    device_map = params.get("device_map")
    device = str(model_args.get("device", params["device"].default if "device" in params else "cuda"))
    if device_map is not None and "device_map" not in model_args:
        single = int(os.environ.get("WORLD_SIZE", "1")) == 1
        if (device_map.default == "" and single) or (device.startswith("cpu") and device_map.default != device):
            # llava_hf's default device_map="" (meant for data parallel) is refused by transformers 5 on one process;
            # the wrappers' defaults ("auto", "cuda", and "" under data parallel) put the model or its inputs on GPUs
            model_args["device_map"] = device
    lm = _pruning_class(wrapper)(**model_args)
    lm._prunekit_start(method, options)
    return lm


def _wrapper_class(model_type: str, chat: bool) -> type:
    if model_type not in WRAPPERS:
        raise ValueError(f"lmms-eval --model prunekit has no lmms-eval wrapper for model_type {model_type!r}; "
                         f"supported: {', '.join(sorted(WRAPPERS))}")
    simple, chat_path = WRAPPERS[model_type]
    path = (chat_path or simple) if chat else (simple or chat_path)
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _parse_option(value: Any) -> Any:
    """A ``model_args`` value for a config field: lists come as ``[a,b]`` (JSON, or bare words)."""
    if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            from lmms_eval.utils import handle_arg_string

            return [handle_arg_string(v.strip().strip("'\"")) for v in value[1:-1].split(",") if v.strip()]
    return value


#: the method a run without pruning is patched with, always disabled, so that its reports give the unpruned visual
#: tokens and prefill FLOPs (``random`` before the LLM needs nothing of a model: no [CLS] token, no text)
MEASURE = ("random", {"keep_ratio": 0.5})


class PruningWrapper:
    """Mixed into lmms-eval's wrapper class: patches its model, records each request's pruning, and lets no error
    become an answer."""

    def _prunekit_start(self, method: str | None, options: dict) -> None:
        import prunekit
        from loguru import logger

        self._prunekit_method, self._prunekit_options, self._prunekit_records = method, options, []
        self._prunekit_model = model = self.model
        self._prunekit_measuring = False
        if method is not None:
            try:
                prunekit.build(method, model, **options)
            except Exception as err:
                raise EvaluationAborted(f"prunekit.build({method!r}, {type(model).__name__}, {options}): {err}") from err
        else:
            try:  # unpruned: a patch that stays disabled measures what each prefill costs
                prunekit.build(MEASURE[0], model, **MEASURE[1])
                self._prunekit_measuring = True
            except Exception as err:
                logger.warning(f"prunekit: the unpruned run records no visual tokens or FLOPs ({err})")
        original = model.generate

        def generate(*args, **kwargs):
            try:
                return original(*args, **kwargs)
            except Exception as err:
                raise EvaluationAborted(f"generate failed with {type(err).__name__}: {err}") from err

        model.generate = generate  # an instance attribute: the class's generate stays as it was

    @property
    def _prunekit_wrapper(self) -> str:
        base = next(c for c in type(self).__mro__[1:] if c is not PruningWrapper)
        return f"{base.__module__}.{base.__name__}"

    def _prunekit_one(self, kind: str, request):
        """``(result, record)``: lmms-eval's wrapper's answer to one request, and the pruning report of its prefill
        (None where it held no visual tokens)."""
        import prunekit

        model = self._prunekit_model
        patched = self._prunekit_method is not None or self._prunekit_measuring
        before = prunekit.pruning_report(model) if patched else None
        try:
            with prunekit.disabled(model) if self._prunekit_measuring else contextlib.nullcontext():
                (result,) = getattr(super(), kind)([request])
        except NotImplementedError as err:
            raise EvaluationAborted(f"{self._prunekit_wrapper} (lmms-eval's wrapper for this model) has no {kind}: "
                                    f"{err}; tasks whose output_type needs it cannot run on this model") from err
        except Exception as err:  # lmms-eval's command line would log it and exit with code 0
            raise EvaluationAborted(f"{self._prunekit_wrapper}.{kind} failed with {type(err).__name__}: {err}") from err
        report = prunekit.pruning_report(model) if patched else None
        if report is None or report is before:  # no prefill with visual tokens in this request
            return result, None
        record = _record(report)
        if self._prunekit_measuring:
            record.update(method=NO_METHOD, budget=None, budget_meaning=None)
        record["task"] = request.task_name
        self._prunekit_records.append(record)
        return result, record

    def generate_until(self, requests):
        # one request per call, so that each answer is paired with the report of its own prefill (lmms-eval's HF
        # wrappers run llava at batch size 1 anyway; in-LLM pruning needs equal kept lengths across a batch)
        types = _lmms_types()
        out = []
        for request in requests:
            result, record = self._prunekit_one("generate_until", request)
            if record is None:
                out.append(result)
                continue
            text, counts = (result.text, result.token_counts) if isinstance(result, types.GenerationResult) else (result, None)
            fields = dataclasses.asdict(counts) if counts is not None else {}
            out.append(types.GenerationResult(text=text, token_counts=types.PruningTokenCounts(**fields, prunekit=record)))
        return out

    def loglikelihood(self, requests):
        """Each request's log-likelihood from lmms-eval's wrapper, on the pruned prefill. The wrapper's forward with
        ``labels`` (which prunekit refuses: the logits of a pruned sequence are shorter than its labels) goes through
        :class:`_LabelledForward`. Its pruning report counts in the results file's summary; lmms-eval keeps no
        per-sample record for these requests."""
        out = []
        self._prunekit_labelled = True
        try:
            for request in requests:
                out.append(self._prunekit_one("loglikelihood", request)[0])
        finally:
            self._prunekit_labelled = False
        return out

    @property
    def rank(self):
        return self._prunekit_ranks()[0]

    @property
    def world_size(self):
        return self._prunekit_ranks()[1]

    def _prunekit_ranks(self) -> tuple[int, int]:
        """lmms-eval's wrappers take data parallel for GPUs only: given a device_map (data parallel on CPUs, each
        process holding its own copy), they report one process. The process group's rank and size then apply."""
        rank, size = super().rank, super().world_size
        accelerator = getattr(self, "accelerator", None)
        if size == 1 and accelerator is not None and accelerator.num_processes > 1:
            return accelerator.process_index, accelerator.num_processes
        return rank, size

    @property
    def model(self):
        model = super().model
        if getattr(self, "_prunekit_labelled", False) and self._prunekit_method is not None:
            return _LabelledForward(model)
        return model

    def clean(self):
        self._prunekit_summarise()
        super().clean()

    def _prunekit_summarise(self) -> None:
        """The means of the recorded reports over every rank's requests, into lmms-eval's results file (its
        ``throughput`` block shows each as ``avg_<name>``)."""
        import torch.distributed as dist
        from lmms_eval.models.model_utils.gen_metrics import log_metrics
        from loguru import logger

        records = self._prunekit_records
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, records)
            records = [r for rank in gathered for r in rank]
        if not records:
            return

        def mean(key: str) -> float | None:
            values = [r[key] for r in records if r.get(key) is not None]
            return sum(values) / len(values) if values else None

        summary = {f"prunekit_{k}": mean(k) for k in ("budget", "visual_tokens", "layer_average", "prefill_flops",
                                                       "prefill_flops_unpruned")}
        flops, full = summary["prunekit_prefill_flops"], summary["prunekit_prefill_flops_unpruned"]
        summary["prunekit_prefill_flops_percent"] = 100 * flops / full if flops is not None and full else None
        summary["prunekit_requests"] = len(records)
        summary = {k: v for k, v in summary.items() if v is not None}
        logger.info(f"prunekit {self._prunekit_method or NO_METHOD} {self._prunekit_options} in {self._prunekit_wrapper}: "
                    f"{summary}")
        log_metrics(total_elapsed_time=0.0, total_gen_tokens=0, avg_speed=0.0, additional_metrics=summary)


def _record(report) -> dict:
    """One request's report (``PruningReport.as_dict``) with its per-sample lists reduced to the one sample."""
    d = report.as_dict()
    one = len(d["visual_tokens"]) == 1

    def first(values):
        return values[0] if one else values

    return {
        "method": d["method"], "enabled": d["enabled"], "budget": first(d["budget"]) if d["budget"] else None,
        "budget_meaning": d["budget_meaning"], "visual_tokens": first(d["visual_tokens"]),
        "layer_average": first(d["layer_average"]), "prefill_flops": first(d["prefill_flops"]),
        "prefill_flops_unpruned": first(d["prefill_flops_unpruned"]),
        "stages": [{**s, "kept": first(s["kept"]), "merged": first(s["merged"])} for s in d["stages"]],
    }


class _LabelledForward:
    """The model as a wrapper's ``loglikelihood`` calls it (``model(**inputs, labels=labels)``), pruned: the forward
    runs without ``labels``; the loss is computed on the continuation (the labelled tokens, which end the prompt and
    follow every visual token) from the returned logits, whose last rows belong to the last tokens whatever was
    pruned before them; the logits come back at the prompt's full length, the kept rows aligned to the end (rows of
    pruned positions are zeros). Everything else is the model's."""

    def __init__(self, model) -> None:
        self.__dict__["_model"] = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, *args, labels=None, **kwargs):
        import torch
        import torch.nn.functional as F

        out = self._model(*args, **kwargs)
        if labels is None:
            return out
        logits, ids = out.logits, kwargs["input_ids"]
        if labels.shape[0] != 1:
            raise ValueError(f"loglikelihood with pruning runs one request at a time, got a batch of {labels.shape[0]}")
        labelled = (labels[0] != -100).nonzero().flatten()
        n, length, kept = int(labelled.numel()), ids.shape[1], logits.shape[1]
        if n == 0 or labelled.tolist() != list(range(length - n, length)):
            raise ValueError("loglikelihood with pruning needs the labelled tokens (the continuation) to end the prompt")
        visual = [getattr(self._model.config, k, None) for k in ("image_token_id", "image_token_index",
                                                                  "video_token_id", "video_token_index")]
        if torch.isin(ids[0, length - n - 1:], torch.tensor([v for v in visual if v is not None], device=ids.device)).any():
            raise ValueError("loglikelihood with pruning needs text between the visual tokens and the continuation")
        out.loss = F.cross_entropy(logits[0, kept - n - 1:kept - 1].float(), labels[0, length - n:])
        full = logits.new_zeros((logits.shape[0], length, logits.shape[2]))
        full[:, length - kept:] = logits
        out.logits = full
        return out


@functools.cache
def _pruning_class(wrapper: type) -> type:
    return type(f"Prunekit{wrapper.__name__}", (PruningWrapper, wrapper), {"__module__": __name__})


@functools.cache
def _lmms_types():
    """lmms-eval's result types, and a ``TokenCounts`` that also carries the request's pruning record."""
    import types

    from lmms_eval.api.instance import GenerationResult, TokenCounts

    @dataclasses.dataclass
    class PruningTokenCounts(TokenCounts):
        prunekit: dict | None = None

        def to_dict(self):
            return {**super().to_dict(), "prunekit": self.prunekit}

    return types.SimpleNamespace(GenerationResult=GenerationResult, PruningTokenCounts=PruningTokenCounts)


@functools.cache
def _entry_classes() -> dict[str, type]:
    """The classes lmms-eval's registry loads: they only dispatch, ``create_from_arg_string`` returning an instance
    of the family's own wrapper (lmms-eval reads simple or chat from that instance)."""
    from lmms_eval.api.model import lmms
    from lmms_eval.utils import simple_parse_args_string

    class Prunekit(lmms):
        """``--model prunekit`` (simple): see :mod:`prunekit.integrations.lmms_eval`."""

        is_simple = True

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
            args = simple_parse_args_string(arg_string)
            args.update({k: v for k, v in (additional_config or {}).items() if v is not None})
            try:
                return load(chat=not cls.is_simple, **args)
            except Exception as err:  # lmms-eval's command line would log it and exit with code 0
                raise EvaluationAborted(f"lmms-eval --model prunekit: {type(err).__name__}: {err}") from err

    class PrunekitChat(Prunekit):
        """``--model prunekit`` (chat): see :mod:`prunekit.integrations.lmms_eval`."""

        is_simple = False

    for cls in (Prunekit, PrunekitChat):
        cls.__module__ = __name__
    return {"Prunekit": Prunekit, "PrunekitChat": PrunekitChat}


def __getattr__(name: str):
    if name in ("Prunekit", "PrunekitChat"):
        return _entry_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["WRAPPERS", "NO_METHOD", "EvaluationAborted", "manifest", "load", "PruningWrapper"]
