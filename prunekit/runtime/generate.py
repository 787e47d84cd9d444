"""Options of ``generate`` that a pruned prompt cannot serve are refused before anything runs, naming the option.

prunekit prunes a prompt once, in its prefill, and maps every later step onto the shorter KV cache. A few
generation modes break that premise; each is refused with what to do instead (everything else, beams and
returned sequences and sampling and continued conversations included, works).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from .. import contracts as C
from ..errors import PruningError

#: option -> (refused when, why and what to do)
REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "use_cache": (
        lambda v: v is False,
        "re-runs the whole prompt at every step, so prunekit would select again each time with a longer question; "
        "keep the cache on (use_cache=True, the default)",
    ),
    "cache_implementation": (
        lambda v: v in ("static", "offloaded_static"),
        "keeps one slot per prompt position, but a pruned prompt leaves fewer tokens; use the default dynamic "
        "cache (leave cache_implementation unset)",
    ),
    "prefill_chunk_size": (
        lambda v: v is not None,
        "splits the prompt into chunks, but prunekit selects among all visual tokens of a prompt at once; "
        "leave prefill_chunk_size unset",
    ),
    "assistant_model": (
        lambda v: v is not None,
        "(assisted decoding) crops the cache by unpruned lengths; generate without it",
    ),
    "prompt_lookup_num_tokens": (
        lambda v: v is not None,
        "(assisted decoding) crops the cache by unpruned lengths; generate without it",
    ),
}


def _option(model: Any, kwargs: dict, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    return getattr(config, name, None)


def check_generate_options(model: Any, kwargs: dict, method: str) -> None:
    """Raise :class:`PruningError` for the first option in ``kwargs`` (or the generation config) prunekit refuses."""
    for name, (refused, why) in REFUSED.items():
        value = _option(model, kwargs, name)
        if refused(value):
            shown = type(value).__name__ if name == "assistant_model" else repr(value)
            raise PruningError(f"{method}: generate({name}={shown}) {why}")


class GenerateGuard:
    """Wraps ``model.generate`` (an instance attribute; removing it restores the class's method) to refuse the
    options in :data:`REFUSED` while the patch is enabled."""

    def __init__(self, model: Any, patch: Any) -> None:
        self.model = model
        model.__dict__["generate"] = _Guarded(getattr(model, "generate"), model, patch)

    def remove(self) -> None:
        self.model.__dict__.pop("generate", None)


class _Guarded:
    def __init__(self, original: Callable, model: Any, patch: Any) -> None:
        self.original, self.model, self.patch = original, model, patch
        functools.update_wrapper(self, original)

    def __call__(self, *args, **kwargs):
        if not self.patch.enabled:
            return self.original(*args, **kwargs)
        check_generate_options(self.model, kwargs, self.patch.method)
        args = list(args)
        prefix = _continued_prefix(self.patch, args, kwargs)
        out = self.original(*args, **kwargs)
        if prefix is None:
            return out
        if isinstance(out, torch.Tensor):
            return torch.cat([prefix, out], 1)
        out.sequences = torch.cat([prefix, out.sequences], 1)
        return out


def _continued_prefix(patch: Any, args: list, kwargs: dict):
    """Continuing a conversation on the cache of a pruned prompt: ``generate`` would take the cache's length (the
    pruned one) as the length of the conversation it holds, and feed part of it again. Hand it only the new tokens
    (the 2-D mask still spans the whole conversation, so no slicing happens) and return the held prefix, to be put
    back in front of the output."""
    cache = C.MODEL_CACHE.get(kwargs)
    gen = patch.generation_for(cache) if cache is not None else None
    ids = C.MODEL_INPUT_IDS.get(kwargs, args[0] if args else None)  # generate hands these on to the forward
    mask = C.MODEL_ATTENTION_MASK.get(kwargs)
    if gen is None or ids is None or (mask is not None and mask.shape[1] != ids.shape[1]):
        return None
    held = gen.orig_len + cache.get_seq_length() - gen.prefill_length
    if not 0 < held < ids.shape[1]:
        raise PruningError(
            f"{patch.method}: generate was given a pruned cache that holds {held} tokens of the conversation, "
            f"and input_ids of {ids.shape[1]} tokens; pass the whole conversation so far plus the new tokens"
        )
    if args:
        args[0] = ids[:, held:]
    else:
        C.MODEL_INPUT_IDS.set(kwargs, ids[:, held:])
    if mask is None:
        C.MODEL_ATTENTION_MASK.set(kwargs, torch.ones_like(ids))
    return ids[:, :held]
