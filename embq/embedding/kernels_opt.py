"""Compiled (numba) kernel of embq's better range search (`int4-opt`, `int2-opt`): the candidate
schedule of `embq.embedding.opt_search.opt_qparams_numpy`, run in lockstep over rows in SIMD lanes
(LANES = 16 rows per block), in batches of up to 8 candidates per lane, with the same float32 /
float64 arithmetic, so it returns the same bits. The scalar fp16 helpers come from
`embq.embedding.kernels_greedy`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from embq.embedding.kernels_greedy import JIT_OPTIONS, fp16_bits, fp16r

LANES = 16  # rows per block of the better search: one AVX-512 register of float32

_JIT = JIT_OPTIONS

# --------------------------------------------------------------------------- better search

# Candidate buffer of the better search (float32), candidate g of lane l at g * LANES + l:
# scale, bias, inverse scale, loss sum; up to _G candidates per batch.
_G = 8
_CS, _CB, _CI, _CA = 0, _G * LANES, 2 * _G * LANES, 3 * _G * LANES
_NC = 4 * _G * LANES
# Lane state (float64): best score, its grid (i, j), its fp16 (scale, bias), the row's min,
# max and grid step, the batch's running minimum (value, index, NaN seen); then per candidate:
# score, grid (i, j), valid flag.
_QBEST, _QBI, _QBJ, _QBS, _QBB, _QMIN, _QMAX, _QSTEP = [k * LANES for k in range(8)]
_QM, _QK, _QNAN = 8 * LANES, 9 * LANES, 10 * LANES
_QSC = 11 * LANES
_QGI, _QGJ, _QOK = _QSC + _G * LANES, _QSC + 2 * _G * LANES, _QSC + 3 * _G * LANES
_NQ = _QSC + 4 * _G * LANES
# Sweep scratch (float32, constant offsets): bias and inverse scale of two candidates, and
# their running sums.
_WB0, _WI0, _WB1, _WI1, _WA0, _WA1 = [k * LANES for k in range(6)]
_NW = 6 * LANES
# the 8 neighbours (di, dj) in the order of rowwise._Candidates' ring
_RING_I = (-1, -1, -1, 0, 0, 1, 1, 1)
_RING_J = (-1, 0, 1, -1, 1, -1, 0, 1)

# Loops over lanes run to `nl` (== LANES, passed in at run time): LLVM fully unrolls a
# constant 16-trip loop with a small body and then fails to re-vectorise it; a run-time trip
# count keeps it a vector loop.


@njit(**_JIT)
def half_to_f32(h):
    """float32 value of the IEEE half bit pattern h (0..65535)."""
    e = (h >> 10) & 31
    m = h & 1023
    if e == 0:
        v = np.float32(m) * np.float32(5.9604644775390625e-08)  # m * 2^-24
    elif e == 31:
        v = np.float32(np.inf) if m == 0 else np.float32(np.nan)
    else:
        v = np.float32(1024 + m) * np.int32((e - 25 + 127) << 23).view(np.float32)
    return -v if h & 0x8000 else v


@njit(**_JIT)
def fp16_step(v, k):
    """The fp16 value k steps away from fp16 value v in value order (rowwise._fp16_step)."""
    h = fp16_bits(v)
    if h >= 32768:
        h -= 65536  # as int16
    key = -(h & 0x7FFF) if h < 0 else h
    key += k
    o = ((-key) | 0x8000) if key < 0 else key
    return half_to_f32(o & 0xFFFF)


@njit(**_JIT)
def _sweep_fast(W, xb, d, qmax):
    """Loss sums of two candidates per lane (W[_WB0/_WI0], W[_WB1/_WI1]) into W[_WA0/_WA1]:
    sum over j, in j order, float32, of (u - clamp(rint(u), 0, qmax))^2 with
    u = (x[j, l] - bias) * inv_scale; the residual of rowwise._fast_loss."""
    L = LANES
    zero = np.float32(0.0)
    for l in range(L):
        W[_WA0 + l] = zero
        W[_WA1 + l] = zero
    d8 = d - d % 8
    for j in range(0, d8, 8):
        for l in range(L):
            b0 = W[_WB0 + l]
            i0 = W[_WI0 + l]
            b1 = W[_WB1 + l]
            i1 = W[_WI1 + l]
            a0 = W[_WA0 + l]
            a1 = W[_WA1 + l]
            for k in range(8):
                x = xb[(j + k) * L + l]
                u = (x - b0) * i0
                q = np.rint(u)
                q = q if zero < q else zero  # np.clip: max first, then min
                q = qmax if qmax < q else q
                t = u - q
                a0 += t * t
                u = (x - b1) * i1
                q = np.rint(u)
                q = q if zero < q else zero
                q = qmax if qmax < q else q
                t = u - q
                a1 += t * t
            W[_WA0 + l] = a0
            W[_WA1 + l] = a1
    for j in range(d8, d):
        for l in range(L):
            x = xb[j * L + l]
            u = (x - W[_WB0 + l]) * W[_WI0 + l]
            q = np.rint(u)
            q = q if zero < q else zero
            q = qmax if qmax < q else q
            t = u - q
            W[_WA0 + l] += t * t
            u = (x - W[_WB1 + l]) * W[_WI1 + l]
            q = np.rint(u)
            q = q if zero < q else zero
            q = qmax if qmax < q else q
            t = u - q
            W[_WA1 + l] += t * t


@njit(**_JIT)
def _packer_qp(lo, hi, qmax):
    """(scale, bias) float32 as rowwise.qparams (the packer): a zero range, or a scale that
    rounds to 0 in fp16, gives scale 1."""
    b = fp16r(lo)
    rng = hi - b
    s = fp16r(rng / qmax)
    if rng == np.float32(0.0) or s == np.float32(0.0):
        s = np.float32(1.0)
    return s, b


@njit(**_JIT)
def _grid_batch(C, Q, W, xb, d, G, nl, qmax, n_bins):
    """Score the grid candidates Q[_QGI/_QGJ + g*L + l] (lo = min + i*step, hi = max - j*step
    in float64, rounded to float32; pairs outside i, j >= 0, i + j < n_bins are skipped) and
    keep each lane's best (rowwise._Candidates.grid)."""
    L = LANES
    for g in range(G):
        o = g * L
        for l in range(nl):
            i = Q[_QGI + o + l]
            j = Q[_QGJ + o + l]
            lo = np.float32(Q[_QMIN + l] + i * Q[_QSTEP + l])
            hi = np.float32(Q[_QMAX + l] - j * Q[_QSTEP + l])
            s, b = _packer_qp(lo, hi, qmax)
            C[_CS + o + l] = s
            C[_CB + o + l] = b
            C[_CI + o + l] = np.float32(1.0) / s
            ok = (i >= 0.0) & (j >= 0.0) & (i + j < n_bins)
            Q[_QOK + o + l] = 1.0 if ok else 0.0
    _score_keep(C, Q, W, xb, d, G, nl, qmax, np.int64(1))


@njit(**_JIT)
def _qp_batch(C, Q, W, xb, d, G, nl, qmax):
    """Score candidates (scale, bias) already in C[_CS/_CB]; scale <= 0 is skipped
    (rowwise._Candidates.qp)."""
    one = np.float32(1.0)
    for o in range(G * LANES):
        s = C[_CS + o]
        ok = s > np.float32(0.0)
        s = s if ok else one
        C[_CS + o] = s
        C[_CI + o] = one / s
        Q[_QOK + o] = 1.0 if ok else 0.0
    _score_keep(C, Q, W, xb, d, G, nl, qmax, np.int64(0))


@njit(**_JIT)
def _score_keep(C, Q, W, xb, d, G, nl, qmax, grid):
    """Evaluate a batch and keep, per lane, its best candidate if it beats the lane's best:
    rowwise._Candidates._keep (numpy argmin: the first NaN if any, else the first minimum)."""
    L = LANES
    for g in range(0, G, 2):
        g1 = g + 1 if g + 1 < G else g  # an odd batch sweeps its last candidate twice
        for l in range(nl):
            W[_WB0 + l] = C[_CB + g * L + l]
            W[_WI0 + l] = C[_CI + g * L + l]
            W[_WB1 + l] = C[_CB + g1 * L + l]
            W[_WI1 + l] = C[_CI + g1 * L + l]
        _sweep_fast(W, xb, d, qmax)
        for l in range(nl):
            C[_CA + g * L + l] = W[_WA0 + l]
            C[_CA + g1 * L + l] = W[_WA1 + l]
    for o in range(G * L):
        v = np.float64(C[_CS + o] * np.sqrt(C[_CA + o]))
        Q[_QSC + o] = v * v if Q[_QOK + o] != 0.0 else np.inf
    for l in range(nl):
        m = Q[_QSC + l]
        Q[_QM + l] = m
        Q[_QK + l] = 0.0
        Q[_QNAN + l] = 1.0 if m != m else 0.0
    for g in range(1, G):
        for l in range(nl):
            v = Q[_QSC + g * L + l]
            m = Q[_QM + l]
            nan = Q[_QNAN + l] != 0.0
            vnan = v != v
            take = (not nan) & (vnan | (v < m))
            Q[_QM + l] = v if take else m
            Q[_QK + l] = np.float64(g) if take else Q[_QK + l]
            Q[_QNAN + l] = 1.0 if (nan | vnan) else 0.0
    for l in range(nl):
        m = Q[_QM + l]
        if m < Q[_QBEST + l]:
            o = np.int64(Q[_QK + l]) * L + l
            Q[_QBEST + l] = m
            Q[_QBS + l] = C[_CS + o]
            Q[_QBB + l] = C[_CB + o]
            if grid != 0:
                Q[_QBI + l] = Q[_QGI + o]
                Q[_QBJ + l] = Q[_QGJ + o]


@njit(**_JIT)
def _ring(C, Q, W, xb, d, stride, nl, qmax, n_bins):
    """The 8 grid neighbours of each lane's best at `stride`, as one batch."""
    L = LANES
    for g in range(8):
        di = stride * _RING_I[g]
        dj = stride * _RING_J[g]
        for l in range(nl):
            Q[_QGI + g * L + l] = Q[_QBI + l] + di
            Q[_QGJ + g * L + l] = Q[_QBJ + l] + dj
    _grid_batch(C, Q, W, xb, d, np.int64(8), nl, qmax, n_bins)


@njit(**_JIT)
def _finish(C, Q, W, xb, d, nl, qmax, polish):
    """One least-squares refit of (scale, bias) to each lane's best codes, rounded to fp16
    (rowwise._ls_step, float64 sums in j order), then `polish` rounds of the 8 neighbouring
    fp16 (scale, bias)."""
    L = LANES
    zero = np.float32(0.0)
    for l in range(nl):
        s = np.float32(Q[_QBS + l])
        b = np.float32(Q[_QBB + l])
        inv = np.float32(1.0) / s
        sq = 0.0
        sqq = 0.0
        sxq = 0.0
        sx = 0.0
        for j in range(d):
            x = xb[j * L + l]
            t = np.rint((x - b) * inv)
            t = t if zero < t else zero
            t = qmax if qmax < t else t
            t64 = np.float64(t)
            x64 = np.float64(x)
            sq += t64
            sqq += t64 * t64
            sxq += t64 * x64
            sx += x64
        var = sqq - sq * sq / d
        cov = sxq - sq * sx / d
        s_new = cov / var if var > 0.0 else np.float64(s)
        b_new = (sx - s_new * sq) / d
        s_new = 0.0 if s_new < 0.0 else s_new  # np.maximum(s_new, 0.0)
        C[_CS + l] = fp16r(np.float32(s_new))
        C[_CB + l] = fp16r(np.float32(b_new))
    _qp_batch(C, Q, W, xb, d, np.int64(1), nl, qmax)
    for _ in range(polish):
        for g in range(8):
            di = _RING_I[g]
            dj = _RING_J[g]
            for l in range(nl):
                C[_CS + g * L + l] = fp16_step(np.float32(Q[_QBS + l]), di)
                C[_CB + g * L + l] = fp16_step(np.float32(Q[_QBB + l]), dj)
        _qp_batch(C, Q, W, xb, d, np.int64(8), nl, qmax)


@njit(**_JIT)
def _sort_lanes(sb, p2, nl):
    """Sort every lane's column of sb [p2, LANES] (p2 a power of two) ascending: a bitonic
    network, the compare-exchanges vectorised across lanes."""
    L = LANES
    k = 2
    while k <= p2:
        j = k // 2
        while j >= 1:
            for i in range(p2):
                m = i ^ j
                if m > i:
                    up = (i & k) == 0
                    oi = i * L
                    om = m * L
                    for l in range(nl):
                        a = sb[oi + l]
                        b = sb[om + l]
                        lo = a if a < b else b
                        hi = b if a < b else a
                        sb[oi + l] = lo if up else hi
                        sb[om + l] = hi if up else lo
            j //= 2
        k *= 2


@njit(**_JIT)
def _opt_load(x, rows, xb, Q, sb, ks, os_i, os_j, n_bins, nl):
    """Load the rows into the lanes and reset their best; for the 2-bit starts, the grid
    indices of the order statistics of rank ks[f] and d-1-ks[f] go to os_i / os_j[f*L + l]
    (sb: sort scratch, float32 [p2 * LANES], p2 >= d a power of two)."""
    L = LANES
    d = x.shape[1]
    for l in range(L):
        r = rows[l]
        mn = x[r, 0]
        mx = x[r, 0]
        for j in range(d):
            v = x[r, j]
            xb[j * L + l] = v
            mn = v if v < mn else mn
            mx = v if v > mx else mx
        Q[_QMIN + l] = np.float64(mn)
        Q[_QMAX + l] = np.float64(mx)
        Q[_QSTEP + l] = (np.float64(mx) - np.float64(mn)) / n_bins
        Q[_QBEST + l] = np.inf
        Q[_QBI + l] = 0.0
        Q[_QBJ + l] = 0.0
        Q[_QBS + l] = 1.0
        Q[_QBB + l] = 0.0
    if ks.shape[0] == 0:
        return
    p2 = sb.shape[0] // L
    for i in range(d * L):
        sb[i] = xb[i]
    for i in range(d * L, p2 * L):
        sb[i] = np.float32(np.inf)
    _sort_lanes(sb, p2, nl)
    for l in range(L):
        st = Q[_QSTEP + l]
        st = st if st > 0.0 else 1.0
        for f in range(ks.shape[0]):
            os_i[f * L + l] = np.rint((np.float64(sb[ks[f] * L + l]) - Q[_QMIN + l]) / st)
            os_j[f * L + l] = np.rint((Q[_QMAX + l] - np.float64(sb[(d - 1 - ks[f]) * L + l])) / st)


@njit(**_JIT)
def opt_rows(x, r0, r1, nl, qmax, n_bins, pi, pj, strides, far_strides, corner, ks, polish,
             out_s, out_b):
    """embq's better search (rowwise.opt_qparams, candidate for candidate) for rows r0..r1-1
    of x float32 [n, d]: per-row fp16 (scale, bias) into out_s / out_b.

    Args:
        nl: LANES (a run-time value on purpose, see above).
        qmax: float32 2^bits - 1. n_bins: float64 grid size.
        pi, pj: int64 grid starts, scored in batches of 8 after the order statistics.
        strides: the pattern-search strides around every row's best.
        far_strides, corner: then, for rows whose best has i or j > corner, these strides.
        ks: ranks k of the order-statistic starts (x_(k) and x_(d-1-k)), empty for none.
        polish: rounds of fp16 neighbours after the least-squares refit.
    """
    L = LANES
    d = x.shape[1]
    xb = np.zeros(d * L, np.float32)
    C = np.zeros(_NC, np.float32)
    Q = np.zeros(_NQ, np.float64)
    W = np.zeros(_NW, np.float32)
    p2 = 1
    while p2 < d:
        p2 *= 2
    sb = np.zeros(p2 * L if ks.shape[0] else 0, np.float32)
    rows = np.zeros(L, np.int64)
    os_i = np.zeros(ks.shape[0] * L, np.float64)
    os_j = np.zeros(ks.shape[0] * L, np.float64)
    m = r1 - r0
    far = np.zeros(m, np.int64)
    nfar = 0
    # state of the far rows after the common search
    f_best = np.zeros(m, np.float64)
    f_bi = np.zeros(m, np.float64)
    f_bj = np.zeros(m, np.float64)
    f_bs = np.zeros(m, np.float64)
    f_bb = np.zeros(m, np.float64)
    for blk in range(r0, r1, L):
        nr = min(L, r1 - blk)
        for l in range(L):
            rows[l] = blk + min(l, nr - 1)
        _opt_load(x, rows, xb, Q, sb, ks, os_i, os_j, n_bins, nl)
        for f in range(ks.shape[0]):  # (i, 0) and (0, j) at order statistics
            for l in range(L):
                Q[_QGI + l] = os_i[f * L + l]
                Q[_QGJ + l] = 0.0
                Q[_QGI + L + l] = 0.0
                Q[_QGJ + L + l] = os_j[f * L + l]
            _grid_batch(C, Q, W, xb, d, np.int64(2), nl, qmax, n_bins)
        for p0 in range(0, pi.shape[0], _G):
            g_n = min(_G, pi.shape[0] - p0)
            for g in range(g_n):
                vi = np.float64(pi[p0 + g])
                vj = np.float64(pj[p0 + g])
                for l in range(nl):
                    Q[_QGI + g * L + l] = vi
                    Q[_QGJ + g * L + l] = vj
            _grid_batch(C, Q, W, xb, d, g_n, nl, qmax, n_bins)
        for st in strides:
            _ring(C, Q, W, xb, d, np.float64(st), nl, qmax, n_bins)
        if far_strides.shape[0]:
            for l in range(nr):
                if Q[_QBI + l] > corner or Q[_QBJ + l] > corner:
                    far[nfar] = blk + l
                    f_best[nfar] = Q[_QBEST + l]
                    f_bi[nfar] = Q[_QBI + l]
                    f_bj[nfar] = Q[_QBJ + l]
                    f_bs[nfar] = Q[_QBS + l]
                    f_bb[nfar] = Q[_QBB + l]
                    nfar += 1
        _finish(C, Q, W, xb, d, nl, qmax, polish)
        for l in range(nr):
            out_s[blk + l] = np.float32(Q[_QBS + l])
            out_b[blk + l] = np.float32(Q[_QBB + l])
    # rows whose best lies outside the corner: a wider pattern search around it
    no_ks = ks[:0]
    for fb in range(0, nfar, L):
        nr = min(L, nfar - fb)
        for l in range(L):
            rows[l] = far[fb + min(l, nr - 1)]
        _opt_load(x, rows, xb, Q, sb, no_ks, os_i, os_j, n_bins, nl)
        for l in range(L):
            k = fb + min(l, nr - 1)
            Q[_QBEST + l] = f_best[k]
            Q[_QBI + l] = f_bi[k]
            Q[_QBJ + l] = f_bj[k]
            Q[_QBS + l] = f_bs[k]
            Q[_QBB + l] = f_bb[k]
        for st in far_strides:
            _ring(C, Q, W, xb, d, np.float64(st), nl, qmax, n_bins)
        _finish(C, Q, W, xb, d, nl, qmax, polish)
        for l in range(nr):
            out_s[rows[l]] = np.float32(Q[_QBS + l])
            out_b[rows[l]] = np.float32(Q[_QBB + l])
