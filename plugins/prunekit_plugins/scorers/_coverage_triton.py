"""Triton implementations of the facility-location update (see ``facility_location.PREPARE`` and ``DELTA``).

Imported only when a selection runs on CUDA tensors and Triton imports. Exact integer arithmetic on the same grid
as the reference (a float similarity is put on the grid as ``round_half_even(F · 2^s)``, as ``torch.round`` does),
so the gains are bit-identical. The number of rows an update touches varies from step to step; it is written to
the device by ``prepare`` and read there by ``delta`` as a loop bound, so neither waits for the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prunekit_plugins._triton_ops import listed_change, round_half_even

#: tokens per chunk of ``prepare``, changed rows per iteration and columns per program of ``delta`` (the tests
#: shrink them to run every loop several times)
PREPARE_BLOCK, DELTA_ROWS, DELTA_COLS = 4096, 16, 128


@triton.jit
def _prepare_kernel(src_ptr, scale, picked_ptr, picked_stride, best_ptr, chosen_ptr, index_ptr, old_ptr, new_ptr,
                    count_ptr, N, GRID: tl.constexpr, OUT: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    p = tl.load(picked_ptr + b * picked_stride)
    row = src_ptr + (b * N + p) * N  # F[b, p, :] = F[b, :, p]
    offs = tl.arange(0, BLOCK)
    base = b * N
    total = 0
    for start in range(0, N, BLOCK):
        j = start + offs
        m = j < N
        if GRID:
            col = tl.load(row + j, mask=m, other=0)
        else:
            col = round_half_even(tl.load(row + j, mask=m, other=0.0) * scale).to(tl.int64)
        best = tl.load(best_ptr + base + j, mask=m, other=0)
        chosen = tl.load(chosen_ptr + base + j, mask=m, other=1) != 0
        changed = (((col > best) & (chosen == 0)) | (j == p)) & m
        grown = tl.maximum(best, col)
        flag = changed.to(tl.int32)
        pos = total + tl.cumsum(flag, 0) - 1
        # every thread holding token j (several, when the chunk is smaller than the program's threads) has read its
        # old best before any writes the new one
        tl.debug_barrier()
        tl.store(index_ptr + base + pos, j.to(tl.int64), mask=changed)
        tl.store(old_ptr + base + pos, best, mask=changed)
        tl.store(new_ptr + base + pos, tl.where(j == p, OUT, grown), mask=changed)
        tl.store(best_ptr + base + j, grown, mask=m)
        total += tl.sum(flag, 0)
    tl.store(chosen_ptr + base + p, 1)
    tl.store(count_ptr + b, total.to(tl.int64))


@triton.jit
def _delta_kernel(src_ptr, scale, index_ptr, old_ptr, new_ptr, count_ptr, gain_ptr, out_ptr, N,
                  GRID: tl.constexpr, WRITE_OUT: tl.constexpr, BU: tl.constexpr, BI: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BI + tl.arange(0, BI)
    cm = cols < N
    base = b * N
    acc = listed_change(src_ptr, index_ptr, old_ptr, new_ptr, base, tl.load(count_ptr + b), cols, cm, N, scale,
                        GRID, BU, BI)
    gain = tl.load(gain_ptr + base + cols, mask=cm, other=0) - acc
    tl.debug_barrier()  # every thread holding a column (several, below the program's threads) has read it first
    tl.store(gain_ptr + base + cols, gain, mask=cm)
    if WRITE_OUT:
        tl.store(out_ptr + base + cols, gain.to(tl.float64) / scale, mask=cm)


def _source(fixed):
    """The held grid matrix (int64), or else the held float similarity, put on the grid as it is read."""
    if fixed.matrix is not None:
        return fixed.matrix, False
    if fixed.inputs.streamed:
        raise ValueError("the Triton coverage update reads a held similarity matrix; rows computed on demand "
                         "(streamed) take the reference")
    return fixed.inputs.similarity, True


def prepare(fixed, picked, best, chosen, index, old, new, count):
    """Same arguments and effect as ``facility_location._prepare_reference``."""
    src, is_float = _source(fixed)
    B, N = best.shape
    assert src.is_contiguous() and best.is_contiguous() and chosen.is_contiguous()
    block = min(PREPARE_BLOCK, triton.next_power_of_2(N))
    _prepare_kernel[(B,)](src, fixed.scale, picked, picked.stride(0), best, chosen.view(torch.uint8), index, old,
                          new, count, N, GRID=not is_float, OUT=fixed.OUT, BLOCK=block,
                          num_warps=4 if block <= 1024 else 8)


def delta(fixed, index, old, new, count, gain, out):
    """Same arguments and effect as ``facility_location._delta_reference``."""
    src, is_float = _source(fixed)
    B, N = gain.shape
    bi = min(DELTA_COLS, triton.next_power_of_2(N))
    _delta_kernel[(B, triton.cdiv(N, bi))](src, fixed.scale, index, old, new, count, gain,
                                          gain if out is None else out, N, GRID=not is_float,
                                          WRITE_OUT=out is not None, BU=DELTA_ROWS, BI=bi)
