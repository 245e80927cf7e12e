"""Compiled (numba) encoder of the cb4-shared format: `embq.embedding.codebook.shared_encode`
bit for bit, one row at a time (the numpy path there is the reference and the fallback).

Exactness. Every float64 operation of the reference is done here in the same order on the same
values; IEEE arithmetic then gives the same bits (NaN and infinities included). The parts numpy
does its own way are reproduced:

- Row sums (`sum`, `mean`, `std` along a row of a C-contiguous float64 array) follow numpy's
  pairwise summation (`pairwise_sum`): 8 interleaved accumulators over blocks of up to 128
  values, halves (cut at a multiple of 8) above that, and the reduction's identity 0.0 added
  first. `mean` is that sum / d, `std` the square root of the mean squared deviation.
- `np.searchsorted(mids, z, side="left")` is the number of midpoints below z, and NaN sorts
  last: the code counts midpoints with `not (mid >= z)`, which is `mid < z` for a number and
  true for NaN (code k - 1); the level is selected along the way (mids ascend, so the last
  midpoint passed names it).
- float64 -> float32 -> fp16 as `astype(float32)` then `to_fp16` (`kernels_greedy.fp16r`).
- The row minimum is normalised to +0.0 when it is a zero, as the reference does (which zero a
  min returns among +0.0 and -0.0 depends on its order); NaN in a row makes its minimum NaN.

No fastmath anywhere (it would reassociate the sums and contract multiply-adds). Loops over a
row's values write whole rows of scratch (elementwise, so they vectorise); the sums then read
the scratch in numpy's order.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from embq.embedding.kernels_greedy import JIT_OPTIONS, fp16r

_INLINE = dict(JIT_OPTIONS, inline="always")  # helpers, inlined: no calls with array arguments
_PW_BLOCK = 128  # numpy's PW_BLOCKSIZE


@njit(**_INLINE)
def block_sum(a, i0, n):
    """numpy's `pairwise_sum` of float64 a[i0:i0 + n] for n <= 128: sequential below 8 values,
    else 8 interleaved accumulators, added as a tree, then the values after the last whole 8."""
    if n < 8:
        res = 0.0
        for i in range(i0, i0 + n):
            res += a[i]
        return res
    r0, r1, r2, r3 = a[i0], a[i0 + 1], a[i0 + 2], a[i0 + 3]
    r4, r5, r6, r7 = a[i0 + 4], a[i0 + 5], a[i0 + 6], a[i0 + 7]
    for blk in range(1, n // 8):
        j = i0 + 8 * blk
        r0 += a[j]
        r1 += a[j + 1]
        r2 += a[j + 2]
        r3 += a[j + 3]
        r4 += a[j + 4]
        r5 += a[j + 5]
        r6 += a[j + 6]
        r7 += a[j + 7]
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    for i in range(i0 + n - n % 8, i0 + n):
        res += a[i]
    return res


@njit(**_INLINE)
def row_sum(a, d, stack):
    """`a[:d].sum()` as numpy reduces a row: the identity 0.0 plus numpy's `pairwise_sum`,
    which above 128 values adds the sums of two halves (the first cut to a multiple of 8).

    That recursion runs here on an explicit stack (numba's cache cannot reload recursive
    functions): stack int64 [>= 3 * 64 + 64] scratch. Entries (start, length, 0) are ranges to
    sum; (0, 0, 1) adds the two sums last pushed on the value stack (its top 64 slots).
    """
    if d <= _PW_BLOCK:
        return 0.0 + block_sum(a, 0, d)
    vals = stack[192:].view(np.float64)
    sp = 0  # entries on the work stack
    vp = 0  # sums on the value stack
    stack[0], stack[1], stack[2] = 0, d, 0
    sp = 1
    while sp:
        sp -= 1
        i0, n, join = stack[3 * sp], stack[3 * sp + 1], stack[3 * sp + 2]
        if join:
            vp -= 1
            vals[vp - 1] = vals[vp - 1] + vals[vp]
        elif n <= _PW_BLOCK:
            vals[vp] = block_sum(a, i0, n)
            vp += 1
        else:
            n2 = n // 2
            n2 -= n2 % 8
            # popped last to first: the first half, the second half, then their sum
            stack[3 * sp], stack[3 * sp + 1], stack[3 * sp + 2] = 0, 0, 1
            stack[3 * sp + 3], stack[3 * sp + 4], stack[3 * sp + 5] = i0 + n2, n - n2, 0
            stack[3 * sp + 6], stack[3 * sp + 7], stack[3 * sp + 8] = i0, n2, 0
            sp += 3
    return 0.0 + vals[0]


@njit(**_INLINE)
def levels16(z, d, mids, cbd, q, c):
    """`levels` for 16 levels, unrolled: the midpoints and levels stay in registers (LLVM
    cannot keep array elements there across the stores: the arrays might alias)."""
    m0, m1, m2, m3, m4, m5, m6, m7 = mids[0], mids[1], mids[2], mids[3], mids[4], mids[5], mids[6], mids[7]
    m8, m9, m10, m11, m12, m13, m14 = mids[8], mids[9], mids[10], mids[11], mids[12], mids[13], mids[14]
    c0, c1, c2, c3, c4, c5, c6, c7 = cbd[0], cbd[1], cbd[2], cbd[3], cbd[4], cbd[5], cbd[6], cbd[7]
    c8, c9, c10, c11, c12, c13, c14, c15 = cbd[8], cbd[9], cbd[10], cbd[11], cbd[12], cbd[13], cbd[14], cbd[15]
    for i in range(d):
        zi = z[i]
        b = not (m0 >= zi)
        n = np.int64(b)
        ci = c1 if b else c0
        b = not (m1 >= zi)
        n += b
        ci = c2 if b else ci
        b = not (m2 >= zi)
        n += b
        ci = c3 if b else ci
        b = not (m3 >= zi)
        n += b
        ci = c4 if b else ci
        b = not (m4 >= zi)
        n += b
        ci = c5 if b else ci
        b = not (m5 >= zi)
        n += b
        ci = c6 if b else ci
        b = not (m6 >= zi)
        n += b
        ci = c7 if b else ci
        b = not (m7 >= zi)
        n += b
        ci = c8 if b else ci
        b = not (m8 >= zi)
        n += b
        ci = c9 if b else ci
        b = not (m9 >= zi)
        n += b
        ci = c10 if b else ci
        b = not (m10 >= zi)
        n += b
        ci = c11 if b else ci
        b = not (m11 >= zi)
        n += b
        ci = c12 if b else ci
        b = not (m12 >= zi)
        n += b
        ci = c13 if b else ci
        b = not (m13 >= zi)
        n += b
        ci = c14 if b else ci
        b = not (m14 >= zi)
        n += b
        ci = c15 if b else ci
        q[i] = n
        c[i] = ci


@njit(**_INLINE)
def levels(z, d, mids, cbd, q, c):
    """Codes q[:d] = searchsorted(mids, z[:d], "left") (NaN last) and their levels c[:d] =
    cbd[q], for ascending mids."""
    if mids.shape[0] == 15:
        levels16(z, d, mids, cbd, q, c)
        return
    for i in range(d):
        q[i] = 0
        c[i] = cbd[0]
    for m in range(mids.shape[0]):  # one pass per midpoint, vectorised over the values
        mid = mids[m]
        nxt = cbd[m + 1]
        for i in range(d):
            below = not (mid >= z[i])
            q[i] += np.uint8(below)
            c[i] = nxt if below else c[i]


@njit(**JIT_OPTIONS)
def shared_rows(x, r0, r1, cbd, mids, lo_cb, rng_cb, cb_mean, cb_sd, rounds, s_out, o_out, codes, lost):
    """cb4-shared codes of rows r0..r1 of x float32 [n, d] (C-contiguous).

    cbd: the codebook as float64 [k], ascending; mids: float64 [k - 1], the midpoints of
    consecutive levels (as the reference computes them); lo_cb, rng_cb, cb_mean, cb_sd: the
    reference's scalars (lowest level, span floored at 1e-12, the moments, sd floored).
    Writes each row's fp16 scale and offset (as float32) to s_out / o_out [n], its codes to
    codes uint8 [n, d], and lost[r] = 1 where no candidate of the row is finite (else 0).
    """
    d = x.shape[1]
    xd = np.empty(d)  # the row in float64
    xm = np.empty(d)  # ... minus its mean
    e = np.empty(d)  # x - offset
    z = np.empty(d)  # (x - offset) / scale
    c = np.empty(d)  # the levels of the codes
    t = np.empty(d)  # the terms of a sum
    q = np.empty(d, np.uint8)  # codes
    stack = np.empty(256, np.int64)  # `row_sum`'s
    inf = np.inf
    for r in range(r0, r1):
        lo = x[r, 0]
        hi = x[r, 0]
        nan = False
        for i in range(d):
            v = x[r, i]
            lo = v if v < lo else lo
            hi = v if v > hi else hi
            nan |= v != v
            xd[i] = np.float64(v)
        if nan:  # numpy's min / max propagate NaN; NaN - NaN is not > 0, so the range is 1
            lo64 = np.nan
            rng = 1.0
        else:
            lo64 = np.float64(lo) + 0.0  # -0.0 -> +0.0
            rng = np.float64(hi) - lo64
            rng = rng if rng > 0 else 1.0
        mean = row_sum(xd, d, stack) / d
        for i in range(d):
            xm[i] = xd[i] - mean
            t[i] = xm[i] * xm[i]
        sd = np.sqrt(row_sum(t, d, stack) / d)

        best = inf
        bs = np.float32(1.0)
        bo = np.float32(0.0)
        for i in range(d):
            codes[r, i] = 0
        for start in range(2):
            if start == 0:  # min/max onto the end levels
                scale = rng / rng_cb
                off = lo64 - scale * lo_cb
            else:  # mean/std onto the table's moments
                scale = sd / cb_sd if sd > 0 else 1.0
                off = mean - scale * cb_mean
            for rd in range(rounds + 1):
                s16 = fp16r(np.float32(scale))
                s16 = s16 if s16 > 0 else np.float32(1.0)
                o16 = fp16r(np.float32(off))
                s32 = np.float64(s16)
                o32 = np.float64(o16)
                for i in range(d):
                    e[i] = xd[i] - o32
                    z[i] = e[i] / s32
                levels(z, d, mids, cbd, q, c)
                for i in range(d):
                    u = e[i] - s32 * c[i]
                    t[i] = u * u
                sse = row_sum(t, d, stack)
                if not (np.isfinite(s32) and np.isfinite(o32)):
                    sse = inf  # never kept
                if sse < best:
                    best = sse
                    bs = s16
                    bo = o16
                    for i in range(d):
                        codes[r, i] = q[i]
                if rd == rounds:
                    break
                cm = row_sum(c, d, stack) / d
                for i in range(d):
                    u = c[i] - cm
                    t[i] = u * u
                cc = row_sum(t, d, stack)
                for i in range(d):
                    t[i] = (c[i] - cm) * xm[i]
                cx = row_sum(t, d, stack)
                scale = cx / cc if (cc > 0 and cx > 0) else s32
                off = mean - scale * cm
        s_out[r] = bs
        o_out[r] = bo
        lost[r] = 0 if best < inf else 1
