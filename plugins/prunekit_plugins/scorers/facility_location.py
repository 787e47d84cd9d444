"""Information coverage: the marginal gain of the facility-location function on cosine similarity.

The gain of token ``i`` is ``c_i = Σ_{j∉S} max(0, F_ij − m_j)`` with ``m_j = max_{s∈S} F_js`` (0 before anything
is chosen). It is computed in exact integer arithmetic on F rounded to a fixed point grid of ``2^-s``
(``s = min(48, 60 − ⌈log2 N⌉)``, so no sum can overflow int64; float32 similarities above ``2^(23-s)`` in
magnitude are represented exactly). Exact sums do not depend on their order, so two registered scorers that
reach them in different ways return bit-identical gains:

* ``facility_location`` keeps the gains and updates them incrementally. Adding token ``p`` changes ``m_j`` only
  where ``F_jp > m_j`` (and removes ``p`` itself from the sum), so only those rows of F enter the update:
  ``O(N·|U|)`` per step instead of ``O(N²)``, with ``|U|`` shrinking as the set grows.
* ``facility_location_naive`` recomputes every gain from scratch at every step, as the spec writes it: the
  reference the incremental one is tested and benchmarked against.

Integer sums also make exact ties exact: two tokens whose gains are equal in real arithmetic (e.g. two tokens
that only cover each other) tie, and the selector's lowest-index rule decides, instead of float rounding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from prunekit.plugin import FusedTerm, Kernel, Scorer, ScorerRun, SelectionInput, hookimpl, same_buffer, take_rows

#: stands for "+inf" in fixed point: a term max(0, F - _OUT) is always 0
_OUT = 1 << 62
#: bytes per element of a block of grid rows while it is made and used (float rows, int64 rows, int64 result)
_BLOCK_BYTES = 16


def fixed_point_bits(num_tokens: int) -> int:
    """Fraction bits of the fixed-point grid: sums of ``N`` terms of size ≤ 2 stay below ``2^62``."""
    return min(48, 60 - math.ceil(math.log2(max(2, num_tokens))))


class _Fixed:
    """Similarities of one selection on the fixed-point grid, read from the :class:`SelectionInput`.

    When the input holds the whole float matrix and the cap leaves room, the grid matrix is held too (int64);
    otherwise rows are put on the grid as they are read. Rows are read a block at a time
    (:meth:`SelectionInput.block_rows`), so no work tensor outgrows the cap; sums over blocks are exact integers,
    so the block size never changes a result."""

    #: "+inf" on the grid (:data:`_OUT`), for the kernels
    OUT = _OUT

    def __init__(self, inputs: SelectionInput, hold: bool) -> None:
        self.inputs = inputs
        self.bits = fixed_point_bits(inputs.num_tokens)
        self.scale = float(2**self.bits)
        self.step: int | None = None
        #: the changed terms (index, old, new) from the reference PREPARE to the reference DELTA
        self.pending: tuple[Tensor, Tensor, Tensor] | None = None
        self.matrix = self._grid_matrix() if hold and inputs.hold(8) else None

    def _grid_matrix(self) -> Tensor:
        sim = self.inputs.similarity
        blocks = self.blocks(sim.shape[1])
        if len(blocks) == 1:
            return self.q(sim)
        out = torch.empty(sim.shape, dtype=torch.int64, device=sim.device)
        for start, end in blocks:
            out[:, start:end] = self.q(sim[:, start:end])
        return out

    def blocks(self, count: int) -> list[tuple[int, int]]:
        """``(start, end)`` spans of at most one work block of rows each, covering ``0..count``."""
        if self.step is None:  # fixed once the scorers have started (they reserve what they hold first)
            self.step = self.inputs.block_rows(_BLOCK_BYTES)
        return [(start, min(count, start + self.step)) for start in range(0, count, self.step)]

    def q(self, x: Tensor, owned: bool = False) -> Tensor:
        """``x`` on the grid (int64); ``owned``: ``x`` is a temporary that may be overwritten."""
        x = x.mul_(self.scale) if owned else x * self.scale
        return x.round_().to(torch.int64)

    def to_float(self, c: Tensor) -> Tensor:
        # float64 whatever the features: float32 would merge gains closer than 2^-24 into false ties
        return c.to(torch.float64) / self.scale

    def rows(self, index: Tensor) -> Tensor:
        """Grid rows ``[B, U, N]`` of the tokens ``index`` ``[B, U]`` (a new tensor; read many through blocks)."""
        if self.matrix is not None:
            return take_rows(self.matrix, index)
        return self.q(self.inputs.similarity_rows(index), owned=True)

    def column(self, picked: Tensor) -> Tensor:
        if self.matrix is not None:
            return take_rows(self.matrix, picked[:, None]).squeeze(1)
        return self.q(self.inputs.similarity_to(picked))  # shared with the other scorers of this pick

    def coverage(self, best: Tensor | None, chosen: Tensor) -> Tensor:
        """All ``c_i`` (int64) for the set ``chosen`` with best similarities ``best`` (None: the empty set)."""
        B, N = chosen.shape
        out = torch.empty(B, N, dtype=torch.int64, device=chosen.device)
        base = torch.zeros(B, N, dtype=torch.int64, device=chosen.device) if best is None else best
        open_ = (~chosen)[:, None, :]
        for start, end in self.blocks(N):
            if self.matrix is not None:
                rows = self.matrix[:, start:end]
            else:
                rows = self.q(self.inputs.similarity_block(start, end), owned=self.inputs.streamed)
            out[:, start:end] = (rows - base[:, None, :]).clamp_min_(0).mul_(open_).sum(-1)
            del rows  # before the next block is made: one block at a time
        return out


class _NaiveRun(ScorerRun):
    """Recomputes every gain from scratch when asked; keeps only the set and ``m``."""

    hold = False  # whether to hold the grid matrix (only worth it when rows are read every step)

    def __init__(self, inputs: SelectionInput, floor: float | None = None) -> None:
        self.fixed = _Fixed(inputs, hold=self.hold)
        self.floor = None if floor is None else round(floor * self.fixed.scale)  # the least m_j, on the grid
        B, N = inputs.features.shape[:2]
        device = inputs.features.device
        self.best: Tensor | None = None  # m_j on the grid
        self.chosen = torch.zeros(B, N, dtype=torch.bool, device=device)
        self.rows = torch.arange(B, device=device)

    def gains(self) -> Tensor:
        return self.fixed.to_float(self.fixed.coverage(self.best, self.chosen))

    def _grown(self, column: Tensor) -> Tensor:
        """``m`` once the token with similarities ``column`` joins the set."""
        if self.best is None:
            return column if self.floor is None else column.clamp_min(self.floor)
        return torch.maximum(self.best, column)

    def _add(self, picked: Tensor, best: Tensor) -> None:
        self.best = best
        self.chosen.scatter_(1, picked[:, None], True)  # no host value copied to the device (capturable)

    def update(self, picked: Tensor) -> None:
        self._add(picked, self._grown(self.fixed.column(picked)))


def _prepare_reference(fixed: _Fixed, picked: Tensor, best: Tensor, chosen: Tensor, index: Tensor, old: Tensor,
                       new: Tensor, count: Tensor) -> None:
    """The changed terms' list, handed to :func:`_delta_reference` as tensors of their own size (``fixed.pending``)
    rather than through the fixed-size buffers, which only the Triton pair needs: no copies on CPU."""
    B, N = best.shape
    column = fixed.column(picked)  # F[:, p] = F[p, :]
    if fixed.matrix is not None and torch.compiler.is_compiling():
        # traced (torch.compile): every term listed, so that no shape depends on values. A term that does not
        # change has old = new and adds nothing, a chosen one 0 and 0: the same exact sums (O(N²) per step)
        old = best.masked_fill(chosen, 0)
        torch.maximum(best, column, out=best)
        new = best.masked_fill(chosen, 0).scatter_(1, picked[:, None], _OUT)  # p leaves the sum
        fixed.pending = (None, old, new)
        chosen.scatter_(1, picked[:, None], True)
        return
    # j enters the update when m_j grows or j leaves the sum (j = p); chosen j never were in it.
    changed = (column > best).logical_and_(~chosen)
    changed.scatter_(1, picked[:, None], True)
    if B == 1:
        idx = changed[0].nonzero().T  # [1, U]
        o = best.gather(1, idx)
        torch.maximum(best, column, out=best)
        n = best.gather(1, idx)
        count.fill_(idx.shape[1])
    else:  # pad every sample to the largest U; a padding term has old = new = 0 and adds nothing
        counts = changed.sum(-1)
        idx = torch.sort((~changed).to(torch.int8), dim=-1, stable=True).indices[:, : int(counts.max())]
        valid = torch.arange(idx.shape[1], device=idx.device)[None, :] < counts[:, None]
        o = best.gather(1, idx).masked_fill_(~valid, 0)
        torch.maximum(best, column, out=best)
        n = best.gather(1, idx).masked_fill_(~valid, 0)
        count.copy_(counts)
    n.masked_fill_(idx == picked[:, None], _OUT)  # p leaves the sum: its term becomes 0
    fixed.pending = (idx, o, n)
    chosen.scatter_(1, picked[:, None], True)


def _delta_reference(fixed: _Fixed, index: Tensor, old: Tensor, new: Tensor, count: Tensor, gain: Tensor,
                     out: Tensor | None) -> None:
    index, old, new = fixed.pending
    fixed.pending = None
    # For new >= old: max(0, x - old) - max(0, x - new) = clamp(x, old, new) - old, one pass over the rows,
    # a block of rows at a time (exact integer sums: the blocks never change the result). Traced, every term is
    # listed (index None, see _prepare_reference): the blocks are the held matrix's rows, read in place.
    gain += old.sum(1, keepdim=True)
    for start, end in fixed.blocks(old.shape[1] if index is None else index.shape[1]):
        if index is None:
            rows, into = fixed.matrix[:, start:end], None  # a view of the held matrix: not clamped in place
        else:
            rows = into = fixed.rows(index[:, start:end])  # [B, u, N]: F[j, i] = F[i, j]
        gain -= torch.clamp(rows, old[:, start:end, None], new[:, start:end, None], out=into).sum(1)
        del rows, into  # before the next block is made: one block at a time
    if out is not None:
        out.copy_(gain).div_(fixed.scale)


#: after a pick: the new best similarities ``m``, and the list of tokens whose term changes (``index``, their
#: ``old`` and ``new`` m, ``count`` of them per sample), written on the device. A PREPARE and the DELTA after it
#: always run the same implementation (same device, same ``triton`` flag); the references pass the list in
#: ``_Fixed.pending`` instead of the buffers
PREPARE = Kernel("coverage_prepare", _prepare_reference,
                 "prunekit_plugins.scorers._coverage_triton:prepare")
#: the gains minus the change of the listed terms, ``Σ_u clamp(F_iu, old_u, new_u) − old_u`` (and, given ``out``,
#: the gains in float64 there)
DELTA = Kernel("coverage_delta", _delta_reference,
               "prunekit_plugins.scorers._coverage_triton:delta")


class _IncrementalRun(_NaiveRun):
    """Keeps the gains and updates only the rows whose ``m`` changed (see the module docstring).

    An update is two kernels (:data:`PREPARE`, :data:`DELTA`) over buffers allocated once, so it neither reads the
    host nor changes shape; the float gains are written straight into the selector's buffer (:meth:`gains_into`)."""

    hold = True

    def __init__(self, inputs: SelectionInput, floor: float | None = None) -> None:
        super().__init__(inputs, floor)
        self.gain: Tensor | None = None  # c_i on the grid, None until needed
        self._out: Tensor | None = None  # the selector's float64 buffer, current while _current
        self._current = False
        self._work: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    def gains(self) -> Tensor:
        if self.gain is None:
            self.gain = self.fixed.coverage(self.best, self.chosen)
        return self.fixed.to_float(self.gain)

    def gains_into(self, out: Tensor) -> None:
        if self.gain is None or not (self._current and same_buffer(self._out, out)):
            if self.gain is None:
                self.gain = self.fixed.coverage(self.best, self.chosen)
            out.copy_(self.gain).div_(self.fixed.scale)
            self._out, self._current = out, True

    def update(self, picked: Tensor) -> None:
        if self.best is None or self.gain is None:  # m jumps from 0 everywhere: recompute when next asked
            self._add(picked, self._grown(self.fixed.column(picked)))
            self.gain = None
            self._current = False
            return
        if self._work is None:
            B, N = self.chosen.shape
            device = self.chosen.device
            self._work = (torch.zeros(B, N, dtype=torch.int64, device=device),
                          torch.zeros(B, N, dtype=torch.int64, device=device),
                          torch.zeros(B, N, dtype=torch.int64, device=device),
                          torch.zeros(B, dtype=torch.int64, device=device))
        index, old, new, count = self._work
        device = self.chosen.device
        held = not self.fixed.inputs.streamed  # the Triton kernels read a held matrix
        PREPARE(device, self.fixed, picked, self.best, self.chosen, index, old, new, count, triton=held)
        DELTA(device, self.fixed, index, old, new, count, self.gain, self._out if self._current else None,
              triton=held)

    def fused(self) -> FusedTerm | None:
        inputs = self.fixed.inputs
        if self.best is None or self.gain is None or not self._current or inputs.streamed:
            return None
        return FusedTerm("coverage", similarity=inputs.similarity, best=self.best, chosen=self.chosen, gain=self.gain,
                         grid=self.fixed.matrix, scale=self.fixed.scale, out=_OUT)


class FacilityLocationCoverage(Scorer):
    """``c_i = Σ_{j∉S} max(0, F_ij − m_j)``, ``m_j = max_{s∈S} F_js``: how much new content token ``i`` covers.

    Exact integer sums, updated incrementally (see the module docstring). ``floor``: ``m_j`` never goes below it
    (SCOPE: 0, its running maximum starts from zeros, so a token unlike every chosen one is not covered more by
    a token unlike it too); None, as registered (TOPS): ``m_j`` is the plain maximum over the set."""

    name = "facility_location"
    capturable = True

    def __init__(self, floor: float | None = None) -> None:
        self.floor = floor

    def start(self, inputs: SelectionInput) -> ScorerRun:
        return _IncrementalRun(inputs, self.floor)


class NaiveFacilityLocationCoverage(Scorer):
    """The same gains as ``facility_location``, recomputed from scratch every step (``O(N²)``): the reference."""

    name = "facility_location_naive"

    def __init__(self, floor: float | None = None) -> None:
        self.floor = floor

    def start(self, inputs: SelectionInput) -> ScorerRun:
        return _NaiveRun(inputs, self.floor)


@hookimpl
def prunekit_register_scorers(register):
    register(FacilityLocationCoverage)
    register(NaiveFacilityLocationCoverage)
