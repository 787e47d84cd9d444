"""Time of one model-free selection, ``prunekit.select(method, ...)``, per greedy/DPP method and size (the reference
figures of docs/performance.md, "Kernel launches and host syncs per greedy step").

    python benchmarks/selection_time.py                         # tops scope divprune cdpruner, N = 576 / 2,880
    python benchmarks/selection_time.py --methods cdpruner --sizes 576:256 --repeats 9 --threads 2

Features and relevance are ``prunekit.tools.bench.clustered_features``'s (what ``prunekit bench`` times), and
CDPruner gets a 5-token random query. Prints the median over ``--repeats`` runs after one warm-up, and the spread.
To compare two versions of a selector, run the script at each commit on the same quiet machine.
"""

import argparse
import statistics
import time

import torch

import prunekit
from prunekit.tools.bench import clustered_features


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["tops", "scope", "divprune", "cdpruner"])
    p.add_argument("--sizes", nargs="+", default=["576:256", "2880:1280"], help="N:K pairs")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"D = {args.dim}, B = {args.batch}, {args.threads} threads, median of {args.repeats} (ms; spread max-min)")
    for size in args.sizes:
        n, k = (int(x) for x in size.split(":"))
        features, relevance = clustered_features(n, args.dim, batch=args.batch)
        query = torch.randn(args.batch, 5, args.dim, generator=torch.Generator().manual_seed(1))
        for method in args.methods:
            extra = {"query": query} if method == "cdpruner" else {}

            def run():
                return prunekit.select(method, features, relevance, k=k, **extra)

            run()  # warm-up
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                run()
                times.append((time.perf_counter() - start) * 1000)
            print(f"N = {n:>6}, K = {k:>5}  {method:<9} {statistics.median(times):9.1f} ms"
                  f"  (spread {max(times) - min(times):.1f})")


if __name__ == "__main__":
    main()
