"""Tiny models and their inputs, for tests, docs and plugin authors (built from configs; nothing is downloaded)."""

from __future__ import annotations

import torch


def tiny_llava(
    *,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 4,
    num_layers: int = 4,
    hidden_size: int = 64,
    vocab_size: int = 128,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    num_key_value_heads: int = 2,
):
    """A random-weight ``LlavaForConditionalGeneration``: CLIP vision tower with [CLS], Llama decoder (GQA: 4 query
    heads over ``num_key_value_heads``; 4 for multi-head attention, as LLaVA-1.5's)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size, projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=num_key_value_heads, vocab_size=vocab_size, pad_token_id=0,
        max_position_embeddings=1024,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab_size - 1)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    return model.to(dtype).eval()


def tiny_llava_inputs(model, *, batch: int = 2, prefix=(3, 4), question=(5, 6, 7), left_pad=(2, 0), images_per_row: int = 1, seed: int = 1):
    """Token ids [pad…, prefix, <image>×N per image, question] per row, left-padded, with pixel values."""
    cfg = model.config
    n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    rows = []
    for b in range(batch):
        body = list(prefix) + [cfg.image_token_id] * (n * images_per_row) + [q + b for q in question]
        rows.append([0] * left_pad[b % len(left_pad)] + body)
    L = max(len(r) for r in rows)
    rows = [[0] * (L - len(r)) + r for r in rows]
    input_ids = torch.tensor(rows)
    attention_mask = torch.zeros_like(input_ids)
    for b, r in enumerate(rows):
        first = next(i for i, t in enumerate(r) if t != 0)
        attention_mask[b, first:] = 1
    g = torch.Generator().manual_seed(seed)
    size = cfg.vision_config.image_size
    pixel_values = torch.randn(batch * images_per_row, 3, size, size, generator=g).to(model.dtype)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


class registered:
    """Context manager: register a plugin object for the duration of a block, then always unregister it.

    >>> with registered(my_plugin_module, "my_plugin"):
    ...     assert "my_scorer" in prunekit.list_scorers()
    """

    def __init__(self, plugin, name: str) -> None:
        self.plugin, self.name = plugin, name

    def __enter__(self):
        from prunekit.plugin import registry

        registry.register(self.plugin, name=self.name)
        return self.plugin

    def __exit__(self, *exc) -> None:
        from prunekit.plugin import registry

        registry.unregister(self.name)


#: per-token inputs that a batch pads on the left, and the value they are padded with (input_ids: the model's pad id)
_PER_TOKEN = {"attention_mask": 0, "mm_token_type_ids": 0, "token_type_ids": 0}


def collate(rows: list[dict], pad_token_id: int = 0) -> dict:
    """Left-pad single-prompt inputs into one batch, as a processor with ``padding_side="left"`` would.

    Per-token tensors (``[1, L]``) are padded on the left; everything else (pixel values, image sizes, grids) is
    concatenated along its first axis, zero-padding later axes to the largest row (LLaVA-NeXT's crops).
    """
    L = max(r["input_ids"].shape[1] for r in rows)
    out: dict = {}
    keys = list(dict.fromkeys(k for r in rows for k in r))
    for key in keys:
        values = [r[key] for r in rows if r.get(key) is not None]
        if not values:
            continue
        if key == "input_ids" or key in _PER_TOKEN:
            if len(values) != len(rows):
                raise ValueError(f"{key} is missing from some rows")
            fill = pad_token_id if key == "input_ids" else _PER_TOKEN[key]
            out[key] = torch.cat([
                torch.cat([v.new_full((1, L - v.shape[1]), fill), v], 1) for v in values
            ])
            continue
        shape = [max(v.shape[d] for v in values) for d in range(values[0].dim())]
        padded = []
        for v in values:
            if list(v.shape[1:]) != shape[1:]:
                p = v.new_zeros((v.shape[0], *shape[1:]))
                p[tuple(slice(0, s) for s in v.shape)] = v
                v = p
            padded.append(v)
        out[key] = torch.cat(padded)
    return out


def prompt_ids(model, counts: list[int], token_id: int | list[int], question=(5, 6, 7), prefix=(3, 4)) -> torch.Tensor:
    """``[1, L]`` ids: prefix, then for each image its ``counts[i]`` placeholder tokens, then the question."""
    ids = list(prefix)
    tokens = token_id if isinstance(token_id, list) else [token_id] * len(counts)
    for n, t in zip(counts, tokens):
        ids += [t] * n
    return torch.tensor([ids + list(question)])


_TINY: dict[tuple[str, int], tuple] = {}


def tiny_adapter_model(name: str, num_layers: int = 4) -> tuple:
    """``(model, rows)``: the tiny model of registered adapter ``name`` and its single-prompt inputs, built once per
    process and returned unpatched (a conformance suite's shared fixture)."""
    import prunekit
    from prunekit.plugin import registry

    key = (name, num_layers)
    if key not in _TINY:
        cls = registry.get("adapters", name)
        model = cls.tiny(num_layers=num_layers)
        _TINY[key] = (model, cls.tiny_rows(model))
    model, rows = _TINY[key]
    prunekit.remove(model)
    return model, rows


def batch_of(model, rows: list[dict]) -> dict:
    """``rows`` (single-prompt inputs) collated into one left-padded batch with ``model``'s pad token."""
    return collate(rows, pad_token_id=model.config.get_text_config().pad_token_id or 0)


def prunable_points(adapter_name: str) -> list[str]:
    """The insertion points a conformance run prunes at on adapter ``adapter_name``: before the LLM, and inside it
    unless the adapter refuses in-LLM pruning."""
    from prunekit.plugin import registry

    cls = registry.get("adapters", adapter_name)
    points = {"after_projector"} | ({"decoder_layer"} if not cls.no_decoder_pruning else set())
    return sorted(points & cls.insertion_points)


def assert_pruned(model):
    """Assert that the patched ``model``'s last prefill pruned: stages ran and every sample's layer-averaged
    visual-token count is below what it brought. Returns the report."""
    import prunekit

    report = prunekit.pruning_report(model)
    assert report is not None and report.enabled and report.stages, f"no pruning was recorded: {report}"
    assert all(a < n for a, n in zip(report.layer_average, report.visual_tokens)), str(report)
    return report
