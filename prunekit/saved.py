"""A pruning configuration saved with a model: the ``prunekit`` block of its ``config.json``.

``save_pretrained`` writes every attribute of a model's config, so a block set on ``model.config`` travels with the
folder, and ``from_pretrained`` brings it back::

    prunekit.save_config(model, "tops", keep_tokens=64)   # or, on a patched model: prunekit.save_config(model)
    model.save_pretrained("llava-tops-64")
    ...
    model = LlavaForConditionalGeneration.from_pretrained("llava-tops-64")
    prunekit.build(model)                                  # TOPS at 64 tokens, as saved

The block is plain JSON, the same for every reader (``prunekit.build``, ``lmms-eval --model prunekit``, a serving
integration)::

    "prunekit": {"format": 1, "method": "tops", "options": {"keep_tokens": 64}}

``method`` is a registered method name; ``options`` are the fields of that method's config that were set (defaults
are left out, so a reader applies the defaults of its own prunekit release). A reader refuses a ``format`` it does not
know and validates ``options`` exactly as ``prunekit.build`` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import MethodConfig, make_config
from .interfaces import patch_of

#: the attribute of the model's config (and the key of config.json) that holds the block
KEY = "prunekit"
#: the block's layout version; readers refuse others
FORMAT = 1


def config_block(method: str | MethodConfig, **options: Any) -> dict:
    """The block for ``method`` with ``options`` (validated as ``prunekit.build`` validates them)."""
    cls, config = make_config(method, **options)
    return {"format": FORMAT, "method": cls.name, "options": config.model_dump(mode="json", exclude_unset=True)}


def save_config(model: Any, method: str | MethodConfig | None = None, **options: Any) -> dict:
    """Set the block on ``model.config`` (``save_pretrained`` then writes it) and return it. Without ``method``, the
    configuration of the patch that ``prunekit.build`` installed on ``model``."""
    if method is None:
        patch = patch_of(model)
        if patch is None:
            raise ValueError("model is not patched by prunekit: pass a method (save_config(model, 'tops', "
                             "keep_tokens=64)) or call prunekit.build first")
        method = patch.config
    block = config_block(method, **options)
    setattr(model.config, KEY, block)
    return block


def read_block(source: Any) -> dict | None:
    """The raw block of ``source`` (None when it has none): a model, its config, a ``config.json`` dict, or a
    model folder / config.json path."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        path = path / "config.json" if path.is_dir() else path
        source = json.loads(path.read_text())
    if isinstance(source, dict):
        block = source.get(KEY)
    else:
        config = getattr(source, "config", source)
        block = getattr(config, KEY, None)
    if block is None:
        return None
    if not isinstance(block, dict) or block.get("format") != FORMAT:
        found = block.get("format") if isinstance(block, dict) else type(block).__name__
        raise ValueError(f"the '{KEY}' block of this model's config has format {found!r}; this prunekit reads "
                         f"format {FORMAT} ({{'format': {FORMAT}, 'method': ..., 'options': {{...}}}})")
    if not isinstance(block.get("method"), str) or not isinstance(block.get("options", {}), dict):
        raise ValueError(f"the '{KEY}' block needs 'method' (a registered method name) and 'options' (a dict); "
                         f"got {block!r}")
    return block


def saved_config(source: Any, **overrides: Any) -> MethodConfig | None:
    """The validated method config saved with ``source`` (see :func:`read_block`), with ``overrides`` applied; None
    when nothing was saved."""
    block = read_block(source)
    if block is None:
        return None
    _, config = make_config(block["method"], **{**block.get("options", {}), **overrides})
    return config


__all__ = ["KEY", "FORMAT", "config_block", "save_config", "read_block", "saved_config"]
