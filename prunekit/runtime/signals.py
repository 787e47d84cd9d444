"""The signals the runtime computes itself: at the language model's input (the instruction's embeddings and
their similarity to the visual tokens) and between two decoder layers (attention of raters, keys, states,
positions, layer inputs), for the rows a stage needs only. Vision-encoder signals are the adapter's
(:meth:`ModelHooks.projector_signal`)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import contracts as C
from ..errors import PruningError
from ..ops import batch_of, true_indices
from .attention import RATER_RULES, attention_rows, attention_rows_batch, cached_keys, rows_of, select_raters
from .hooks import ModelHooks
from .sequence import Call, rows_of_samples

__all__ = ["LAYER_SIGNALS", "PROMPT_TEXT_SIGNALS", "text_after", "instruction_counts", "instruction", "text_similarity", "pre_llm_signal", "layer_signal", "layer_input",
           "layer_keys"]


def text_after(vis_pos: list[Tensor], valid: Tensor) -> list[Tensor]:
    """Per sample, the positions of the (non-pad) text tokens after its last visual token: its instruction
    (``vis_pos[b]``: its visual tokens' positions, ``valid`` ``[B, L]``: its non-pad tokens). Their counts decide
    the signals' shapes, so they are read from the device: once for the batch (:func:`instruction` reads them
    once per prefill where it can)."""
    after, _ = _after_last(vis_pos, valid)
    return true_indices(after, after.sum(1).tolist())

def _after_last(vis_pos: list[Tensor], valid: Tensor) -> tuple[Tensor, Tensor]:
    """``[B, L]``: where the non-pad tokens after each sample's last visual token are; and ``[B]`` its last
    visual token's position (-1 without visual tokens)."""
    positions = torch.arange(valid.shape[1], device=valid.device)
    none = lambda: positions.new_full((), -1)  # noqa: E731  (a sample without visual tokens: all its text)
    last = batch_of(v.max().to(valid.device) if v.numel() else none() for v in vis_pos)
    return (positions > last[:, None]) & valid, last

#: the signals before the language model that read the instruction
PROMPT_TEXT_SIGNALS = frozenset({"text_embeddings", "text_similarity"})

def instruction_counts(visual: Tensor, valid: Tensor | None) -> list[Tensor]:
    """``[B]`` each: how many (non-pad) tokens follow each sample's last visual token, its last visual token's
    position minus its first's (``count - 1`` when they are one block), and how many positions follow its last
    visual token (the first count when they are all text: the instruction ends the row), from the visual mask
    ``[B, L]`` and the non-pad one, on the device: for the prefill's one read (they size the instruction,
    :func:`instruction`)."""
    L = visual.shape[1]
    positions = torch.arange(L, device=visual.device)
    last = torch.where(visual, positions, -1).amax(1)
    first = torch.where(visual, positions, L).amin(1)
    after = positions > last[:, None]
    if valid is not None:
        after = after & valid
    return [after.sum(1), last - first, (L - 1) - last]

def instruction(call: Call, vis_pos: list[Tensor], valid: Tensor) -> list[Tensor]:
    """:func:`text_after` of one state of the call's sequence, computed once: each text signal of a stage needs
    it. A state is known by its objects (the runtime replaces ``vis_pos`` and ``valid`` when the sequence changes,
    never changes them in place).

    Where every sample's visual tokens are one block (one image, or frames without text between them), pruning
    removes rows inside the blocks only, so the text after a sample's last visual token stays the same while it
    keeps one: the call's current state (``call.vis_pos``; the states a call reads are its current one and its
    first) takes the counts the prefill read with its own (:func:`instruction_counts`, ``call.instruction_counts``)
    without reading the device; where every row also ends with its instruction (``call.instruction_tail``: no
    padding after it), the instruction is each row's last positions, and :func:`ends_rows` says so to the signals
    that can slice rather than gather them. Otherwise they are read here (with, in the same read, whether the
    visual tokens have become blocks since), for each state."""
    for seen_pos, seen_valid, text, _ in call.instructions:
        if seen_pos is vis_pos and seen_valid is valid:
            return text
    known = call.instruction_counts
    current = known is not None and vis_pos is call.vis_pos and all(v.numel() for v in vis_pos)
    if current and call.instruction_tail:  # each row ends with its instruction: its last positions, no read
        L = valid.shape[1]
        ends = {c: torch.arange(L - c, L, device=valid.device) for c in set(known)}
        text = [ends[c] for c in known]
        call.instructions.append((vis_pos, valid, text, True))
        return text
    after, last = _after_last(vis_pos, valid)
    if current:
        counts = known
    else:
        # the positions ascend (each state's are kept in order), so a block spans its count
        first = batch_of(v[0].to(valid.device) if v.numel() else last[0] for v in vis_pos)
        counts, spans = torch.stack([after.sum(1), last - first]).tolist()
        if all(v.numel() and span == v.numel() - 1 for v, span in zip(vis_pos, spans)):
            call.instruction_counts = counts
    text = true_indices(after, counts)
    call.instructions.append((vis_pos, valid, text, False))
    return text


def ends_rows(call: Call, texts: list[Tensor]) -> bool:
    """Whether ``texts`` (from :func:`instruction`) are each sample's last positions (known on the host: a row
    that ends with its instruction), so that their rows can be taken as a slice rather than gathered."""
    return any(text is texts and tail for _, _, text, tail in call.instructions)

def normed_input(call: Call, layer, states: Tensor) -> Tensor:
    """``layer``'s input norm of ``states`` ``[B, L, D]``, computed once per call for each (layer, states): a stage's
    layer-input signals and its recomputed attention rows read the same normalised rows (the norm is row by row,
    so a row is the same taken from the whole as normalised alone)."""
    for seen_layer, seen_states, normed in call.normed:
        if seen_layer is layer and seen_states is states:
            return normed
    normed = C.INPUT_NORM.get(layer)(states)
    call.normed.append((layer, states, normed))
    return normed

def text_similarity(embeds: Tensor, vis: Tensor, valid: Tensor, text: Tensor) -> Tensor:
    """Mean cosine similarity of each visual token's LLM-input embedding to the instruction's embeddings
    (``text``: the text after the last visual token; all text when there is none after it)."""
    if text.numel() == 0:
        other = valid.clone()
        other[vis] = False
        text = other.nonzero().squeeze(1)
    if text.numel() == 0:
        raise PruningError("'text_similarity' needs text tokens in the prompt")
    v = torch.nn.functional.normalize(embeds[vis].float(), dim=-1)
    t = torch.nn.functional.normalize(embeds[text].float(), dim=-1)
    return (v @ t.T).mean(1)

def pre_llm_signal(hooks: ModelHooks, name: str, options: dict, n_visual: list[int], embeds: Tensor,
                   call: Call) -> list[Tensor]:
    """A signal at the language model's input (before the LLM; ``call``'s visual tokens and valid rows are the
    input's): the instruction's embeddings and their similarity to the visual tokens are read here; the rest
    (vision-encoder signals) come from the adapter's hooks."""
    if name in ("text_embeddings", "text_similarity"):
        vis_pos, valid = call.vis_pos, call.valid
        text = instruction(call, vis_pos, valid)
        if name == "text_embeddings":
            return [embeds[b, text[b]] for b in range(embeds.shape[0])]
        return [text_similarity(embeds[b], vis_pos[b], valid[b], text[b]) for b in range(embeds.shape[0])]
    return hooks.projector_signal(name, options, n_visual)

#: signals inside the decoder and the options each takes (value -> allowed values)
LAYER_SIGNALS = {
    "text_attention": {"raters": RATER_RULES, "layer": ("previous", "next"), "per_rater": (False, True)},
    "keys": {"tokens": ("visual", "text"), "rope": (False, True)},
    "states": {"tokens": ("visual", "text"), "final_norm": (False, True)},
    "positions": {"tokens": ("visual", "text")},
    "text_states": {},
    "layer_input": {"tokens": ("visual", "text"), "layer": ("first", "previous", "next"),
                    "input_norm": (False, True)},
}

def layer_signal(call: Call, lm, layers, layer, j: int, name: str, options: dict, hidden_out: Tensor) -> list[Tensor]:
    """A signal at the boundary between layer ``j`` (K-1) and ``j + 1`` (K, the first to see the pruned tokens).

    ``text_attention``: attention of the raters (``raters=last_token|all_text``) to the visual tokens, mean over
    heads, recomputed for the rater rows; by ``layer="previous"`` (K-1 on its input, as its forward computed it)
    or ``"next"`` (K on its input, before K runs); mean over the raters, or ``per_rater=True``: one column per
    rater, ``[n_visual, raters]`` (a method that picks raters by a rule of its own asks for all_text's columns).
    ``keys``: K-1's keys of the visual or text tokens (``rope=True``: after the rotary embedding, heads side by
    side). ``states``: K-1's output rows of the visual or text tokens (``final_norm=True``: through the language
    model's final norm). ``positions``: where the visual or text tokens sit in the sequence, counted from its
    first (non-padding) token. ``text_states``: K-1's output rows of the instruction. ``layer_input``: a
    decoder layer's input rows of the visual tokens present at that layer or of the instruction, for the whole
    prompt (never split per image): ``layer="first"`` (layer 0: the language model's input embeddings, with
    every visual token it received), ``"previous"`` (K-1) or ``"next"`` (K); ``input_norm=True``: through that
    layer's input norm."""
    allowed = LAYER_SIGNALS.get(name)
    if allowed is None:
        raise PruningError(
            f"signal {name!r} is not available inside the decoder (offered: {', '.join(LAYER_SIGNALS)})"
        )
    for key, value in options.items():
        if key in allowed and value not in allowed[key]:
            raise PruningError(f"signal {name!r}: {key} must be one of {list(allowed[key])}, got {value!r}")
    if name == "text_attention" and "raters" not in options:
        raise PruningError(f"signal 'text_attention' needs raters= one of {list(RATER_RULES)}")
    hidden_in, mask, pos_emb = call.captured[j]
    if name == "layer_input":
        return layer_input(call, layers, j, options, hidden_in, hidden_out)
    out = []
    needs_text = name in ("text_states", "text_attention") or options.get("tokens", "visual") == "text"
    texts = instruction(call, call.vis_pos, call.valid) if needs_text else None
    if name == "text_attention":
        batched = text_attention_batch(call, layers, layer, j, options, texts, hidden_in, hidden_out, mask, pos_emb)
        if batched is not None:
            return batched
    for b in range(hidden_in.shape[0]):
        vis = call.vis_pos[b]
        text = texts[b] if texts is not None else None
        rows = vis if options.get("tokens", "visual") == "visual" else text
        if name == "text_states":
            out.append(hidden_out[b, text])
        elif name == "positions":  # counted from the row's first token (left padding does not count), on the device
            out.append(rows - call.valid[b].long().argmax())
        elif name == "states":
            states = hidden_out[b, rows]
            out.append(C.FINAL_NORM.get(lm)(states) if options.get("final_norm", False) else states)
        elif name == "keys":
            out.append(layer_keys(layer, hidden_in, pos_emb, b, rows, options.get("rope", False)))
        else:
            per_rater = options.get("per_rater", False)
            if vis.numel() == 0 and not per_rater:
                out.append(torch.zeros(0, device=hidden_in.device))
                continue
            raters = select_raters(options["raters"], text)
            if vis.numel() == 0:
                out.append(torch.zeros(0, raters.numel(), device=hidden_in.device))
                continue
            rater_layer, states = layer, hidden_in
            if options.get("layer", "previous") == "next":
                rater_layer, states = layers[j + 1], hidden_out
            probs = attention_rows(rater_layer, states, pos_emb, mask, b, raters,
                                   keys=cached_keys(call.cache, rater_layer, states))  # [H, R, L]
            out.append(probs.mean(0)[:, vis].T if per_rater else probs.mean((0, 1))[vis])
    return out

def text_attention_batch(call: Call, layers, layer, j: int, options: dict, texts: list[Tensor], hidden_in: Tensor,
                         hidden_out: Tensor, mask, pos_emb) -> list[Tensor] | None:
    """The ``text_attention`` signal of every sample from one batched recomputation (:func:`attention_rows_batch`),
    where every sample has visual tokens and as many raters as the others; else None (computed per sample)."""
    if any(vis.numel() == 0 for vis in call.vis_pos):
        return None
    raters = [select_raters(options["raters"], text) for text in texts]
    if len({r.numel() for r in raters}) != 1:
        return None
    rater_layer, states = layer, hidden_in
    if options.get("layer", "previous") == "next":
        rater_layer, states = layers[j + 1], hidden_out
    rows = batch_of(raters).to(states.device)
    probs = attention_rows_batch(rater_layer, states, pos_emb, mask, rows,
                                 normed=normed_input(call, rater_layer, states),
                                 keys=cached_keys(call.cache, rater_layer, states),
                                 last=ends_rows(call, texts))  # [B, H, R, L]
    if options.get("per_rater", False):
        per_rater = probs.mean(1)  # [B, R, L]
        return [per_rater[b][:, vis].T for b, vis in enumerate(call.vis_pos)]
    rated = probs.mean((1, 2))  # [B, L]
    return [rated[b][vis] for b, vis in enumerate(call.vis_pos)]

def layer_input(call: Call, layers, j: int, options: dict, hidden_in: Tensor, hidden_out: Tensor) -> list[Tensor]:
    """The ``layer_input`` signal (see :func:`layer_signal`), per sample."""
    where = options.get("layer", "previous")
    if where == "first":
        states, vis_pos, valid = call.first_input
        norm_layer = layers[0]
    else:
        vis_pos, valid = call.vis_pos, call.valid
        states, norm_layer = (hidden_in, layers[j]) if where == "previous" else \
            (hidden_out, layers[j + 1])
    text = instruction(call, vis_pos, valid) if options.get("tokens", "visual") == "text" else None
    rows = vis_pos if text is None else text
    if options.get("input_norm", False):  # the rows of the whole normalised input (shared within the call)
        states = normed_input(call, norm_layer, states)
    if text is not None and ends_rows(call, text):  # each row's last positions: a slice, not a gather
        return [states[b, states.shape[1] - t.numel():] for b, t in enumerate(text)]
    return rows_of_samples(states, rows)

def layer_keys(layer, hidden_in: Tensor, pos_emb, b: int, rows: Tensor, rope: bool) -> Tensor:
    """Layer keys of ``rows`` of sample ``b``: ``[R, kv_heads * head_dim]`` (after the rotary embedding if
    ``rope``)."""
    attn = C.SELF_ATTENTION.get(layer)
    keys = C.K_PROJ.get(attn)(C.INPUT_NORM.get(layer)(hidden_in[b, rows]))
    if not rope:
        return keys
    head_dim = C.HEAD_DIM.get(attn)
    k = keys.view(1, rows.numel(), -1, head_dim).transpose(1, 2)  # [1, kv_heads, R, hd]
    if C.K_NORM.has(attn):
        k = C.K_NORM.get(attn)(k.transpose(1, 2)).transpose(1, 2)
    cos, sin = pos_emb
    k = C.ATTENTION_ROTARY.get(attn)(k, rows_of(cos, b, rows), rows_of(sin, b, rows))
    return k.transpose(1, 2).reshape(rows.numel(), -1)
