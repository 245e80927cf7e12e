"""embq's better range search for row-wise formats (`int4-opt`, `int2-opt`).

`opt_qparams` runs the compiled kernel (`kernels_opt.opt_rows`); `opt_qparams_numpy` is the numpy
reference it is tested against (same candidates, same arithmetic, same bits). `opt_ranges` turns
the chosen fp16 (scale, bias) into ranges for `rowwise.encode_ranges`.
"""

from __future__ import annotations

import numpy as np

from embq.embedding.compiled import compiled_kernels
from embq.embedding.fp16 import F32, fp16_round, fp16_step
from embq.embedding.greedy import fast_loss
from embq.embedding.parallel import chunk_rows, run_chunks, run_rows
from embq.embedding.rowwise import qmax_of, qparams


class _Candidates:
    """Evaluates batches of clipping ranges for a chunk of rows and keeps each row's best fp16
    (scale, bias). Scores are `_fast_loss` squared (the packer's float32 codes, residuals
    summed in float32: relative error ~1e-5 at worst, plenty to rank candidates)."""

    def __init__(self, x: np.ndarray, bits: int, n_bins: int) -> None:
        self.bits = bits
        self.qmax = F32(qmax_of(bits))
        self.xt = np.ascontiguousarray(x.T)  # [d, n]
        x64 = x.astype(np.float64)
        self.xmin, self.xmax = x64.min(axis=1), x64.max(axis=1)
        self.step = (self.xmax - self.xmin) / n_bins
        self.n_bins = n_bins
        n = x.shape[0]
        self.best = np.full(n, np.inf)
        self.best_i = np.zeros(n, np.int64)
        self.best_j = np.zeros(n, np.int64)
        self.best_s = np.ones(n, F32)
        self.best_b = np.zeros(n, F32)
        self._buf: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _score(self, s: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Squared error float64 [g, n] for g candidate (scale, bias) float32 [g, n]."""
        g = s.shape[0]
        if g not in self._buf:
            shape = (g, *self.xt.shape)
            self._buf[g] = (np.empty(shape, F32), np.empty(shape, F32))
        t, q = self._buf[g]
        loss = fast_loss(self.xt, b, s, (F32(1.0) / s).astype(F32), self.qmax, t, q)
        return loss.astype(np.float64) ** 2

    def _keep(self, sse: np.ndarray, s: np.ndarray, b: np.ndarray,
              i: np.ndarray | None = None, j: np.ndarray | None = None) -> None:
        k = sse.argmin(axis=0)
        cols = np.arange(sse.shape[1])
        v = sse[k, cols]
        better = v < self.best
        self.best = np.where(better, v, self.best)
        self.best_s = np.where(better, s[k, cols], self.best_s)
        self.best_b = np.where(better, b[k, cols], self.best_b)
        if i is not None:
            self.best_i = np.where(better, i[k, cols], self.best_i)
            self.best_j = np.where(better, j[k, cols], self.best_j)

    def grid(self, i: np.ndarray, j: np.ndarray) -> None:
        """Try lo = min + i*step, hi = max - j*step for int [g, n] (or broadcastable) i, j;
        pairs outside i, j >= 0, i + j < n_bins are skipped."""
        n = self.xmin.shape[0]
        i, j = np.broadcast_arrays(np.asarray(i), np.asarray(j))
        i = np.broadcast_to(i, (i.shape[0], n))
        j = np.broadcast_to(j, (j.shape[0], n))
        ok = (i >= 0) & (j >= 0) & (i + j < self.n_bins)
        lo = (self.xmin + i * self.step).astype(F32)
        hi = (self.xmax - j * self.step).astype(F32)
        s16, b16, _ = qparams(lo.ravel(), hi.ravel(), self.bits)
        s = s16.astype(F32).reshape(i.shape)
        b = b16.astype(F32).reshape(i.shape)
        self._keep(np.where(ok, self._score(s, b), np.inf), s, b, i, j)

    def qp(self, s: np.ndarray, b: np.ndarray) -> None:
        """Try fp16-exact (scale, bias) float32 [g, n]; scale <= 0 is skipped."""
        ok = s > 0
        s = np.where(ok, s, F32(1.0)).astype(F32)
        self._keep(np.where(ok, self._score(s, b), np.inf), s, b)


def _batches(pairs: list[tuple[int, int]], size: int):
    """Split (i, j) pairs into int arrays [g, 1] of at most `size` candidates."""
    for k in range(0, len(pairs), size):
        a = np.array(pairs[k : k + size], np.int64)
        yield a[:, :1], a[:, 1:]


def _ls_step(xt: np.ndarray, s: np.ndarray, b: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """One least-squares refit of the grid b + s*k to the codes of (s, b), rounded to fp16."""
    d = xt.shape[0]
    t = xt - b
    t *= (F32(1.0) / s).astype(F32)
    np.rint(t, out=t)
    np.clip(t, 0, qmax_of(bits), out=t)
    # float64 sums in element order (the outer axis of a C-contiguous array is reduced one
    # slice at a time), as the compiled kernel sums them
    t64 = t.astype(np.float64)
    x64 = xt.astype(np.float64)
    sq = np.add.reduce(t64, axis=0)
    sqq = np.add.reduce(t64 * t64, axis=0)
    sxq = np.add.reduce(t64 * x64, axis=0)
    sx = np.add.reduce(x64, axis=0)
    var = sqq - sq * sq / d
    cov = sxq - sq * sx / d
    ok = var > 0
    s_new = np.where(ok, cov / np.where(ok, var, 1.0), s)
    b_new = (sx - s_new * sq) / d
    return fp16_round(np.maximum(s_new, 0.0)), fp16_round(b_new)


def _opt_plan(bits: int, n_bins: int, d: int) -> dict:
    """The candidate schedule of the better search (shared by the numpy and compiled paths):
    grid starts `pairs` (scored in batches of 8, in order), pattern-search `strides`, the
    wider `far_strides` for rows whose best lies outside the `corner`, `ks` (ranks of the
    order-statistic starts, scored first) and `polish` rounds."""
    corner = 10
    if bits >= 4:
        pairs = [(i, j) for i in range(0, n_bins, 50) for j in range(0, n_bins - i, 50)]
        pairs += [(i, j) for i in range(0, corner + 1, 2) for j in range(0, corner + 1, 2)
                  if (i, j) not in pairs]
        return dict(pairs=pairs, strides=(1,), far_strides=(16, 8, 4, 2, 1), corner=corner,
                    ks=(), polish=1)
    pairs = [(i, j) for i in range(0, n_bins, 20) for j in range(0, n_bins - i, 20)]
    # one end kept, the other clipped at an order statistic: a heavy-tailed row's outlier
    # can deserve a level of its own while the other levels fit the bulk
    ks = tuple(min(int(round(f * (d - 1))), (d - 1) // 2) for f in (0.02, 0.05, 0.1, 0.16, 0.25))
    return dict(pairs=pairs, strides=(10, 5, 2, 1), far_strides=(), corner=corner, ks=ks, polish=2)


def opt_qparams(x: np.ndarray, bits: int, n_bins: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """embq's better range search (`int4-opt`, `int2-opt`): per-row fp16 (scale, bias)
    minimising the squared error, judged against `exhaustive_ranges`.

    On the (i, j) grid lo = min + i*step, hi = max - j*step (step = range / n_bins), it keeps
    the best range visited (not GREEDY's strict local minimum) over:
      1. starts: at 4+ bits a stride-2 grid over the low-clipping corner i, j <= 10, where
         the optimum almost always lies; at 2 bits ranges between order statistics (2% to
         25% of the values clipped at each end, also skewed or at one end only, as an outlier
         can deserve a level of its own), since the 4-level optimum clips
         15-40% of the range, beyond GREEDY's 16% reach; both plus a stride-50 grid over the
         whole triangle i + j < n_bins for unusual rows;
      2. a pattern search: the 8 neighbours of the best at strides (10, 5, 2, 1) at 2 bits;
         at 4+ bits stride 1, and (16, 8, 4, 2, 1) only for rows whose best is outside the
         corner;
      3. one least-squares refit of (scale, bias) to the best codes, rounded to fp16;
      4. the 8 neighbouring fp16 values of (scale, bias), twice at 2 bits; this leaves the
         grid, so the result can beat the exhaustive grid optimum.
    About 65 (4-bit) to 110 (2-bit) range evaluations per row; no clipping limit.

    Runs the compiled `kernels_opt.opt_rows` (16 rows per SIMD register), which scores
    the same candidates in the same order with the same float32 / float64 arithmetic as
    `opt_qparams_numpy`, so both return the same bits (tested); the numpy version runs where
    numba is unavailable.

    Args:
        x: float32 [n, d], finite. bits: 2, 4 or 8.
    Returns:
        (scale, bias) float32 [n] each, exactly representable in fp16, scale > 0.
    """
    kernels = compiled_kernels()
    x = np.ascontiguousarray(x, dtype=F32)
    n, d = x.shape
    if kernels is None or n == 0 or d == 0:
        return opt_qparams_numpy(x, bits, n_bins)
    plan = _opt_plan(bits, n_bins, d)
    pairs = np.array(plan["pairs"], np.int64).reshape(-1, 2)
    args = (F32(qmax_of(bits)), float(n_bins), np.ascontiguousarray(pairs[:, 0]),
            np.ascontiguousarray(pairs[:, 1]), np.array(plan["strides"], np.int64),
            np.array(plan["far_strides"], np.int64), float(plan["corner"]),
            np.array(plan["ks"], np.int64), int(plan["polish"]))
    scale = np.empty(n, F32)
    bias = np.empty(n, F32)
    run_rows(lambda r0, r1: kernels.opt.opt_rows(x, r0, r1, kernels.opt.LANES, *args, scale, bias), n, least=128)
    return scale, bias


def opt_qparams_numpy(x: np.ndarray, bits: int, n_bins: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """`opt_qparams` in numpy: the reference the compiled kernel is tested against."""
    x = np.ascontiguousarray(x, dtype=F32)
    c = _Candidates(x, bits, n_bins)
    ring = np.array([(di, dj) for di in (-1, 0, 1) for dj in (-1, 0, 1) if di or dj])
    plan = _opt_plan(bits, n_bins, x.shape[1])
    corner, strides, polish = plan["corner"], plan["strides"], plan["polish"]
    if plan["ks"]:
        xs = np.sort(x, axis=1).astype(np.float64)
        d = x.shape[1]
        step = np.where(c.step > 0, c.step, 1.0)  # constant rows: every range is the same
        for k in plan["ks"]:
            i = np.rint((xs[:, k] - c.xmin) / step).astype(np.int64)
            j = np.rint((c.xmax - xs[:, d - 1 - k]) / step).astype(np.int64)
            c.grid(np.stack([i, np.zeros_like(i)]), np.stack([np.zeros_like(j), j]))
    for i, j in _batches(plan["pairs"], 8):
        c.grid(i, j)
    for stride in strides:
        c.grid(c.best_i[None] + stride * ring[:, :1], c.best_j[None] + stride * ring[:, 1:])
    if plan["far_strides"]:
        far = np.flatnonzero((c.best_i > corner) | (c.best_j > corner))
        if far.size:  # rare rows (e.g. one extreme outlier): search around their best
            sub = _Candidates(x[far], bits, n_bins)
            sub.best, sub.best_i, sub.best_j = c.best[far], c.best_i[far], c.best_j[far]
            sub.best_s, sub.best_b = c.best_s[far], c.best_b[far]
            for stride in plan["far_strides"]:
                sub.grid(sub.best_i[None] + stride * ring[:, :1], sub.best_j[None] + stride * ring[:, 1:])
            c.best[far], c.best_s[far], c.best_b[far] = sub.best, sub.best_s, sub.best_b
    s1, b1 = _ls_step(c.xt, c.best_s, c.best_b, bits)
    c.qp(s1[None], b1[None])
    for _ in range(polish):
        s0, b0 = c.best_s, c.best_b
        c.qp(np.stack([fp16_step(s0, ds) for ds, _ in ring]),
             np.stack([fp16_step(b0, db) for _, db in ring]))
    return c.best_s, c.best_b


def ranges_for_qparams(scale: np.ndarray, bias: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) float32 [n] for which `qparams(lo, hi, bits)` gives exactly fp16 (scale, bias),
    so any (scale, bias) can go through `encode_ranges` / `..._prepack_with_rowwise_min_max`."""
    lo = bias.astype(F32)
    qmax = F32(qmax_of(bits))
    hi = (lo + scale.astype(F32) * qmax).astype(F32)
    for _ in range(4):  # float32 rounding of lo + scale*qmax can land next to the intended scale
        got = fp16_round((hi - lo) / qmax)
        off = got != scale
        if not off.any():
            break
        direction = np.sign(scale - got).astype(F32)
        hi = np.where(off, np.nextafter(hi, hi + direction * np.float32(np.inf)), hi).astype(F32)
    return lo, hi


def opt_ranges(x: np.ndarray, bits: int, n_bins: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Ranges (lo, hi) float32 [n] of `opt_qparams` (embq's better search, `int{4,2}-opt`)."""
    x = np.ascontiguousarray(x, dtype=F32)
    if x.shape[0] == 0:
        return np.zeros(0, F32), np.zeros(0, F32)
    if compiled_kernels() is not None:
        return ranges_for_qparams(*opt_qparams(x, bits, n_bins), bits)
    out_lo = np.empty(x.shape[0], F32)
    out_hi = np.empty(x.shape[0], F32)
    chunk = chunk_rows(x.shape[0], 1024)  # [8, d, 1024] float32 buffers stay cache-sized

    def work(i: int) -> None:
        sc, bi = opt_qparams_numpy(x[i : i + chunk], bits, n_bins)
        out_lo[i : i + chunk], out_hi[i : i + chunk] = ranges_for_qparams(sc, bi, bits)

    run_chunks(work, list(range(0, x.shape[0], chunk)))
    return out_lo, out_hi
