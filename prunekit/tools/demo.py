"""``prunekit demo``: prune one image's visual tokens with a method and show what was kept, the answers and the
prefill time, on the bundled model (default) or a random-weight LLaVA with LLaVA-1.5's geometry."""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def demo_model():
    """A RANDOM-WEIGHT LLaVA with LLaVA-1.5's geometry (336 px, 14 px patches: 576 visual tokens)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                              image_size=336, patch_size=14, projection_dim=64)
    text = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=1000, pad_token_id=0, max_position_embeddings=2048)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=999)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


def _prefill_ms(model, inputs, repeats: int) -> float:
    times = []
    with torch.no_grad():
        model(**inputs)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs, logits_to_keep=1)
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _grid(kept: torch.Tensor, side: int) -> str:
    cells = [["·"] * side for _ in range(side)]
    for i in kept.tolist():
        cells[i // side][i % side] = "█"
    return "\n".join("    " + "".join(row) for row in cells)


def _show_kept(report, side: int, n: int) -> None:
    """The pruning report, the first stage's kept patches on the image grid, and the per-layer counts."""
    first = report.stages[0]
    print(report.summary())
    print(f"\n  kept patches of the {side}x{side} grid after {first.label or first.point} ({first.counts[0]} of {n}):")
    print(_grid(first.kept[0], side))
    print(f"  visual tokens per decoder layer: {report.layer_counts[0]}")


def demo(args: argparse.Namespace) -> int:
    if args.model == "random":
        args.keep_tokens = args.keep_tokens or 64
        return _random_demo(args)
    args.keep_tokens = args.keep_tokens or 16
    return _bundled_demo(args)


def _highlight(image, kept: torch.Tensor, grid: int, path: str) -> None:
    """Save ``image`` with every patch that was not kept dimmed and the kept ones outlined."""
    from PIL import Image, ImageDraw

    image = image.convert("RGB")
    cell = image.width // grid
    dim = Image.blend(image, Image.new("RGB", image.size, (255, 255, 255)), 0.75)
    out = dim.copy()
    draw = ImageDraw.Draw(out)
    for i in kept.tolist():
        r, c = divmod(i, grid)
        box = (c * cell, r * cell, (c + 1) * cell, (r + 1) * cell)
        out.paste(image.crop(box), box[:2])
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=(255, 0, 0))
    scale = max(1, 384 // image.width)
    side_by_side = Image.new("RGB", (2 * image.width * scale + 8, image.height * scale), (255, 255, 255))
    side_by_side.paste(image.resize((image.width * scale, image.height * scale), Image.NEAREST), (0, 0))
    side_by_side.paste(out.resize((image.width * scale, image.height * scale), Image.NEAREST),
                       (image.width * scale + 8, 0))
    side_by_side.save(path)


def _bundled_demo(args: argparse.Namespace) -> int:
    import prunekit
    from . import bundled
    from .data import ShapesVQA

    model, processor = bundled.load()
    sample = ShapesVQA("test", args.sample + 1, seed=0)[args.sample]
    question = args.question or sample.question
    grid = bundled.GRID
    print(f"prunekit demo — the bundled shapes LLaVA ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
          f"parameters, trained from scratch; {grid * grid} visual tokens), test sample {args.sample}.")
    inputs = processor(images=sample.image, text=bundled.prompt(question), return_tensors="pt")
    n = int((inputs["input_ids"] == model.config.image_token_id).sum())

    def ask() -> str:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=1, do_sample=False)
        return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    base_answer, base_ms = ask(), _prefill_ms(model, inputs, args.repeats)
    prunekit.build(args.method, model, keep_tokens=args.keep_tokens, budget_meaning=args.budget_meaning)
    pruned_answer = ask()
    report = prunekit.pruning_report(model)
    pruned_ms = _prefill_ms(model, inputs, args.repeats)
    prunekit.remove(model)
    first = report.stages[0]
    print(f"\n  question: {question}")
    if not args.question:
        print(f"  reference answer: {sample.answer}")
    print(f"  answer unpruned ({n} visual tokens): {base_answer}")
    print(f"  answer with {args.method} keep_tokens={args.keep_tokens}: {pruned_answer}\n")
    _show_kept(report, grid, n)
    print(f"  prefill (median of {args.repeats}, {torch.get_num_threads()} threads): unpruned {base_ms:.2f} ms, "
          f"{args.method} keep_tokens={args.keep_tokens}: {pruned_ms:.2f} ms ({base_ms / pruned_ms:.2f}x)")
    if args.picture:
        _highlight(sample.image, first.kept[0], grid, args.picture)
        print(f"  picture of the kept patches (right; left: the image): {args.picture}")
    return 0


def _random_demo(args: argparse.Namespace) -> int:
    import prunekit

    print("prunekit demo — RANDOM-WEIGHT LLaVA (CLIP ViT 336/14 -> 576 visual tokens, 8-layer Llama decoder).")
    print("The weights are random: this shows the mechanics (what is kept, counts, timing), not answer quality.\n")
    model = demo_model()
    n = 576
    prompt = [1, 5, 6, 7] + [999] * n + [10, 11, 12, 13, 14, 15, 16, 17]
    g = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.tensor([prompt]),
        "attention_mask": torch.ones(1, len(prompt), dtype=torch.long),
        "pixel_values": torch.randn(1, 3, 336, 336, generator=g),
    }
    base_ms = _prefill_ms(model, inputs, args.repeats)
    with torch.no_grad():
        base_tokens = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)[0, len(prompt):]
    prunekit.build(args.method, model, keep_tokens=args.keep_tokens, budget_meaning=args.budget_meaning)
    pruned_ms = _prefill_ms(model, inputs, args.repeats)
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)[0, len(prompt):]
    report = prunekit.pruning_report(model)
    _show_kept(report, 24, n)
    print(f"  prefill (median of {args.repeats}, {torch.get_num_threads()} threads): unpruned {base_ms:.1f} ms, "
          f"{args.method} keep_tokens={args.keep_tokens}: {pruned_ms:.1f} ms ({base_ms / pruned_ms:.2f}x)")
    print(f"  generated ids unpruned: {base_tokens.tolist()}")
    print(f"  generated ids pruned:   {tokens.tolist()}")
    prunekit.remove(model)
    return 0
