"""Compiled (numba) encoder of the cb4-shared format: `embq.embedding.codebook.shared_encode`
bit for bit (its numpy path, `shared_encode_numpy`, is the reference and the fallback).

Exactness. Every float64 operation of the reference is done here, in the same order, on the
same values; IEEE arithmetic then gives the same bits (NaN and infinities included). What numpy
does its own way is reproduced:

- Row sums (`sum`, `mean`, `std` along a row of a C-contiguous float64 array) follow numpy's
  pairwise summation (`row_sums`): 8 interleaved accumulators over blocks of up to 128 values,
  halves (the first cut to a multiple of 8) above that, the reduction's identity 0.0 added
  first. `mean` is that sum / d, `std` the square root of the mean squared deviation.
- `np.searchsorted(mids, z, side="left")` is the number of midpoints below z, NaN sorting last:
  `count` and `pick` step past a midpoint unless `mid >= z`, which for NaN is False. The level
  of a code is picked along the way (the midpoints ascend: the last one passed names it).
- float64 -> float32 -> fp16 as `astype(float32)` then `to_fp16` (`kernels_greedy.fp16r`).
- A zero row minimum is +0.0, as the reference makes it; NaN in a row makes its minimum NaN.

No fastmath anywhere (it would reassociate the sums and contract multiply-adds).

Speed (~1.3 us of CPU a row of dim 64; the numpy path takes ~24). Rows go LANES at a
time, value j of lane l at [j * LANES + l], so every step runs on all lanes at once, sums too
(each lane's in numpy's order). Most of the time is the code search: a division and 15
compare-and-selects per value for each of the 8 candidates (two starts x four rounds). Only
the levels are searched per candidate; the codes of the one kept are searched once at the end
(they depend only on its scale and offset).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from embq.embedding.kernels_greedy import JIT_OPTIONS, fp16r

_PW_BLOCK = 128  # numpy's PW_BLOCKSIZE

# Rows side by side: 32 float64 (four AVX-512 registers) measured faster than 16 or 64, and with
# 8 LLVM unrolls the loops over lanes instead of vectorising them. The lane state is one float64
# buffer P, field k of lane l at k * LANES + l: constant offsets from one base, so that LLVM
# needs no runtime alias checks between fields (as in kernels_greedy).
LANES = 32
(_LO, _HI, _RNG, _MEAN, _SD, _SCALE, _OFF, _S32, _O32, _SSE, _BEST, _CM, _CC, _CX, _BS, _BO,
 _NAN) = [k * LANES for k in range(17)]  # fmt: skip
_NP = 17 * LANES


@njit(**JIT_OPTIONS)
def block_sums(t, i0, n, out, acc):
    """numpy's `pairwise_sum` of values i0..i0 + n - 1 of every lane of t (value j of lane l at
    t[j * LANES + l]) into out[:LANES], for n <= 128: sequential below 8 values, else 8
    interleaved accumulators (acc: float64 [8 * LANES] scratch) added as a tree, then the values
    after the last whole 8."""
    L = LANES
    if n < 8:
        for l in range(L):
            out[l] = 0.0
        for j in range(i0, i0 + n):
            for l in range(L):
                out[l] += t[j * L + l]
        return
    for a in range(8 * L):
        acc[a] = t[i0 * L + a]
    for blk in range(1, n // 8):
        base = (i0 + 8 * blk) * L
        for a in range(8 * L):
            acc[a] += t[base + a]
    for l in range(L):
        out[l] = (((acc[l] + acc[L + l]) + (acc[2 * L + l] + acc[3 * L + l]))
                  + ((acc[4 * L + l] + acc[5 * L + l]) + (acc[6 * L + l] + acc[7 * L + l])))  # fmt: skip
    for j in range(i0 + n - n % 8, i0 + n):
        for l in range(L):
            out[l] += t[j * L + l]


@njit(**JIT_OPTIONS)
def row_sums(t, d, out, work):
    """Each lane's `sum` of its d values in t as numpy reduces a row, into out[:LANES]: the
    identity 0.0 plus numpy's `pairwise_sum`, which above 128 values adds the sums of two
    halves (the first cut to a multiple of 8).

    That recursion runs on an explicit stack (numba's cache cannot reload a recursive
    function). work: float64 [WORK] scratch: the accumulators, a value stack of 64 lane vectors,
    and the work stack (64 int64 triples: (start, length, 0) is a range to sum, (0, 0, 1) adds
    the two sums last pushed); ample for d < 2^37.
    """
    L = LANES
    acc = work[: 8 * L]
    if d <= _PW_BLOCK:
        block_sums(t, 0, d, out, acc)
    else:
        vals = work[8 * L : 72 * L]
        stack = work[72 * L :].view(np.int64)
        stack[0], stack[1], stack[2] = 0, d, 0
        sp = 1  # entries on the work stack
        vp = 0  # sums on the value stack
        while sp:
            sp -= 1
            i0, n, join = stack[3 * sp], stack[3 * sp + 1], stack[3 * sp + 2]
            if join:
                vp -= 1
                for l in range(L):
                    vals[(vp - 1) * L + l] = vals[(vp - 1) * L + l] + vals[vp * L + l]
            elif n <= _PW_BLOCK:
                block_sums(t, i0, n, vals[vp * L : (vp + 1) * L], acc)
                vp += 1
            else:
                n2 = n // 2
                n2 -= n2 % 8
                # popped last to first: the first half, the second half, then their sum
                stack[3 * sp], stack[3 * sp + 1], stack[3 * sp + 2] = 0, 0, 1
                stack[3 * sp + 3], stack[3 * sp + 4], stack[3 * sp + 5] = i0 + n2, n - n2, 0
                stack[3 * sp + 6], stack[3 * sp + 7], stack[3 * sp + 8] = i0, n2, 0
                sp += 3
        for l in range(L):
            out[l] = vals[l]
    for l in range(L):
        out[l] = 0.0 + out[l]


WORK = 72 * LANES + 192  # float64 slots of `row_sums`' scratch


@njit(**JIT_OPTIONS)
def row_means(t, d, out, work):
    """Each lane's numpy `mean` of its d values in t, into out[:LANES]: `row_sums` / d."""
    row_sums(t, d, out, work)
    for l in range(LANES):
        out[l] = out[l] / d


@njit(**JIT_OPTIONS)
def pick(z, mid, nxt, c):
    """One midpoint of the level search: the next level nxt if mid < z or z is NaN, else c."""
    return c if mid >= z else nxt


@njit(**JIT_OPTIONS)
def count(z, mid, n):
    """One midpoint of the code search: n + 1 if mid < z or z is NaN, else n."""
    return n if mid >= z else n + 1


@njit(**JIT_OPTIONS)
def shared_rows(x, r0, r1, cbd, mids, lo_cb, rng_cb, cb_mean, cb_sd, rounds, s_out, o_out, codes, lost):
    """cb4-shared codes of rows r0..r1 of x float32 [n, d] (C-contiguous), 16 levels.

    cbd: the codebook as float64 [16], ascending; mids: float64 [15], the midpoints of
    consecutive levels (as the reference computes them); lo_cb, rng_cb, cb_mean, cb_sd: the
    reference's scalars (lowest level, span floored at 1e-12, the moments, sd floored).
    Writes each row's fp16 scale and offset (as float32) to s_out / o_out [n], its codes to
    codes uint8 [n, d], and lost[r] = 1 where no candidate of the row is finite (else 0).
    The last block's spare lanes repeat its first row (their results are dropped).
    """
    d = x.shape[1]
    L = LANES
    m0, m1, m2, m3, m4, m5, m6, m7 = mids[0], mids[1], mids[2], mids[3], mids[4], mids[5], mids[6], mids[7]
    m8, m9, m10, m11, m12, m13, m14 = mids[8], mids[9], mids[10], mids[11], mids[12], mids[13], mids[14]
    c0, c1, c2, c3, c4, c5, c6, c7 = cbd[0], cbd[1], cbd[2], cbd[3], cbd[4], cbd[5], cbd[6], cbd[7]
    c8, c9, c10, c11, c12, c13, c14, c15 = cbd[8], cbd[9], cbd[10], cbd[11], cbd[12], cbd[13], cbd[14], cbd[15]
    P = np.empty(_NP)
    xb = np.empty(d * L)  # the rows, float64
    xm = np.empty(d * L)  # ... minus their means
    c = np.empty(d * L)  # the levels of the codes
    t = np.empty(d * L)  # terms of sums
    t2 = np.empty(d * L)
    q = np.empty(d * L, np.uint8)  # the codes of each lane's best candidate
    work = np.empty(WORK)
    inf = np.inf
    one32 = np.float32(1.0)
    for blk in range((r1 - r0 + L - 1) // L):  # (a stepped range() stops LLVM vectorising)
        rb = r0 + blk * L
        m = min(L, r1 - rb)
        for l in range(L):
            rr = rb + l if l < m else rb
            for j in range(d):
                xb[j * L + l] = np.float64(x[rr, j])
        # min and max (NaN propagates: a flag), mean and std
        for l in range(L):
            P[_LO + l] = xb[l]
            P[_HI + l] = xb[l]
            P[_NAN + l] = 0.0
        for j in range(d):
            for l in range(L):
                v = xb[j * L + l]
                P[_LO + l] = v if v < P[_LO + l] else P[_LO + l]
                P[_HI + l] = v if v > P[_HI + l] else P[_HI + l]
                P[_NAN + l] = 1.0 if v != v else P[_NAN + l]
        for l in range(L):
            nan = P[_NAN + l] != 0.0
            lo = np.nan if nan else P[_LO + l] + 0.0  # a zero minimum is +0.0
            u = P[_HI + l] - lo
            P[_LO + l] = lo
            P[_RNG + l] = u if u > 0 else 1.0  # NaN: 1, as numpy's NaN - NaN > 0 is False
        row_means(xb, d, P[_MEAN : _MEAN + L], work)
        for j in range(d):
            for l in range(L):
                u = xb[j * L + l] - P[_MEAN + l]
                xm[j * L + l] = u
                t[j * L + l] = u * u
        row_means(t, d, P[_SD : _SD + L], work)
        for l in range(L):
            P[_SD + l] = np.sqrt(P[_SD + l])
            P[_BEST + l] = inf
            P[_BS + l] = 1.0
            P[_BO + l] = 0.0
        for start in range(2):
            for l in range(L):
                if start == 0:  # min/max onto the end levels
                    sc = P[_RNG + l] / rng_cb
                    P[_OFF + l] = P[_LO + l] - sc * lo_cb
                else:  # mean/std onto the table's moments
                    sd = P[_SD + l]
                    sc = sd / cb_sd if sd > 0 else 1.0
                    P[_OFF + l] = P[_MEAN + l] - sc * cb_mean
                P[_SCALE + l] = sc
            for rd in range(rounds + 1):
                for l in range(L):  # the candidate in fp16 (float64 -> float32 -> fp16)
                    s16 = fp16r(np.float32(P[_SCALE + l]))
                    P[_S32 + l] = np.float64(s16 if s16 > 0 else one32)
                    P[_O32 + l] = np.float64(fp16r(np.float32(P[_OFF + l])))
                for j in range(d):  # levels of the codes searchsorted(mids, (x - o) / s), NaN last
                    for l in range(L):
                        s = P[_S32 + l]
                        u = xb[j * L + l] - P[_O32 + l]
                        zi = u / s
                        ci = pick(zi, m0, c1, c0)
                        ci = pick(zi, m1, c2, ci)
                        ci = pick(zi, m2, c3, ci)
                        ci = pick(zi, m3, c4, ci)
                        ci = pick(zi, m4, c5, ci)
                        ci = pick(zi, m5, c6, ci)
                        ci = pick(zi, m6, c7, ci)
                        ci = pick(zi, m7, c8, ci)
                        ci = pick(zi, m8, c9, ci)
                        ci = pick(zi, m9, c10, ci)
                        ci = pick(zi, m10, c11, ci)
                        ci = pick(zi, m11, c12, ci)
                        ci = pick(zi, m12, c13, ci)
                        ci = pick(zi, m13, c14, ci)
                        ci = pick(zi, m14, c15, ci)
                        c[j * L + l] = ci
                        w = u - s * ci
                        t[j * L + l] = w * w
                row_sums(t, d, P[_SSE : _SSE + L], work)
                for l in range(L):  # keep the better (a non-finite candidate never is)
                    s32 = P[_S32 + l]
                    o32 = P[_O32 + l]
                    sse = P[_SSE + l] if (np.isfinite(s32) and np.isfinite(o32)) else inf
                    b = sse < P[_BEST + l]
                    P[_BEST + l] = sse if b else P[_BEST + l]
                    P[_BS + l] = s32 if b else P[_BS + l]
                    P[_BO + l] = o32 if b else P[_BO + l]
                if rd == rounds:
                    break
                # least squares: scale = cov(c, x) / var(c), offset = mean(x) - scale * mean(c)
                row_means(c, d, P[_CM : _CM + L], work)
                for j in range(d):
                    for l in range(L):
                        u = c[j * L + l] - P[_CM + l]
                        t[j * L + l] = u * u
                        t2[j * L + l] = u * xm[j * L + l]
                row_sums(t, d, P[_CC : _CC + L], work)
                row_sums(t2, d, P[_CX : _CX + L], work)
                for l in range(L):
                    cc = P[_CC + l]
                    cx = P[_CX + l]
                    sc = cx / cc if (cc > 0 and cx > 0) else P[_S32 + l]
                    P[_SCALE + l] = sc
                    P[_OFF + l] = P[_MEAN + l] - sc * P[_CM + l]
        # the codes of each lane's best candidate (a function of its scale and offset: searched
        # again once instead of kept for every candidate); a lost row keeps codes 0
        for j in range(d):
            for l in range(L):
                zi = (xb[j * L + l] - P[_BO + l]) / P[_BS + l]
                n = count(zi, m0, 0)
                n = count(zi, m1, n)
                n = count(zi, m2, n)
                n = count(zi, m3, n)
                n = count(zi, m4, n)
                n = count(zi, m5, n)
                n = count(zi, m6, n)
                n = count(zi, m7, n)
                n = count(zi, m8, n)
                n = count(zi, m9, n)
                n = count(zi, m10, n)
                n = count(zi, m11, n)
                n = count(zi, m12, n)
                n = count(zi, m13, n)
                n = count(zi, m14, n)
                q[j * L + l] = n if P[_BEST + l] < inf else 0
        for l in range(m):
            r = rb + l
            s_out[r] = np.float32(P[_BS + l])
            o_out[r] = np.float32(P[_BO + l])
            lost[r] = 0 if P[_BEST + l] < inf else 1
            for j in range(d):
                codes[r, j] = q[j * L + l]
