"""Rerun prunekit's efficiency benchmark (the figures in docs/performance.md).

    python benchmarks/bench.py --out docs/assets/bench-cpu            # CPU: 7B widths, 4 of 32 layers, scaled
    python benchmarks/bench.py --device cuda --dtype bfloat16 \\
        --decoder-layers 32 --vision-layers 24 --out docs/assets/bench-gpu  # a GPU: the real depth, no scaling
    benchmarks/gpu.sh OUT                                             # the GPU measurement of the targets, one run

Every option of ``prunekit bench`` is accepted (``--help``). Writes bench.json, bench.md and the plots.
"""

import sys

from prunekit.tools.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
