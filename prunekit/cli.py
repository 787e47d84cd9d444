"""``prunekit`` command line: ``prunekit demo`` (the README's main job), ``prunekit bench`` and ``prunekit list``."""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def _demo_model():
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


def demo(args: argparse.Namespace) -> int:
    import prunekit

    print("prunekit demo — RANDOM-WEIGHT LLaVA (CLIP ViT 336/14 -> 576 visual tokens, 8-layer Llama decoder).")
    print("The weights are random: this shows the mechanics (what is kept, counts, timing), not answer quality.\n")
    model = _demo_model()
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
    prunekit.build(args.method, model, keep_tokens=args.keep_tokens)
    pruned_ms = _prefill_ms(model, inputs, args.repeats)
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)[0, len(prompt):]
    report = prunekit.inspect(model)
    print(report.summary())
    first = report.stages[0]
    print(f"\n  kept patches of the 24x24 grid after {first.label or first.point} ({first.counts[0]} of {n}):")
    print(_grid(first.kept[0], 24))
    print(f"\n  visual tokens per decoder layer: {report.layer_counts[0]}")
    print(f"  prefill (median of {args.repeats}, {torch.get_num_threads()} threads): unpruned {base_ms:.1f} ms, "
          f"{args.method} keep_tokens={args.keep_tokens}: {pruned_ms:.1f} ms ({base_ms / pruned_ms:.2f}x)")
    print(f"  generated ids unpruned: {base_tokens.tolist()}")
    print(f"  generated ids pruned:   {tokens.tolist()}")
    prunekit.remove(model)
    return 0


def bench(args: argparse.Namespace) -> int:
    from . import bench as bench_module

    if args.quick:  # a smoke run: tiny model and sizes, seconds on a CPU
        sizes, models, budgets, repeats, new_tokens = ((64, 16), (256, 64)), ("tiny",), (6,), 1, 2
        dim, prefill = 32, False
    else:
        sizes = tuple(zip(args.n, args.k))
        models, budgets, repeats, new_tokens = args.model, args.budgets, args.repeats, args.new_tokens
        dim, prefill = args.dim, not args.no_prefill
    if not args.quick and len(args.n) != len(args.k):
        raise ValueError(f"--n and --k must have the same length; got {args.n} and {args.k}")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    bench_module.run(
        args.out, parts=args.parts, models=models, methods=args.methods, budgets=budgets, sizes=sizes, dim=dim,
        decoder_layers=args.decoder_layers, vision_layers=args.vision_layers, repeats=repeats,
        new_tokens=new_tokens, device=args.device, dtype=dtypes[args.dtype], prefill=prefill,
        progress=not args.no_progress,
    )
    print(f"\nwrote {args.out}/bench.json, bench.md and plots")
    return 0


def list_plugins(args: argparse.Namespace) -> int:
    import prunekit

    for kind in ("methods", "scorers", "selectors", "insertion_points", "adapters"):
        print(f"{kind}: {', '.join(prunekit.registry.names(kind))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prunekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="prune a bundled demo model and show what was kept and the prefill time")
    p.add_argument("--method", default="tops", help="any registered method (prunekit list)")
    p.add_argument("--keep-tokens", type=int, default=64, help="layer-averaged visual tokens kept (default 64)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=8)
    p.set_defaults(func=demo)
    from .bench import DEFAULT_BUDGETS, DEFAULT_METHODS, SELECTION_SIZES

    p = sub.add_parser("bench", help="selection time, prefill/decode time, memory and FLOPs, unpruned vs pruned")
    p.add_argument("--parts", nargs="+", default=["selection", "model"], choices=["selection", "model"])
    p.add_argument("--model", nargs="+", default=["7b", "demo"], choices=["7b", "demo", "tiny"],
                   help="7b: LLaVA-1.5-7B widths with fewer layers (scaled); demo: the demo model")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    p.add_argument("--budgets", nargs="+", type=int, default=list(DEFAULT_BUDGETS),
                   help="layer-averaged visual tokens T")
    p.add_argument("--n", nargs="+", type=int, default=[n for n, _ in SELECTION_SIZES], help="selection sizes N")
    p.add_argument("--k", nargs="+", type=int, default=[k for _, k in SELECTION_SIZES], help="kept K per N")
    p.add_argument("--dim", type=int, default=4096, help="feature width for the selection part")
    p.add_argument("--decoder-layers", type=int, default=4, help="decoder layers of the 7b model (scaled to 32)")
    p.add_argument("--vision-layers", type=int, default=2, help="vision layers of the 7b model (scaled to 24)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=8, help="tokens generated to time decoding")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-prefill", action="store_true", help="skip the 7B-width layer timing next to selection")
    p.add_argument("--quick", action="store_true", help="smoke run on a tiny model (seconds)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="bench-results")
    p.set_defaults(func=bench)
    p = sub.add_parser("list", help="list registered plugins")
    p.set_defaults(func=list_plugins)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, KeyError) as err:  # bad method, config or budget: say why, no traceback
        print(f"prunekit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
