"""The EMB4 GREEDY range search, bit for bit as ATen's `choose_qparams_optimized` runs it.

`greedy_ranges` runs the compiled kernel (`kernels_greedy.greedy_rows`); `greedy_ranges_numpy`
is the numpy reference it is tested against (and the fallback without numba). Both return ranges
for which `rowwise.encode_ranges` equals
`torch.ops.quantized.embedding_bag_{4,2}bit_prepack(w, True, n_bins, ratio)` byte for byte.
"""

from __future__ import annotations

import numpy as np

from embq.embedding.compiled import compiled_kernels
from embq.embedding.fp16 import F32, fp16_round
from embq.embedding.parallel import chunk_rows, run_chunks, run_rows
from embq.embedding.rowwise import qmax_of


def greedy_loss_exact(xt: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    """ATen `calculate_quant_loss`, bit for bit: the float32 L2 error of rows quantized with
    (lo, hi), summed sequentially over the row in float32, then sqrt.

    Args:
        xt: float32 [d, n], the rows TRANSPOSED (so the sum over axis 0 runs in row order and
            every numpy loop is contiguous over rows).
        lo, hi: float32 [n].
    Returns:
        float32 [n].
    """
    qmax = F32(qmax_of(bits))
    b = fp16_round(lo)
    rng = hi - b
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        s = np.where(rng == 0, F32(1.0), fp16_round(rng / qmax)).astype(F32)
        inv = np.where(s == 0, F32(1.0), F32(1.0) / np.where(s == 0, F32(1.0), s)).astype(F32)
    t = xt - b
    t *= inv
    np.rint(t, out=t)
    np.clip(t, 0, qmax, out=t)
    t *= s
    t += b
    np.subtract(xt, t, out=t)
    t *= t
    # float32 accumulation in element order: numpy reduces the outer axis of a C-contiguous
    # array one slice at a time (pairwise summation only applies along the contiguous axis).
    return np.sqrt(np.add.reduce(t, axis=0))


def _qp32(lo: np.ndarray, hi: np.ndarray, qmax: np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bias, scale, inv_scale) float32 as ATen `calculate_quant_loss` derives them from (lo, hi):
    unlike the packer, a scale that rounds to 0 stays 0 (and inv_scale is then 1)."""
    b = fp16_round(lo)
    rng = hi - b
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        s = fp16_round(rng / qmax)
        if not rng.all():
            s[rng == 0] = 1.0
        if s.all():
            inv = F32(1.0) / s
        else:
            inv = (F32(1.0) / np.where(s == 0, F32(1.0), s)).astype(F32)
    return b, s, inv


def fast_loss(xt: np.ndarray, b: np.ndarray, s: np.ndarray, inv: np.ndarray, qmax: np.float32,
               t: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The GREEDY loss up to rounding for g candidate qparams per row: ATen's codes (same
    float32 ops), the residual taken as scale * (u - code), summed in any order.

    Args:
        xt: float32 [d, n] (rows transposed). b, s, inv: float32 [g, n].
        t, q: float32 [g, d, n] scratch buffers.
    Returns:
        float32 [g, n].
    """
    np.subtract(xt[None], b[:, None, :], out=t)
    t *= inv[:, None, :]
    np.rint(t, out=q)
    np.clip(q, 0, qmax, out=q)
    t -= q
    t *= t
    return s * np.sqrt(np.add.reduce(t, axis=1))


def _first_min_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row min and max as std::min_element / max_element pick them: the first occurrence, so
    a row holding both -0.0 and 0.0 as its min gets the sign of the earlier one (which the
    fp16 bias keeps; numpy's min may return either)."""
    rows = np.arange(x.shape[0])
    return x[rows, x.argmin(axis=1)], x[rows, x.argmax(axis=1)]


def _greedy_exact_rows(x: np.ndarray, bits: int, n_bins: int, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """GREEDY computed with `greedy_loss_exact` only: ATen's loop, vectorised over rows.

    The plain reference the fast path falls back to (and is tested against). A row whose
    position stops moving (ATen would loop forever) stops there.
    """
    xt = np.ascontiguousarray(x.T)
    xmin, xmax = _first_min_max(x)
    step = (xmax - xmin) / F32(n_bins)
    thr = F32(np.float32(n_bins * (1.0 - ratio))) * step
    a, z = xmin.copy(), xmax.copy()
    ans_a, ans_z = xmin.copy(), xmax.copy()
    cur = greedy_loss_exact(xt, a, z, bits)
    best = cur.copy()
    live = np.flatnonzero(a + thr < z)
    while live.size:
        sub = np.ascontiguousarray(xt[:, live])
        al, zl, sl = a[live], z[live], step[live]
        left = greedy_loss_exact(sub, al + sl, zl, bits)
        right = greedy_loss_exact(sub, al, zl - sl, bits)
        c = cur[live]
        local = (c < left) & (c < right) & (c < best[live])
        best[live[local]] = c[local]
        ans_a[live[local]] = al[local]
        ans_z[live[local]] = zl[local]
        go_left = left < right  # ties move the upper edge
        new_a = np.where(go_left, al + sl, al)
        new_z = np.where(go_left, zl, zl - sl)
        moved = (new_a != al) | (new_z != zl)
        a[live], z[live] = new_a, new_z
        cur[live] = np.where(go_left, left, right)
        live = live[moved & (new_a + thr[live] < new_z)]
    return ans_a, ans_z


def _greedy_chunk(x: np.ndarray, bits: int, n_bins: int, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """GREEDY ranges of one chunk of rows x float32 [m, d]; see `greedy_ranges`.

    Every loss is first computed by `_fast_loss`. Its error against ATen's `greedy_loss_exact`
    is bounded per row: the distance of u = (x - bias) / scale to the nearest code is
    1-Lipschitz in u, so by the triangle inequality for L2 norms the two losses differ by at
    most sqrt(d) times the per-value error of the residual, which float32 rounding bounds by
    ~(max|x| + 3 * range) * 2^-24 (ATen rounds the level q*scale + bias and x - level; the fast
    pass rounds x - bias, the product by 1/scale and u - q); the two sequential float32 sums of
    d terms, the sqrts and the product by the scale add <= (d/2 + 3) * 2^-24 relative per loss
    (padded to 3 (d + 8) 2^-24 for the pair, 1.3e-5 at d = 64). Wherever a comparison the search makes is within
    twice that bound, the row's four losses in play are recomputed exactly before deciding.
    Rows still searching after the longest normal path (~n_bins * ratio steps; only rows whose
    position stops moving) are redone by `_greedy_exact_rows`.
    """
    m, d = x.shape
    qmax = F32(qmax_of(bits))
    xt = np.ascontiguousarray(x.T)
    t = np.empty((2, d, m), F32)
    q = np.empty_like(t)
    xmin, xmax = _first_min_max(x)
    step = (xmax - xmin) / F32(n_bins)
    thr = F32(np.float32(n_bins * (1.0 - ratio))) * step
    mag = np.maximum(np.abs(xmin), np.abs(xmax)) + F32(3.0) * (xmax - xmin)
    abs_tol = F32(4.0 * np.sqrt(d) * 2.0**-24) * mag  # 2x the bound: one per loss compared
    rel_tol = F32(3.0 * (d + 8) * 2.0**-24)  # 1.3e-5 at d = 64

    a, z = xmin.copy(), xmax.copy()
    ans_a, ans_z = xmin.copy(), xmax.copy()
    b0, s0, i0 = _qp32(a[None], z[None], qmax)
    cur = fast_loss(xt, b0, s0, i0, qmax, t[:1], q[:1])[0]
    if not s0.all():  # a scale that rounds to 0 breaks the fast residual: exact
        zero = np.flatnonzero(s0[0] == 0)
        cur[zero] = greedy_loss_exact(np.ascontiguousarray(xt[:, zero]), a[zero], z[zero], bits)
    best = cur.copy()
    active = a + thr < z
    lo2 = np.empty((2, m), F32)
    hi2 = np.empty((2, m), F32)
    diff = np.empty((4, m), F32)
    for it in range(int(n_bins * ratio) + 4):
        if not active.any():
            break
        np.add(a, step, out=lo2[0])
        lo2[1] = a
        hi2[0] = z
        np.subtract(z, step, out=hi2[1])
        b2, s2, i2 = _qp32(lo2, hi2, qmax)
        left, right = fast_loss(xt, b2, s2, i2, qmax, t, q)
        np.subtract(left, right, out=diff[0])
        np.subtract(cur, left, out=diff[1])
        np.subtract(cur, right, out=diff[2])
        np.subtract(cur, best, out=diff[3])
        if it == 0:
            diff[3] = np.inf  # best is cur itself: ATen's cur < best is false
        close = np.abs(diff).min(axis=0) <= abs_tol + rel_tol * cur
        if not s2.all():
            close |= (s2 == 0).any(axis=0)
        close &= active
        if close.any():
            idx = np.flatnonzero(close)
            k = idx.size
            ex = greedy_loss_exact(
                np.tile(xt[:, idx], (1, 4)),
                np.concatenate([lo2[0, idx], a[idx], a[idx], ans_a[idx]]),
                np.concatenate([z[idx], hi2[1, idx], z[idx], ans_z[idx]]),
                bits,
            )
            left[idx], right[idx], cur[idx], best[idx] = ex[:k], ex[k : 2 * k], ex[2 * k : 3 * k], ex[3 * k :]
            diff[0, idx] = left[idx] - right[idx]
            diff[1, idx] = cur[idx] - left[idx]
            diff[2, idx] = cur[idx] - right[idx]
            if it > 0:
                diff[3, idx] = cur[idx] - best[idx]
        go_left = diff[0] < 0  # ties move the upper edge, as in ATen
        if it > 0:
            # ATen: cur < left and cur < right and cur < best marks a new best range
            local = (diff[1] < 0) & (diff[2] < 0) & (diff[3] < 0) & active
            if local.any():
                np.copyto(best, cur, where=local)
                np.copyto(ans_a, a, where=local)
                np.copyto(ans_z, z, where=local)
        # rows no longer active keep moving here, harmlessly: nothing of theirs is read again
        np.copyto(a, lo2[0], where=go_left)
        np.copyto(z, hi2[1], where=~go_left)
        cur = np.where(go_left, left, right)
        active &= a + thr < z
    if active.any():
        stuck = np.flatnonzero(active)
        ans_a[stuck], ans_z[stuck] = _greedy_exact_rows(x[stuck], bits, n_bins, ratio)
    return ans_a, ans_z


def greedy_ranges(
    x: np.ndarray, bits: int, n_bins: int = 200, ratio: float = 0.16, chunk: int = 8192
) -> tuple[np.ndarray, np.ndarray]:
    """EMB4 GREEDY ranges, identical to ATen `choose_qparams_optimized`.

    Args:
        x: float32 [n, d], finite.
        bits: 4 or 2 (8 works too).
        n_bins, ratio: the step is range / n_bins; at most `ratio` of the range is clipped.
        chunk: at most this many rows per work item (items are shared by this thread and one
            pool thread per other core).
    Returns:
        (lo, hi) float32 [n] each; `encode_ranges(x, lo, hi, bits)` then equals
        `torch.ops.quantized.embedding_bag_{bits}bit_prepack(x, True, n_bins, ratio)`.

    Runs `kernels_greedy.greedy_rows`: ATen's scalar search compiled, rows side by side in
    SIMD lanes (32 per block), every loss summed in ATen's float32 order (so every comparison,
    and the result, is ATen's). Rows on which ATen would never terminate (the step is absorbed
    by float32 rounding, e.g. values near 1.0 with a range below ~1e-6, so the position stops
    moving while the stop test stays true) are returned at the best range found when the
    position stops changing. Falls back to `greedy_ranges_numpy` (same results) without numba.
    """
    kernels = compiled_kernels()
    if kernels is None:
        return greedy_ranges_numpy(x, bits, n_bins, ratio, chunk)
    x = np.ascontiguousarray(x, dtype=F32)
    n = x.shape[0]
    lo = np.empty(n, F32)
    hi = np.empty(n, F32)
    if n == 0:
        return lo, hi
    if x.shape[1] == 0:
        raise ValueError("greedy_ranges: rows of dimension 0 have no range")
    qmax, nb, min_bins = F32(qmax_of(bits)), F32(n_bins), F32(np.float32(n_bins * (1.0 - ratio)))
    run_rows(lambda r0, r1: kernels.greedy.greedy_rows(x, r0, r1, qmax, nb, min_bins, lo, hi), n, most=chunk)
    return lo, hi


def greedy_ranges_numpy(
    x: np.ndarray, bits: int, n_bins: int = 200, ratio: float = 0.16, chunk: int = 8192
) -> tuple[np.ndarray, np.ndarray]:
    """`greedy_ranges` in numpy: the reference the compiled kernel is tested against.

    Args:
        x: float32 [n, d], finite.
        bits: 4 or 2 (8 works too).
        n_bins, ratio: the step is range / n_bins; at most `ratio` of the range is clipped.
        chunk: rows per work item (chunks run on a thread pool, one thread per core).
    Returns:
        (lo, hi) float32 [n] each; `encode_ranges(x, lo, hi, bits)` then equals
        `torch.ops.quantized.embedding_bag_{bits}bit_prepack(x, True, n_bins, ratio)`.

    How: the search path depends only on comparisons between losses. A fast pass computes
    every loss with the same float32 codes as ATen but a cheaper residual; wherever two losses
    are closer than a proven bound on the fast pass's error, those rows are re-evaluated with
    `greedy_loss_exact` (ATen's exact float32 order), so every decision matches ATen's.

    Rows on which ATen would never terminate (the step is absorbed by float32 rounding, e.g.
    values near 1.0 with a range below ~1e-6, so the position stops moving while the stop test
    stays true) are returned at the best range found when the position stops changing.
    """
    x = np.ascontiguousarray(x, dtype=F32)
    n = x.shape[0]
    if n == 0:
        return np.zeros(0, F32), np.zeros(0, F32)
    chunk = chunk_rows(n, chunk)
    starts = list(range(0, n, chunk))
    lo = np.empty(n, F32)
    hi = np.empty(n, F32)

    def work(i: int) -> None:
        lo[i : i + chunk], hi[i : i + chunk] = _greedy_chunk(x[i : i + chunk], bits, n_bins, ratio)

    run_chunks(work, starts)
    return lo, hi
