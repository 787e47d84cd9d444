"""Peak memory and time of one TOPS selection with and without ``max_similarity_mib`` (the figures in
docs/methods/tops.md, "memory cap").

    python benchmarks/selection_memory.py                       # N = 20,000, D = 8, caps 0 and none, 1 thread
    python benchmarks/selection_memory.py --n 3000 --caps 0 1 4 16 64 none

Peak memory is torch's allocator peak above what was allocated before (``prunekit.tools.bench.peak_memory_mib``); the
script also checks that every capped selection equals the uncapped one.
"""

import argparse
import time

import torch

import prunekit
from prunekit.tools.bench import peak_memory_mib


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--d", type=int, default=8)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--caps", nargs="+", default=["0", "none"], help="MiB values, or 'none' for no cap")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    H = torch.randn(1, args.n, args.d, generator=g)
    r = torch.rand(1, args.n, generator=g)
    kept = {}
    print(f"N={args.n} D={args.d} k={args.k} threads={args.threads}, torch {torch.__version__}")
    for cap in args.caps:
        options = {} if cap == "none" else {"max_similarity_mib": float(cap)}
        out = []
        start = time.perf_counter()
        peak = peak_memory_mib(lambda: out.append(prunekit.select("tops", H, r, k=args.k, **options)),
                               torch.device("cpu"))
        seconds = time.perf_counter() - start
        kept[cap] = out[0]
        print(f"cap {cap:>5} MiB: peak {peak:10.1f} MiB, {seconds:6.1f} s (with the profiler on)")
    first = next(iter(kept.values()))
    assert all(torch.equal(v, first) for v in kept.values()), "a capped selection differs from another"
    print("every selection is the same")


if __name__ == "__main__":
    main()
