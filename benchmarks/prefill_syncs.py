"""Host reads of one pruned prefill, per method (docs/performance.md, "Fewer host reads since").

    python benchmarks/prefill_syncs.py                                # CPU: the tiny LLaVA, every registered method
    python benchmarks/prefill_syncs.py --per-sample                   # CPU: launches at batch 1 and 4
    python benchmarks/prefill_syncs.py --depth                        # CPU: batch 1 at LLaVA-1.5-7B's depths
    python benchmarks/prefill_syncs.py --host-time                    # CPU: host time of that prefill, ms
    python benchmarks/prefill_syncs.py --device cuda --host-time      # the same on a GPU, the 7B's shapes
    python benchmarks/prefill_syncs.py --decode                       # CPU: one decode step after that prefill
    python benchmarks/prefill_syncs.py --device cuda --methods tops visionzip divprune --profile

CPU: operations that read the device, counted with ``prunekit.testing.count_ops`` over one prefill of the tiny
LLaVA (4 decoder layers, 64 visual tokens) after a first one, at ``--keep`` tokens (nominal budgets; PDrop at 24,
its schedule's least), as tests/test_runtime_syncs.py counts them. ``--per-sample``: instead, kernel-launching
operations of one prefill at batch 1 and 4 (``prunekit.tools.bench.model_inputs``: every sample the same prompt;
``--kv-heads 4``: the tiny LLaVA with multi-head attention, as LLaVA-1.5's) and what each extra sample adds, as tests/test_runtime_syncs.py's ``PER_SAMPLE`` ceilings count them (docs/
performance.md, "The batch at once"). ``--depth``: instead, the kernel-launching operations of one batch-1 prefill
(T = 64 layer-averaged tokens) of a LLaVA with LLaVA-1.5-7B's depths (32 decoder and 24 vision layers, 576 patches,
multi-head attention) at tiny widths, split into those of the greedy selections (which a GPU replays from a CUDA
graph, a handful of launches each) and the rest (each a launch from Python on a GPU: the host time that bounds a
batch-1 prefill there). ``--host-time``: instead, the wall time of that prefill on one CPU thread with 64 patches
(112 px images; the widths make compute small, so the time is mostly Python and dispatch: what bounds a GPU's
batch-1 prefill) and each greedy selection's indices replayed after its first call (as a GPU replays the
selection from its CUDA graph; every prefill is the same prompt, so the indices are the selection's), median over
``--repeats`` prefills, beside VisionZip's, with the time spent in prunekit's hooks (its host work in a
forward; in all and by hook); with ``--device cuda`` the same at the 7B's shapes (T = 64), the selections
replayed from their graphs.
``--decode``: instead, the host reads and launches of one decode step after that depth model's prefill. To count
another commit's code, put its checkout first on ``PYTHONPATH``
(its root and its ``plugins``).

CUDA: LLaVA-1.5-7B's shapes at full depth (random weights, bf16, ``prunekit.tools.bench.build_model``), T = 64
layer-averaged tokens, batch 1; the synchronising calls ``torch.cuda.set_sync_debug_mode("warn")`` reports during
one prefill after three, by the prunekit lines that made them; ``--profile``: the profiler's table of that prefill
(host and device time, launches).
"""

from __future__ import annotations

import argparse
import collections
import traceback
import warnings

import torch

import prunekit


def on_cpu(methods, keep: int) -> None:
    from prunekit.testing import count_ops, tiny_llava, tiny_llava_inputs

    for method in methods:
        torch.manual_seed(0)
        model = tiny_llava(num_layers=4)
        inputs = tiny_llava_inputs(model)
        prunekit.build(method, model, keep_tokens=24 if method == "pdrop" else keep, budget_meaning="nominal")
        with torch.no_grad():
            model(**inputs)
            _, count = count_ops(lambda: model(**inputs))
        print(f"{method:<14} host reads {count.syncs:3d}  launches {count.launches:5d}  {dict(count.sync_names)}")


def per_sample(methods, keep: int, kv_heads: int = 2) -> None:
    from prunekit.testing import count_ops, tiny_llava
    from prunekit.tools.bench import model_inputs

    for method in methods:
        launches = {}
        for batch in (1, 4):
            torch.manual_seed(0)
            model = tiny_llava(num_layers=4, num_key_value_heads=kv_heads)
            inputs = model_inputs(model, batch=batch)
            prunekit.build(method, model, keep_tokens=24 if method == "pdrop" else keep, budget_meaning="nominal")
            with torch.no_grad():
                model(**inputs)
                _, count = count_ops(lambda: model(**inputs))
            launches[batch] = count.launches, count.syncs
        (one, reads_one), (four, reads_four) = launches[1], launches[4]
        print(f"{method:<14} launches at batch 1 {one:5d}, at 4 {four:5d}, per extra sample {(four - one) / 3:6.1f}; "
              f"host reads {reads_one} and {reads_four}")


def _deep_config(image_size: int = 336):
    """A LLaVA config with LLaVA-1.5-7B's depths (32 decoder, 24 vision layers; 576 patches at 336 px) and
    multi-head attention, at tiny widths."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=24, num_attention_heads=2,
                              image_size=image_size, patch_size=14, projection_dim=32)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=32064, pad_token_id=0, max_position_embeddings=4096)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000)


def at_depth(methods) -> None:
    """Launches of one batch-1 prefill of a LLaVA with LLaVA-1.5-7B's depths at tiny widths (what a GPU's host pays
    per launch does not depend on the width), split into the greedy selections' and the rest."""
    from transformers import LlavaForConditionalGeneration

    from prunekit.testing import count_ops
    from prunekit.tools.bench import model_inputs
    from prunekit_plugins.selectors.greedy import GreedySelector

    config = _deep_config()
    inner = GreedySelector._select
    selections = []

    def counted(self, inputs, k):  # the selection's own launches, counted inside the prefill's count
        out, count = count_ops(inner, self, inputs, k)
        selections.append(count.launches)
        return out

    GreedySelector._select = counted
    try:
        for method in methods:
            torch.manual_seed(0)
            model = LlavaForConditionalGeneration(config).eval()
            inputs = model_inputs(model, batch=1)
            if method != "none":
                prunekit.build(method, model, keep_tokens=64, budget_meaning="layer_average")
            with torch.no_grad():
                model(**inputs, logits_to_keep=1)
                selections.clear()
                _, count = count_ops(lambda: model(**inputs, logits_to_keep=1))
            inside = sum(selections)
            report = prunekit.pruning_report(model) if method != "none" else None
            tokens = "576 visual tokens" if report is None else \
                f"{report.layer_average[0]:.1f} of {report.visual_tokens[0]} visual tokens (layer average)"
            print(f"{method:<14} launches {count.launches:5d}: {inside:4d} in {len(selections)} greedy selections, "
                  f"{count.launches - inside:5d} outside them; host reads {count.syncs}; {tokens}")
    finally:
        GreedySelector._select = inner


def decode_step(methods) -> None:
    """Host reads and launches of one decode step after a batch-1 prefill, at LLaVA-1.5-7B's depths (tiny widths,
    576 patches, T = 64): a decode step of generate at batch 1 is bound by the host too."""
    from transformers import LlavaForConditionalGeneration

    from prunekit.testing import count_decode_step
    from prunekit.tools.bench import model_inputs

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(_deep_config()).eval()
    inputs = model_inputs(model, batch=1)
    for method in methods:
        if method != "none":
            prunekit.build(method, model, keep_tokens=64, budget_meaning="layer_average")
        count = count_decode_step(model, inputs)
        report = prunekit.pruning_report(model) if method != "none" else None
        tokens = "576 visual tokens" if report is None else \
            f"{report.layer_average[0]:.1f} of {report.visual_tokens[0]} visual tokens (layer average)"
        print(f"{method:<14} decode step: launches {count.launches:5d}, host reads {count.syncs}; prefill: {tokens}")
        if method != "none":
            prunekit.remove(model)


def host_time(methods, keep: int, repeats: int, device: str = "cpu") -> dict[str, float]:
    """Median wall time (ms) of a batch-1 prefill and the time spent in prunekit's hooks, printed beside
    VisionZip's (when measured). CPU: LLaVA-1.5-7B's depths at tiny widths, 64 patches, one thread, each greedy
    selection replayed after its first call. CUDA: LLaVA-1.5-7B's shapes at full depth (random weights, bf16), the
    selections replayed from the library's own CUDA graphs; the wall time ends at a synchronisation, the hooks'
    time is the host's (including its waits at the prefill's reads of the device)."""
    import statistics
    import time

    from transformers import LlavaForConditionalGeneration

    from prunekit.tools.bench import build_model, model_inputs
    from prunekit_plugins.selectors.greedy import GreedySelector

    inner = GreedySelector._select
    replays: dict = {}

    def replayed(self, inputs, k):  # the same prompt every prefill: the first call's indices are the selection's
        key = (tuple((type(scorer), weight) for scorer, weight in self.terms), self.combine,
               tuple(inputs.features.shape), k)
        if key not in replays:
            replays[key] = inner(self, inputs, k)
        return replays[key].clone()

    spent = [0.0]
    by_hook: collections.Counter = collections.Counter()  # hook name -> seconds, over the timed prefills
    calls: collections.Counter = collections.Counter()

    def timed(hook):  # a hook of the model's modules, its time added to ``spent`` and to its name's
        name = getattr(getattr(hook, "func", hook), "__qualname__", type(hook).__name__)

        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                took = time.perf_counter() - start
                spent[0] += took
                by_hook[name] += took
                calls[name] += 1
        return run

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)
        GreedySelector._select = replayed
    times: dict[str, float] = {}
    torch.manual_seed(0)
    if cuda:  # built once (a 7B takes a while): each method patches it and is removed after
        model, _ = build_model("7b", decoder_layers=32, vision_layers=24, dtype=torch.bfloat16, device="cuda")
        patches = 576
    else:
        model = LlavaForConditionalGeneration(_deep_config(image_size=112)).eval()
        patches = 64
    inputs = model_inputs(model, batch=1)
    try:
        for method in methods:
            if method != "none":
                prunekit.build(method, model, keep_tokens=keep, budget_meaning="layer_average")
            for module in model.modules():  # prunekit's work in a forward runs in its hooks (not transformers')
                for hooks in (module._forward_pre_hooks, module._forward_hooks):
                    for key, hook in list(hooks.items()):
                        owner = getattr(getattr(hook, "func", hook), "__module__", None) or type(hook).__module__
                        if owner.startswith("prunekit"):
                            hooks[key] = timed(hook)
            with torch.no_grad():
                for _ in range(5):
                    model(**inputs, logits_to_keep=1)
                sync()
                runs, hooked = [], []
                by_hook.clear()
                calls.clear()
                for _ in range(repeats):
                    spent[0] = 0.0
                    start = time.perf_counter()
                    model(**inputs, logits_to_keep=1)
                    sync()
                    runs.append((time.perf_counter() - start) * 1e3)
                    hooked.append(spent[0] * 1e3)
            times[method] = statistics.median(runs)
            in_hooks = statistics.median(hooked)
            report = prunekit.pruning_report(model) if method != "none" else None
            tokens = f"{patches} visual tokens" if report is None else \
                f"{report.layer_average[0]:.1f} of {report.visual_tokens[0]} visual tokens (layer average)"
            ratio = f", {times[method] / times['visionzip']:.3f}x VisionZip's" if "visionzip" in times else ""
            print(f"{method:<14} {times[method]:7.2f} ms (min {min(runs):.2f}){ratio}; in prunekit's hooks "
                  f"{in_hooks:5.2f} ms; {tokens}", flush=True)
            if by_hook:  # mean per prefill, by hook (a layer's hook counted once per layer it runs at)
                print("    by hook: " + ", ".join(
                    f"{name} {seconds / repeats * 1e3:.2f} ms ({calls[name] // repeats}x)"
                    for name, seconds in by_hook.most_common()), flush=True)
            if method != "none":
                prunekit.remove(model)
    finally:
        GreedySelector._select = inner
        torch.set_num_threads(threads)
    return times


def on_cuda(methods, profile: bool) -> None:
    from prunekit.tools.bench import build_model, model_inputs

    model, _ = build_model("7b", decoder_layers=32, vision_layers=24, dtype=torch.bfloat16, device="cuda")
    inputs = model_inputs(model)

    def prefill():
        with torch.no_grad():
            model(**inputs, logits_to_keep=1)

    for method in methods:
        prunekit.build(method, model, keep_tokens=64, budget_meaning="layer_average")
        for _ in range(3):
            prefill()
        torch.cuda.synchronize()
        sites: collections.Counter = collections.Counter()

        def seen(message, category, filename, lineno, file=None, line=None):
            frames = [f for f in traceback.extract_stack() if "prunekit" in f.filename]
            sites[" <- ".join(f"{f.filename.rsplit('/', 3)[-1]}:{f.lineno}" for f in frames[-2:][::-1])] += 1

        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = seen
            prefill()
        torch.cuda.set_sync_debug_mode("default")
        print(f"== {method}: {sum(sites.values())} host syncs")
        for site, n in sites.most_common(12):
            print(f"  {n:3d}  {site}")
        if profile:
            from torch.profiler import ProfilerActivity, profile as profiler

            with profiler(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                prefill()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))
        prunekit.remove(model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered method (CPU), tops "
                                                                "visionzip divprune (CUDA)")
    p.add_argument("--keep", type=int, default=None,
                   help="tokens kept (default 8; --host-time: 16, the layer average)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--per-sample", action="store_true", help="CPU: launches at batch 1 and 4, and per extra sample")
    p.add_argument("--depth", action="store_true",
                   help="CPU: launches at batch 1 of LLaVA-1.5-7B's depths at tiny widths, outside the selections")
    p.add_argument("--host-time", action="store_true",
                   help="wall time of a batch-1 prefill and the time in prunekit's hooks (CPU: the --depth model "
                        "with 64 patches, selections replayed; CUDA: the 7B's shapes)")
    p.add_argument("--decode", action="store_true",
                   help="CPU: reads and launches of one decode step after a prefill at LLaVA-1.5-7B's depths")
    p.add_argument("--repeats", type=int, default=40, help="--host-time: prefills timed per method")
    p.add_argument("--kv-heads", type=int, default=2, choices=[1, 2, 4],
                   help="--per-sample: the tiny LLaVA's key heads for its 4 query heads (4: multi-head, as LLaVA-1.5)")
    args = p.parse_args()
    if args.decode:
        decode_step(args.methods or ["none", "visionzip", "divprune", "fastv", "tops"])
    elif args.host_time:
        host_time(args.methods or ["none", "visionzip", "divprune", "fastv", "tops"],
                  args.keep or (16 if args.device == "cpu" else 64), args.repeats, args.device)
    elif args.device == "cpu" and args.depth:
        at_depth(args.methods or ["none", "visionzip", "divprune", "fastv", "tops"])
    elif args.device == "cpu" and args.per_sample:
        per_sample(args.methods or prunekit.list_methods(), args.keep or 8, args.kv_heads)
    elif args.device == "cpu":
        on_cpu(args.methods or prunekit.list_methods(), args.keep or 8)
    else:
        on_cuda(args.methods or ["tops", "visionzip", "divprune"], args.profile)


if __name__ == "__main__":
    main()
