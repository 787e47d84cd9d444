"""The transformers contract: everything prunekit reads from, injects into or wraps inside a transformers call.

transformers renames arguments and moves code between releases (5.24 renamed the language models'
``past_key_values`` argument to ``cache``; a hook that kept reading the old name saw no cache and pruned nothing).
So no other module spells these names: each is a :class:`Contract` here, with the releases on which each spelling
holds, and code goes through it (``CACHE.get(kwargs)``, ``LANGUAGE_MODEL.get(inner)``). The next rename is one line
in :data:`CONTRACTS`' entry.

A contract that does not hold raises :class:`ContractError`, which names the contract and the installed
transformers release. Adapters verify the contracts they use when a model is patched
(:meth:`~prunekit.adapters.MultimodalAdapter.verify_contracts`), the runtime checks at every pruned
prefill that the contract held in fact (a stage ran, the model used the cache prunekit gave it), and
``tests/test_contracts.py`` checks every contract on every adapter's tiny model.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from .errors import PruningError

#: the transformers releases prunekit supports; CI tests the oldest and the newest (keep ``pyproject.toml`` equal)
SUPPORTED = ">=5.16,<6"
OLDEST = "5.16.0"

_MISSING = object()


@functools.lru_cache(maxsize=None)
def installed() -> str:
    """The installed transformers release."""
    import transformers

    return transformers.__version__


@functools.lru_cache(maxsize=None)
def _version(text: str):
    from packaging.version import Version

    return Version(text)


class ContractError(PruningError):
    """Something prunekit reads from or injects into transformers is not where (or what) it expects."""

    def __init__(self, contract: str, detail: str) -> None:
        self.contract = contract
        super().__init__(
            f"transformers contract {contract!r} does not hold on transformers {installed()}: {detail}. "
            f"prunekit supports transformers {SUPPORTED}; nothing was pruned"
        )


class UnsupportedTransformersError(PruningError):
    """The installed transformers release is outside the supported range."""


def check_version() -> None:
    """Raise :class:`UnsupportedTransformersError` when the installed transformers is outside :data:`SUPPORTED`."""
    from packaging.specifiers import SpecifierSet

    if _version(installed()) not in SpecifierSet(SUPPORTED):
        raise UnsupportedTransformersError(
            f"prunekit supports transformers {SUPPORTED} (tested on {OLDEST} and the newest 5.x); "
            f"transformers {installed()} is installed: pip install 'transformers{SUPPORTED}'"
        )


def _spelled(spellings: tuple[tuple[str, str | None], ...]) -> str | None:
    """The spelling in force on the installed release (``spellings``: (first release, spelling), oldest first)."""
    return _spelled_on(installed(), spellings)


@functools.lru_cache(maxsize=None)
def _spelled_on(release: str, spellings: tuple[tuple[str, str | None], ...]) -> str | None:
    """:func:`_spelled` on ``release``, worked out once: a hook reads contracts at every layer of a forward."""
    now, name = _version(release), None
    for since, spelling in spellings:
        if now >= _version(since):
            name = spelling
    return name


@functools.lru_cache(maxsize=None)
def _older_on(release: str, spellings: tuple[tuple[str, str | None], ...]) -> tuple[str, ...]:
    """The spellings of ``spellings`` other than the one in force on ``release``."""
    key = _spelled_on(release, spellings)
    return tuple(dict.fromkeys(s for _, s in spellings if s is not None and s != key))


@dataclass(frozen=True)
class Contract:
    """One thing prunekit relies on in transformers. ``root`` names the object it is read from (the adapter
    supplies those objects: ``model``, ``inner``, ``language_model``, ``decoder_layer``, ``attention``,
    ``vision_attention``, ``projector``; ``None``: a module-level import)."""

    name: str
    what: str
    root: str | None

    def error(self, detail: str) -> ContractError:
        return ContractError(self.name, detail)

    def verify(self, obj: Any) -> None:  # pragma: no cover - every kind overrides it
        raise NotImplementedError


@dataclass(frozen=True)
class Keyword(Contract):
    """A keyword argument of a transformers call (its ``root``'s forward) that prunekit reads or writes.

    ``spellings``: (first release, keyword) pairs, oldest first; a keyword of ``None`` means the argument does not
    exist on those releases (reading gives nothing; verifying passes)."""

    spellings: tuple[tuple[str, str | None], ...] = ()

    @property
    def key(self) -> str | None:
        return _spelled(self.spellings)

    @property
    def older(self) -> tuple[str, ...]:
        """Earlier spellings, still read when a caller uses them (transformers keeps them for a while)."""
        return _older_on(installed(), self.spellings)

    def get(self, kwargs: dict, default: Any = None) -> Any:
        key = self.key
        if key is not None and key in kwargs:
            return kwargs[key]
        for old in self.older:
            if old in kwargs:
                return kwargs[old]
        return default

    def set(self, kwargs: dict, value: Any) -> None:
        """Write under the current spelling and drop older ones (never both: transformers ignores one of them)."""
        key = self.key
        if key is None:
            raise self.error("prunekit must pass this argument, and this release has none")
        for old in self.older:
            kwargs.pop(old, None)
        kwargs[key] = value

    def verify(self, obj: Any) -> None:
        key = self.key
        if key is None:
            return
        fn = obj.forward if hasattr(obj, "forward") else obj
        params = inspect.signature(fn).parameters
        if key not in params:
            named = [p for p, v in params.items() if v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)]
            raise self.error(f"{_qualname(fn)} takes no argument {key!r} (it takes {named})")


@dataclass(frozen=True)
class Attribute(Contract):
    """An attribute path (dotted) on the ``root`` object; ``optional`` ones may be absent (``get`` gives None)."""

    spellings: tuple[tuple[str, str | None], ...] = ()
    optional: bool = False

    @property
    def path(self) -> str | None:
        return _spelled(self.spellings)

    def get(self, obj: Any, default: Any = _MISSING) -> Any:
        path = self.path
        value = obj
        try:
            if path is None:
                raise AttributeError(self.name)
            for part in path.split("."):
                value = getattr(value, part)
        except AttributeError:
            if default is not _MISSING:
                return default
            if self.optional:
                return None
            raise self.error(f"{type(obj).__name__} has no {path!r}") from None
        return value

    def has(self, obj: Any) -> bool:
        return self.get(obj, None) is not None

    def verify(self, obj: Any) -> None:
        self.get(obj)


@dataclass(frozen=True)
class Function(Contract):
    """A transformers function or method prunekit calls: ``module``:``qualname``, taking ``keywords``."""

    module: str = ""
    qualname: str = ""
    keywords: tuple[Keyword | str, ...] = ()

    def get(self) -> Callable:
        try:
            value: Any = importlib.import_module(self.module)
            for part in self.qualname.split("."):
                value = getattr(value, part)
        except (ImportError, AttributeError):
            raise self.error(f"{self.module}.{self.qualname} does not exist") from None
        keys = tuple(kw.key if isinstance(kw, Keyword) else kw for kw in self.keywords)
        missing = _missing_parameters(value, keys)
        if missing:
            raise self.error(f"{self.module}.{self.qualname} takes no argument {missing!r}")
        return value

    def verify(self, obj: Any = None) -> None:
        self.get()


def _missing_parameters(fn: Callable, keys: tuple[str | None, ...]) -> str | None:
    """The first of ``keys`` that ``fn`` does not take (None: it takes them all); worked out once per function
    (``inspect.signature`` is slow, and a prefill looks functions up)."""
    try:
        return _missing_parameters_of(fn, keys)
    except TypeError:  # an unhashable callable: looked at every time
        return _missing_parameters_of.__wrapped__(fn, keys)


@functools.lru_cache(maxsize=256)
def _missing_parameters_of(fn: Callable, keys: tuple[str | None, ...]) -> str | None:
    params = inspect.signature(fn).parameters
    return next((key for key in keys if key is not None and key not in params), None)


@dataclass(frozen=True)
class Rotary(Contract):
    """How an attention module applies its rotary embedding to q or k: the function next to the attention class
    in its module, ``apply_rotary_pos_emb(q, k, cos, sin)``; on releases where M-RoPE models keep one (cos, sin)
    row per axis, ``apply_multimodal_rotary_pos_emb(q, k, cos, sin, mrope_section)``."""

    def get(self, attn: Any) -> Callable:
        module = inspect.getmodule(type(attn))
        plain = getattr(module, "apply_rotary_pos_emb", None)
        if plain is not None:
            return lambda x, cos, sin: plain(x, x, cos, sin)[0]
        multi = getattr(module, "apply_multimodal_rotary_pos_emb", None)
        section = (getattr(getattr(attn, "config", None), "rope_parameters", None) or {}).get("mrope_section")
        if multi is not None and section is not None:
            return lambda x, cos, sin: multi(x, x, cos, sin, section)[0]
        raise self.error(f"{getattr(module, '__name__', module)} has no rotary function prunekit knows")

    def verify(self, obj: Any) -> None:
        self.get(obj)


@dataclass(frozen=True)
class Behaviour(Contract):
    """What a transformers function does, where that changed between releases: ``spellings`` (first release,
    behaviour), oldest first; :attr:`value` is the behaviour of the installed release. Checked by running the
    adapter's tiny model (the adapter test suite), not by inspection."""

    spellings: tuple[tuple[str, str], ...] = ()

    @property
    def value(self) -> str | None:
        return _spelled(self.spellings)

    def verify(self, obj: Any = None) -> None:
        if self.value is None:
            raise self.error("no behaviour is known for this release")


def _qualname(fn) -> str:
    return getattr(fn, "__qualname__", repr(fn))


def _at(name: str, where: str, what: str, optional: bool = False) -> Attribute:
    """An attribute spelled the same on every supported release: ``name`` is ``<root>.<path>``."""
    return Attribute(name, what, where, (("5.0", name.split(".", 1)[1]),), optional=optional)


def _kw(name: str, where: str, what: str, *spellings: tuple[str, str | None]) -> Keyword:
    return Keyword(name, what, where, spellings or (("5.0", name.rsplit(".", 1)[1]),))


# --- the cache: renamed in 5.24 ------------------------------------------------------------------------------
_CACHE_SPELLINGS = (("5.0", "past_key_values"), ("5.24", "cache"))

# --- the language model's forward (the pre-hook reads and rewrites these) -------------------------------------
LM_INPUTS_EMBEDS = _kw("language_model.inputs_embeds", "language_model", "the sequence prunekit shortens")
LM_INPUT_IDS = _kw("language_model.input_ids", "language_model", "a decode step's tokens, when no embeddings")
LM_ATTENTION_MASK = _kw("language_model.attention_mask", "language_model", "2-D mask, rebuilt after pruning")
LM_POSITION_IDS = _kw("language_model.position_ids", "language_model", "positions, mapped after pruning")
LM_CACHE = Keyword("language_model.cache", "the KV cache whose decode steps prunekit maps", "language_model",
                   _CACHE_SPELLINGS)
LM_USE_CACHE = _kw("language_model.use_cache", "language_model", "whether a plain forward makes a cache")
LM_VISUAL_POS_MASKS = _kw("language_model.visual_pos_masks", "language_model",
                          "Qwen3-VL: where the deepstack features go")
LM_DEEPSTACK_EMBEDS = _kw("language_model.deepstack_visual_embeds", "language_model",
                          "Qwen3-VL: deepstack features, pruned with their tokens")

# --- a decoder layer's forward (pre-hooks slice these; a forward hook gathers the output rows) --------------
LAYER_HIDDEN_STATES = _kw("decoder_layer.hidden_states", "decoder_layer", "the layer input (first positional)")
LAYER_ATTENTION_MASK = _kw("decoder_layer.attention_mask", "decoder_layer", "4-D mask, sliced to kept rows")
LAYER_POSITION_EMBEDDINGS = _kw("decoder_layer.position_embeddings", "decoder_layer",
                                "(cos, sin), sliced to kept rows")
LAYER_POSITION_IDS = _kw("decoder_layer.position_ids", "decoder_layer", "positions, sliced to kept rows")

# --- the multimodal model's forward (the inner model: the visual tokens are found here) ---------------------
MODEL_INPUT_IDS = _kw("model.input_ids", "inner", "where the image placeholder tokens are")
MODEL_INPUTS_EMBEDS = _kw("model.inputs_embeds", "inner", "placeholders found by embedding when no ids")
MODEL_ATTENTION_MASK = _kw("model.attention_mask", "inner", "Gemma3: the 2-D mask its masks are built from")
MODEL_CACHE = Keyword("model.cache", "Gemma3: the cache whose decode masks prunekit maps", "inner", _CACHE_SPELLINGS)
MODEL_PIXEL_VALUES = _kw("model.pixel_values", "inner", "a call that brings images")
MODEL_PIXEL_VALUES_VIDEOS = _kw("model.pixel_values_videos", "inner", "a call that brings videos")
MODEL_PIXEL_VALUES_IMAGES = Keyword("model.pixel_values_images", "Video-LLaVA: a call that brings images", "inner",
                                    (("5.0", "pixel_values_images"), ("5.21", "pixel_values")))
MODEL_ENCODER_OUTPUTS = Keyword("model.mm_encoder_outputs", "images that generate encoded before the prefill",
                                "inner", (("5.0", None), ("5.18", "mm_encoder_outputs")))
MODEL_LABELS = _kw("model.labels", "model", "a forward that computes a loss: refused while pruning")
MODEL_TOKEN_TYPE_IDS = _kw("model.token_type_ids", "inner", "Gemma3: image blocks of its masks")

#: every call argument that means "this call brings images or videos"
IMAGE_INPUTS = (MODEL_PIXEL_VALUES, MODEL_PIXEL_VALUES_VIDEOS, MODEL_PIXEL_VALUES_IMAGES)

# --- image and video encoders (wrapped to record their arguments and outputs) --------------------------------
ENCODE_IMAGES = _at("model.get_image_features", "inner", "encodes images; its arguments and output are recorded")
ENCODE_VIDEOS = _at("model.get_video_features", "inner", "encodes videos; its arguments and output are recorded",
                    optional=True)
ENCODED_TOKENS = _at("encoder_output.pooler_output", "encoder_output", "one [n_i, D] tensor of visual tokens per image")
ARG_IMAGE_SIZES = _kw("get_image_features.image_sizes", "encode_images", "LLaVA-NeXT: each image's size")
ARG_IMAGE_GRID = _kw("get_image_features.image_grid_thw", "encode_images", "Qwen-VL: each image's patch grid")
ARG_VIDEO_GRID = _kw("get_video_features.video_grid_thw", "encode_videos", "Qwen-VL: each video's patch grid")
ARG_VISION_ASPECT_RATIO = _kw("get_image_features.vision_aspect_ratio", "encode_images",
                              "LLaVA-OneVision: how far large images are downsized (crops of each token)")
ONEVISION_VIDEO_NEWLINE = Behaviour(
    "llava_onevision.video_newline", "LLaVA-OneVision: the token that ends a video is added by forward ('forward') or "
    "is already in get_video_features' output ('encoder')", None, (("5.0", "forward"), ("5.18", "encoder")))
ARG_VIDEO_PIXELS = Keyword("get_video_features.pixel_values_videos", "LLaVA-OneVision: the frames of each video",
                           "encode_videos", (("5.0", "pixel_values"), ("5.18", "pixel_values_videos")))

# --- where things are ----------------------------------------------------------------------------------------
INNER = _at("model.model", "model", "the multimodal model inside a *ForConditionalGeneration")
LANGUAGE_MODEL = _at("model.language_model", "inner", "the decoder the visual tokens enter")
TEXT_MODEL = _at("model.text_model", "inner", "Idefics3/SmolVLM: the decoder the visual tokens enter")
DECODER_LAYERS = _at("language_model.layers", "language_model", "decoder layers, hooked for in-LLM pruning")
FINAL_NORM = _at("language_model.norm", "language_model", "the final norm (signal states, final_norm=True)")
ROTARY_EMBEDDING = _at("language_model.rotary_emb", "language_model",
                       "(cos, sin) for renumbered positions: rotary_emb(hidden, position_ids=...)")
INPUT_EMBEDDINGS = _at("model.get_input_embeddings", "inner", "finds placeholders in inputs_embeds")
SELF_ATTENTION = _at("decoder_layer.self_attn", "decoder_layer", "attention rows are recomputed from it")
INPUT_NORM = _at("decoder_layer.input_layernorm", "decoder_layer", "the norm before attention")
Q_PROJ = _at("attention.q_proj", "attention", "query projection")
K_PROJ = _at("attention.k_proj", "attention", "key projection")
Q_NORM = _at("attention.q_norm", "attention", "query norm, where the model has one", optional=True)
K_NORM = _at("attention.k_norm", "attention", "key norm, where the model has one", optional=True)
HEAD_DIM = _at("attention.head_dim", "attention", "width of one head")
SCALING = _at("attention.scaling", "attention", "softmax scale")
ATTENTION_LAYER_INDEX = _at("attention.layer_idx", "attention", "the cache layer that holds the layer's keys")
CACHE_LAYERS = _at("cache.layers", "cache", "per decoder layer, what a forward cached: a stage reads layer K-1's "
                   "keys there rather than computing them again")
CACHE_LAYER_KEYS = _at("cache_layer.keys", "cache_layer", "the keys a decoder layer cached (after its rotary "
                       "embedding)")
ATTENTION_ROTARY = Rotary("attention.rotary", "applies (cos, sin) to recomputed queries and keys", "attention")
VISION_Q_PROJ = _at("vision_attention.q_proj", "vision_attention", "[CLS] query of the encoder layer")
VISION_K_PROJ = _at("vision_attention.k_proj", "vision_attention", "patch keys of the encoder layer")
VISION_Q_NORM = _at("vision_attention.q_norm", "vision_attention", "InternViT query norm", optional=True)
VISION_K_NORM = _at("vision_attention.k_norm", "vision_attention", "InternViT key norm", optional=True)
VISION_HEADS = _at("vision_attention.num_heads", "vision_attention", "encoder attention heads")
VISION_HEAD_DIM = _at("vision_attention.head_dim", "vision_attention", "encoder head width")
VISION_TOWER = _at("model.vision_tower", "inner", "the vision encoder")
VISION_MODEL = _at("model.vision_model", "inner", "Idefics3: the vision encoder")
PROJECTOR = _at("model.multi_modal_projector", "inner", "maps vision features to the LLM (vision_features point)")
PACK_IMAGE_FEATURES = _at("model.pack_image_features", "inner",
                          "LLaVA-NeXT, LLaVA-OneVision: crops → packed tokens (run on indices and crop labels)")
PIXEL_SHUFFLE = _at("model.pixel_shuffle", "inner", "InternVL: patches → tokens (run on indices)")
CONNECTOR_PIXEL_SHUFFLE = _at("model.connector.pixel_shuffle", "inner", "Idefics3: patches → tokens (run on indices)")

# --- helpers and types --------------------------------------------------------------------------------------
DYNAMIC_CACHE = Function("transformers.DynamicCache", "the cache a plain forward gets, so decode steps map", None,
                         "transformers", "DynamicCache", ("config",))
CACHE_LENGTH = Function("transformers.Cache.get_seq_length", "tokens already in a cache (prefill or decode?)", None,
                        "transformers", "Cache.get_seq_length")
STATIC_CACHE = Function("transformers.StaticCache", "a fixed-size cache, which a pruned prompt cannot fill: refused",
                        None, "transformers", "StaticCache")
GRADIENT_CHECKPOINTING = _at("language_model.gradient_checkpointing", "language_model",
                             "recomputes layers in backward: refused with in-LLM stages", optional=True)
OUTPUT_CACHE = Attribute("language_model_output.cache", "the cache the language model used", "language_model_output",
                         _CACHE_SPELLINGS)
GEMMA3_MASKS = Function("Gemma3ForConditionalGeneration.create_masks_for_generate",
                        "Gemma3: its masks, rebuilt for the pruned sequence", None,
                        "transformers.models.gemma3.modeling_gemma3",
                        "Gemma3ForConditionalGeneration.create_masks_for_generate",
                        ("config", "inputs_embeds", "attention_mask", MODEL_CACHE, "position_ids", "token_type_ids"))
NEXT_NUM_PATCHES = Function("llava_next.image_size_to_num_patches", "LLaVA-NeXT: crops per image", None,
                            "transformers.models.llava_next.modeling_llava_next", "image_size_to_num_patches",
                            ("image_size", "grid_pinpoints", "patch_size"))
ONEVISION_NUM_PATCHES = Function("llava_onevision.image_size_to_num_patches", "LLaVA-OneVision: crops per image",
                                 None, "transformers.models.llava_onevision.modeling_llava_onevision",
                                 "image_size_to_num_patches", ("image_size", "grid_pinpoints", "patch_size"))

#: every contract, by name
CONTRACTS: dict[str, Contract] = {c.name: c for c in list(globals().values()) if isinstance(c, Contract)}

#: what every decoder-LLM adapter relies on (adapters add their own)
CORE = (
    LM_INPUTS_EMBEDS, LM_INPUT_IDS, LM_ATTENTION_MASK, LM_POSITION_IDS, LM_CACHE, LM_USE_CACHE,
    LAYER_HIDDEN_STATES, LAYER_ATTENTION_MASK, LAYER_POSITION_EMBEDDINGS, LAYER_POSITION_IDS,
    MODEL_INPUT_IDS, MODEL_INPUTS_EMBEDS, MODEL_ENCODER_OUTPUTS, ENCODE_IMAGES, ENCODE_VIDEOS,
    DECODER_LAYERS, ROTARY_EMBEDDING, FINAL_NORM, INPUT_EMBEDDINGS, SELF_ATTENTION, INPUT_NORM, STATIC_CACHE, GRADIENT_CHECKPOINTING,
    Q_PROJ, K_PROJ, Q_NORM, K_NORM, HEAD_DIM, SCALING, ATTENTION_ROTARY, DYNAMIC_CACHE, CACHE_LENGTH,
    ATTENTION_LAYER_INDEX, CACHE_LAYERS, CACHE_LAYER_KEYS,
)
#: what reading a vision encoder's attention relies on
VISION_ATTENTION = (VISION_Q_PROJ, VISION_K_PROJ, VISION_Q_NORM, VISION_K_NORM, VISION_HEADS, VISION_HEAD_DIM)


def _spellings_text(c: Contract) -> str:
    spellings = getattr(c, "spellings", ())
    if spellings:
        return "; ".join(f"`{s}` from {since}" if s else f"none from {since}" for since, s in spellings)
    if isinstance(c, Function):
        return f"`{c.module}.{c.qualname}`"
    return "see its class"


def describe() -> str:
    """A Markdown table of every contract: where it is read, how it is spelled on which releases, and why."""
    rows = ["| contract | read from | spelled | what prunekit does with it |", "|---|---|---|---|"]
    for c in CONTRACTS.values():
        rows.append(f"| `{c.name}` | {c.root or 'import'} | {_spellings_text(c)} | {c.what} |")
    return "\n".join(rows) + "\n"
