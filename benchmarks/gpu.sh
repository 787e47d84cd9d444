#!/usr/bin/env bash
# The GPU measurement the efficiency targets ask for, in one run (docs/performance.md):
#
#   * selection: TOPS's selection time next to the unpruned prefill of the real 7B language model (all 32
#     layers, random weights, bf16, built on the GPU) over N visual + 66 text tokens, at N = 576 / 2,880 / 10,816
#     with K = 128 / 256 / 4,096 (stage I keeps 2T: T = 64 at LLaVA-1.5's 576, T = 128 at LLaVA-NeXT's 2,880;
#     4,096 of LLaVA-Video's 64 x 169), at batch 1 and 8;
#   * model: end-to-end prefill (and decode, peak memory, exact FLOPs) of LLaVA-1.5-7B's shapes at full depth
#     (32 decoder + 24 vision layers, nothing scaled, random weights, bf16), unpruned vs TOPS vs VisionZip vs the
#     unpatched model on T tokens, at the same layer-averaged T = 64 and 128, at batch 1 and 8;
#   * host: benchmarks/prefill_syncs.py --host-time: a batch-1 prefill of LLaVA-1.5-7B's shapes (T = 64), unpruned,
#     VisionZip and TOPS, its wall time and the host time spent in prunekit's hooks (printed to gpu.log);
#   * kernels: benchmarks/gpu_selection.py: the Triton kernels' selections against the reference (the default
#     fused paths and the wide steps forced), device kernels and time per step by kernel, and the time of each
#     path (one program per sample, wide steps, step loop; eager and replayed from a CUDA graph).
#
# Usage, from the repository root, on a machine with one CUDA GPU (written for an H200; torch >= 2.4 with CUDA,
# transformers 5.16+, prunekit installed, e.g. `pip install --no-deps --no-build-isolation -e .` next to pydantic,
# pluggy, tqdm, matplotlib, pillow, safetensors):
#
#   benchmarks/gpu.sh OUT            # e.g. benchmarks/gpu.sh bench-gpu
#
# Writes 8 files: OUT/gpu.log (everything printed, each measurement as it is made), OUT/selection/{bench.json,
# bench.md, selection_time.png}, OUT/model/{bench.json, bench.md, speedup_llava_1_5_7b_shapes.png} and
# OUT/kernels/gpu_selection.json.
#
# Time: selection and model about 3 minutes on an H200 (one run), host about 1, kernels up to its limit. Each part
# runs under its own limit (SELECTION_LIMIT, MODEL_LIMIT, HOST_LIMIT, KERNELS_LIMIT seconds, default 130, 130, 90,
# 200): a part that reaches it is interrupted and still writes what it measured (bench.json says "interrupted";
# gpu_selection.json holds the parts it finished), and the other parts run anyway. The whole script stays under
# about 9 minutes.
#
# Environment:
#   GPU_SH_SMOKE=1   a dry run of the same steps on the CPU in float32 with tiny sizes (N = 64 / 256, feature width
#                    32, one-layer x 32 prefill of width 32, the tiny test model instead of the 7B): proves the script
#                    runs end to end without a GPU, in about 1-2 minutes on 2 cores. Its numbers mean nothing.
#   PYTHON           the interpreter (default: python3)
#   SELECTION_LIMIT, MODEL_LIMIT, HOST_LIMIT, KERNELS_LIMIT   seconds each part may run (default 130, 130, 90,
#                    200)
set -uo pipefail

OUT=${1:?usage: benchmarks/gpu.sh OUTPUT_FOLDER}
PY=${PYTHON:-python3}
SELECTION_LIMIT=${SELECTION_LIMIT:-130}
MODEL_LIMIT=${MODEL_LIMIT:-130}
KERNELS_LIMIT=${KERNELS_LIMIT:-200}
HOST_LIMIT=${HOST_LIMIT:-90}
export PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
mkdir -p "$OUT"
LOG="$OUT/gpu.log"
: > "$LOG"

if [ "${GPU_SH_SMOKE:-0}" = 1 ]; then
    DEVICE=(--device cpu --dtype float32)
    SELECTION=(--n 64 256 --k 16 64 --dim 32 --selection-prefill layer --repeats 1 --max-similarity-mib 16384)
    MODEL=(--model tiny --decoder-layers 4 --budgets 6 12 --repeats 1 --new-tokens 2)
    CHECK="import torch, prunekit"
    KERNELS=(--smoke --device cpu)
    HOST=(--device cpu --methods visionzip tops --repeats 2)
else
    DEVICE=(--device cuda --dtype bfloat16)
    # --max-similarity-mib 16384: TOPS holds the similarity matrices whole (float32 F and its int64 grid: 11.2 GB
    # at N = 10,816, batch 8) instead of recomputing rows on demand above the library's 1 GiB default; the naive
    # reference then costs ~N^2 per step from memory, and is extrapolated from 4 / 12 / 44 steps above N = 1,000.
    SELECTION=(--n 576 2880 10816 --k 128 256 4096 --dim 4096 --decoder-layers 32 --selection-prefill decoder
               --repeats 5 --max-similarity-mib 16384)
    MODEL=(--model 7b --decoder-layers 32 --vision-layers 24 --budgets 64 128 --repeats 5 --new-tokens 8)
    CHECK="import torch, prunekit; assert torch.cuda.is_available(), 'no CUDA device'"
    KERNELS=(--device cuda --parts exact steps time)
    HOST=(--device cuda --methods none visionzip tops --repeats 20)
fi

say() { echo "[gpu.sh $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

say "output: $OUT; smoke: ${GPU_SH_SMOKE:-0}; git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
"$PY" -c "$CHECK
import platform, transformers
print('python', platform.python_version(), 'torch', torch.__version__, 'transformers', transformers.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('gpu', p.name, round(p.total_memory / 2**30, 1), 'GiB')" 2>&1 | tee -a "$LOG" || { say "environment check failed"; exit 1; }

status=0
say "selection part (limit ${SELECTION_LIMIT} s)"
timeout -s INT -k 20 "$SELECTION_LIMIT" "$PY" -m prunekit.tools.cli bench --parts selection "${DEVICE[@]}" \
    "${SELECTION[@]}" --batch 1 8 --no-progress --out "$OUT/selection" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { say "selection part ended with status $rc"; status=1; }

say "model part (limit ${MODEL_LIMIT} s)"
timeout -s INT -k 20 "$MODEL_LIMIT" "$PY" -m prunekit.tools.cli bench --parts model "${DEVICE[@]}" "${MODEL[@]}" \
    --methods tops visionzip --budget-meaning layer_average --batch 1 8 --no-progress --out "$OUT/model" 2>&1 \
    | tee -a "$LOG"
rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { say "model part ended with status $rc"; status=1; }

say "host part (limit ${HOST_LIMIT} s)"
timeout -s INT -k 20 "$HOST_LIMIT" "$PY" benchmarks/prefill_syncs.py --host-time "${HOST[@]}" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { say "host part ended with status $rc"; status=1; }

say "kernels part (limit ${KERNELS_LIMIT} s)"
timeout -s INT -k 20 "$KERNELS_LIMIT" "$PY" benchmarks/gpu_selection.py "${KERNELS[@]}" --out "$OUT/kernels" 2>&1 \
    | tee -a "$LOG"
rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || { say "kernels part ended with status $rc"; status=1; }

say "done (status $status); files:"
find "$OUT" -type f | sort | tee -a "$LOG"
exit $status
