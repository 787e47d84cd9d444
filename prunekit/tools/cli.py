"""``prunekit`` command line: ``prunekit demo`` (the README's main job), ``prunekit eval``, ``prunekit bench`` and
``prunekit list``."""

from __future__ import annotations

import argparse
import sys

import torch

from ..errors import PrunekitError
from .demo import demo


def bench(args: argparse.Namespace) -> int:
    from . import bench as bench_module

    if args.quick:  # a smoke run: tiny model and sizes, seconds on a CPU
        sizes, models, budgets, repeats, new_tokens = ((64, 16), (256, 64)), ("tiny",), (6,), 1, 2
        dim, prefill = 32, "none"
    else:
        if len(args.n) != len(args.k):
            raise ValueError(f"--n and --k must have the same length; got {args.n} and {args.k}")
        bad = [(n, k) for n, k in zip(args.n, args.k) if not 1 <= k <= n]
        if bad:
            raise ValueError(f"--k must be in 1..N for its --n; got (N, K) = {bad}")
        sizes = tuple(zip(args.n, args.k))
        models, budgets, repeats, new_tokens = args.model, args.budgets, args.repeats, args.new_tokens
        dim, prefill = args.dim, "none" if args.no_prefill else args.selection_prefill
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    bench_module.run(
        args.out, parts=args.parts, models=models, methods=args.methods, budgets=budgets, sizes=sizes, dim=dim,
        decoder_layers=args.decoder_layers, vision_layers=args.vision_layers, batch=args.batch, repeats=repeats,
        new_tokens=new_tokens, device=args.device, dtype=dtypes[args.dtype], prefill=prefill,
        naive_up_to=args.naive_up_to, max_similarity_mib=args.max_similarity_mib, memory=not args.no_memory,
        oracle=not args.no_oracle, budget_meaning=args.budget_meaning, progress=not args.no_progress,
    )
    print(f"\nwrote {args.out}/bench.json, bench.md and plots")
    return 0


def load_model(spec: str):
    """``bundled`` (the shipped shapes LLaVA) or a local folder saved with ``save_pretrained``: (model, processor)."""
    from . import bundled

    if spec == "bundled":
        return bundled.load()
    from pathlib import Path

    from transformers import AutoModelForImageTextToText, AutoProcessor

    if not Path(spec, "config.json").is_file():
        raise ValueError(f"--model must be 'bundled' or a local model folder with config.json; got {spec!r}")
    model = AutoModelForImageTextToText.from_pretrained(spec, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval(), AutoProcessor.from_pretrained(spec)


def evaluate(args: argparse.Namespace) -> int:
    from . import evaluation as ev
    from .data import ShapesVQA, load_jsonl

    if args.quick:  # the CI smoke version: a few samples, three methods, two budgets
        args.size, args.budgets = min(args.size, 24), [0.333, 0.111]
        args.methods = args.methods or ["tops", "random", "visionzip"]
    torch.set_num_threads(args.threads)
    model, processor = load_model(args.model)
    if args.data == "shapes":
        ds = ShapesVQA(args.split, args.size, seed=args.seed)
        samples, data = list(ds), f"ShapesVQA({args.split!r}, {args.size}, seed={args.seed})"
    else:
        samples, data = load_jsonl(args.data), args.data
        samples = samples[: args.size] if args.size else samples
    extra = args.ablations or args.relevance
    variants = [] if extra and not args.methods else ev.method_variants(args.methods or _default_methods())
    if args.ablations:
        variants += ev.tops_ablations()
    if args.relevance:
        variants += ev.tops_relevance_variants()
    results = ev.evaluate(model, processor, samples, variants, budgets=args.budgets, positions=args.positions,
                          budget_meanings=args.budget_meaning, batch_size=args.batch_size,
                          progress=not args.no_progress)
    meta = {"command": "prunekit eval " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["eval"] else "",
            "model": args.model, "data": data, "samples": len(samples), "budgets": args.budgets,
            "positions": args.positions, "budget_meanings": args.budget_meaning, "torch": torch.__version__,
            "threads": args.threads}
    files = ev.write(results, args.out, meta)
    print(ev.table(results))
    print(f"\nwrote {', '.join(str(f) for f in files)}")
    return 0


def _default_methods() -> list[str]:
    import prunekit

    return prunekit.list_methods()


def matrix(args: argparse.Namespace) -> int:
    from . import matrix as compat

    cells = compat.matrix(args.adapters, args.methods, progress=not args.no_progress)
    print(compat.markdown(cells), end="")
    return 0


def contracts(args: argparse.Namespace) -> int:
    from .. import contracts as C

    print(f"transformers {C.installed()} (prunekit supports {C.SUPPORTED})\n")
    print(C.describe(), end="")
    return 0


def list_plugins(args: argparse.Namespace) -> int:
    import prunekit

    for kind in ("methods", "scorers", "selectors", "insertion_points", "adapters"):
        print(f"{kind}: {', '.join(prunekit.plugin.registry.names(kind))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prunekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="answer a question with and without pruning on the bundled model; show what was kept")
    p.add_argument("--model", default="bundled", choices=["bundled", "random"],
                   help="bundled: the trained shapes LLaVA (144 tokens); random: a random-weight LLaVA with 576 tokens")
    p.add_argument("--method", default="tops", help="any registered method (prunekit list)")
    p.add_argument("--keep-tokens", type=int, default=None,
                   help="visual-token budget T (default: 16 of 144 bundled, 64 of 576 random)")
    p.add_argument("--budget-meaning", default="nominal", choices=["nominal", "layer_average"],
                   help="nominal: T as the method's paper counts it; layer_average: T tokens averaged over layers")
    p.add_argument("--sample", type=int, default=0, help="which test image of the shapes benchmark (bundled)")
    p.add_argument("--question", default=None, help="ask your own question about that image (bundled)")
    p.add_argument("--picture", default="prunekit-demo.png", help="where to save the kept-patch picture ('' = none)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=8)
    p.set_defaults(func=demo)
    from .bench import DEFAULT_BUDGETS, DEFAULT_METHODS, SELECTION_PREFILLS, SELECTION_SIZES

    p = sub.add_parser("bench", help="selection time, prefill/decode time, memory and FLOPs, unpruned vs pruned")
    p.add_argument("--parts", nargs="+", default=["selection", "model"], choices=["selection", "model"])
    p.add_argument("--model", nargs="+", default=["7b", "demo"], choices=["7b", "demo", "tiny"],
                   help="7b: LLaVA-1.5-7B widths with fewer layers (scaled); demo: the demo model")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    p.add_argument("--budgets", nargs="+", type=int, default=list(DEFAULT_BUDGETS),
                   help="visual-token budgets T (counted as --budget-meaning says)")
    p.add_argument("--budget-meaning", default="nominal", choices=["nominal", "layer_average"],
                   help="nominal: each method's own accounting; layer_average: equal layer-averaged tokens")
    p.add_argument("--n", nargs="+", type=int, default=[n for n, _ in SELECTION_SIZES], help="selection sizes N")
    p.add_argument("--k", nargs="+", type=int, default=[k for _, k in SELECTION_SIZES], help="kept K per N")
    p.add_argument("--dim", type=int, default=4096, help="feature width for the selection part")
    p.add_argument("--decoder-layers", type=int, default=4,
                   help="decoder layers of the 7b model (scaled to 32; 32 = the real depth, not scaled)")
    p.add_argument("--vision-layers", type=int, default=2,
                   help="vision layers of the 7b model (scaled to 24; 24 = the real depth, not scaled)")
    p.add_argument("--batch", nargs="+", type=int, default=[1],
                   help="batch sizes: B prompts of equal length (own random images) / B selections at once")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=8, help="tokens generated to time decoding (1: no decode timing)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the models (selection features stay float32)")
    p.add_argument("--selection-prefill", default="auto", choices=list(SELECTION_PREFILLS),
                   help="the unpruned prefill next to selection: decoder = the 7B's 32-layer language model (random "
                   "weights, built on the device), layer = one 7B-width layer x 32; auto = decoder with "
                   "--decoder-layers 32 on a non-CPU device, else layer")
    p.add_argument("--no-prefill", action="store_true", help="same as --selection-prefill none")
    p.add_argument("--naive-up-to", type=int, default=None,
                   help="run the naive reference loop only up to this N (default: at every N)")
    p.add_argument("--max-similarity-mib", type=float, default=None,
                   help="TOPS's memory cap for holding the N x N similarity matrices in the selection part "
                   "(default: the library's, 1 GiB; above it rows are recomputed on demand)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory prefill of the model part")
    p.add_argument("--no-oracle", action="store_true", help="skip the unpatched-model-on-T-tokens rows")
    p.add_argument("--quick", action="store_true", help="smoke run on a tiny model (seconds)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="bench-results")
    p.set_defaults(func=bench)
    from .evaluation import BUDGET_MEANINGS, DEFAULT_BUDGETS as EVAL_BUDGETS, POSITION_MODES

    p = sub.add_parser("eval", help="accuracy of methods x budgets on the bundled model and data (or your own)")
    p.add_argument("--model", default="bundled", help="'bundled' or a local folder saved with save_pretrained")
    p.add_argument("--data", default="shapes", help="'shapes' (the procedural benchmark) or a JSONL file")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--size", type=int, default=1000, help="samples (shapes: generated; JSONL: the first N, 0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=None, help="registered methods (default: all)")
    p.add_argument("--ablations", action="store_true", help="add TOPS with each of its 7 principle subsets")
    p.add_argument("--relevance", action="store_true",
                   help="add TOPS with each stage-I relevance signal (cls_attention, text_similarity, "
                        "attention_received)")
    p.add_argument("--budgets", nargs="+", type=float, default=list(EVAL_BUDGETS),
                   help="layer-averaged fractions of the visual tokens kept")
    p.add_argument("--positions", nargs="+", default=list(POSITION_MODES), choices=POSITION_MODES)
    p.add_argument("--budget-meaning", nargs="+", default=list(BUDGET_MEANINGS), choices=BUDGET_MEANINGS,
                   help="nominal: each method's own accounting; layer_average: equal layer-averaged tokens (both: "
                   "methods whose stages are the same under both run once)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--quick", action="store_true", help="smoke run: 24 samples, 3 methods, 2 budgets")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="eval-results")
    p.set_defaults(func=evaluate)
    p = sub.add_parser("matrix", help="run every method on every adapter's tiny model; print which pairs work")
    p.add_argument("--adapters", nargs="+", default=None)
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=matrix)
    p = sub.add_parser("contracts", help="what prunekit relies on in transformers, and how each item is spelled")
    p.set_defaults(func=contracts)
    p = sub.add_parser("list", help="list registered plugins")
    p.set_defaults(func=list_plugins)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (PrunekitError, ValueError, FileNotFoundError) as err:  # bad input: say why, no traceback
        print(f"prunekit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
