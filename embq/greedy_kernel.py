"""Compiled (numba) kernels for `embq.rowwise`: the EMB4 GREEDY range search bit for bit as ATen
does it, the fused SBHalf encoder, and the candidate scoring of embq's better search.

Exactness. ATen's `calculate_quant_loss` sums the squared residuals of a row sequentially in
float32, and GREEDY's path depends on exact comparisons between those sums, so the loss must be
computed with exactly ATen's float32 operations in ATen's order. Vectorising along a row would
reorder the sum; instead the kernels put ROWS in SIMD lanes (structure of arrays, a block of
rows side by side, stored transposed as `xb[j * lanes + lane]`): every lane runs ATen's scalar
loop unchanged while LLVM vectorises the loop over lanes. No fastmath anywhere: numba emits no
fused multiply-add unless asked (contraction is off; the byte-identity tests would catch one),
and `np.rint` is LLVM's `rint` (round half to even in the default rounding mode).

GREEDY (`greedy_rows`, GLANES = 32 rows per block: two AVX-512 registers, so the latency of the
per-step divisions and square roots overlaps) runs its lanes independently: when a lane's row
finishes (ATen's loop ends, or its position stops moving, where ATen would loop forever), the
lane writes its answer and takes the next row, so a slow row never holds up others. Each loss
costs 10 vector operations per value (ATen's), ~0.3 us per row at dim 64 on one core.

The better search (`opt_rows`, LANES = 16 rows per block) runs the candidate schedule of
`rowwise.opt_qparams_numpy` in lockstep, in batches of up to 8 candidates per lane, with the
same float32 / float64 arithmetic, so it returns the same bits.

fp16 rounding (`fp16r`) is done with float32 arithmetic on a power-of-two quantum taken from the
exponent bits: round half to even, fp16 subnormals, and overflow to +-inf (|x| >= 65520) as
numpy / torch / c10::Half convert; it vectorises.

All functions take C-contiguous float32 rows; `embq.rowwise` prepares the arguments and splits
the rows between threads (the kernels release the GIL).
"""

from __future__ import annotations

import numpy as np
from numba import njit

LANES = 16  # rows per block of the better search: one AVX-512 register of float32

_JIT = dict(cache=True, nogil=True, error_model="numpy")


# --------------------------------------------------------------------------- scalar helpers


@njit(**_JIT)
def fp16r(v):
    """float32 v rounded to the nearest fp16 value (ties to even), returned as float32;
    |v| >= 65520 gives +-inf, NaN stays NaN."""
    v = np.float32(v)
    u = v.view(np.int32)
    e = (u >> 23) & 0xFF
    qe = max(e, 113) - 10  # biased exponent of the fp16 quantum at v (2^-24 below 2^-14)
    q = np.int32(qe << 23).view(np.float32)
    iq = np.int32((254 - qe) << 23).view(np.float32)
    r = np.rint(v * iq) * q  # both products are exact: power-of-two scalings, in range
    if abs(r) > np.float32(65504.0):
        r = np.int32((u & np.int32(-2147483648)) | np.int32(0x7F800000)).view(np.float32)
    return r


@njit(**_JIT)
def fp16_bits(v):
    """The IEEE half bit pattern (as int) of a float32 v that is exactly an fp16 value (or
    +-inf / NaN)."""
    v = np.float32(v)
    u = v.view(np.int32)
    sign = (u >> 16) & 0x8000
    e = (u >> 23) & 0xFF
    if e == 0xFF:  # inf / NaN
        return sign | 0x7C00 | (0x200 if (u & 0x7FFFFF) else 0)
    if e >= 113:  # normal fp16
        return sign | ((e - 112) << 10) | ((u >> 13) & 0x3FF)
    # fp16 subnormal (or zero): an integer multiple of 2^-24
    return sign | np.int32(abs(v) * np.float32(16777216.0))


@njit(**_JIT)
def _aten_qp(lo, hi, qmax):
    """(bias, scale, inverse scale) as ATen `calculate_quant_loss` derives them."""
    b = fp16r(lo)
    rng = hi - b
    s = np.float32(1.0) if rng == np.float32(0.0) else fp16r(rng / qmax)
    inv = np.float32(1.0) if s == np.float32(0.0) else np.float32(1.0) / s
    return b, s, inv


@njit(**_JIT)
def _sq_err(x, b, s, inv, qmax):
    """ATen's squared residual of one value: (x - (clamp(rint((x - b) * inv)) * s + b))^2."""
    zero = np.float32(0.0)
    u = np.rint((x - b) * inv)
    u = qmax if qmax < u else u  # std::min<float>(u, qmax)
    u = u if zero < u else zero  # std::max(0.0f, u)
    e = x - (u * s + b)
    return e * e


# --------------------------------------------------------------------------- GREEDY


# Lane state of the GREEDY kernel: one float32 buffer S, field k of lane l at k * GLANES + l, so
# that LLVM sees constant offsets from one base (no runtime alias checks) and vectorises every
# loop over lanes. The row block is a separate buffer xb, value j of lane l at j * GLANES + l.
GLANES = 32  # rows per block of the GREEDY kernel: two registers, for latency hiding
_A, _Z, _STEP, _THR, _CUR, _BEST, _ANSA, _ANSZ = [k * GLANES for k in range(8)]
_BL, _SL, _IL, _BR, _SR, _IR, _ACCL, _ACCR = [k * GLANES for k in range(8, 16)]
# phase 0: empty lane, 1: needs its full-range loss, 2: searching
_PHASE, _LIVE = 16 * GLANES, 17 * GLANES
_NS = 18 * GLANES


@njit(**_JIT)
def _pass2(S, xb, d, qmax):
    """ATen's float32 loss sums for the two candidate qparams of every lane: for lane l,
    S[_ACCL + l] = sum over j, in j order, of the squared error of x[j, l] with
    (S[_BL + l], S[_SL + l], S[_IL + l]), likewise _ACCR with the R qparams."""
    L = GLANES
    zero = np.float32(0.0)
    for l in range(L):
        S[_ACCL + l] = zero
        S[_ACCR + l] = zero
    d8 = d - d % 8
    for j in range(0, d8, 8):  # 8 values per lane per trip: the running sums stay in registers
        for l in range(L):
            bl = S[_BL + l]
            sl = S[_SL + l]
            il = S[_IL + l]
            br = S[_BR + l]
            sr = S[_SR + l]
            ir = S[_IR + l]
            a = S[_ACCL + l]
            c = S[_ACCR + l]
            for k in range(8):
                x = xb[(j + k) * L + l]
                a += _sq_err(x, bl, sl, il, qmax)
                c += _sq_err(x, br, sr, ir, qmax)
            S[_ACCL + l] = a
            S[_ACCR + l] = c
    for j in range(d8, d):
        for l in range(L):
            x = xb[j * L + l]
            S[_ACCL + l] += _sq_err(x, S[_BL + l], S[_SL + l], S[_IL + l], qmax)
            S[_ACCR + l] += _sq_err(x, S[_BR + l], S[_SR + l], S[_IR + l], qmax)


@njit(**_JIT)
def _load_lane(x, r, l, S, xb, n_bins, min_bins):
    """Put row r of x into lane l: its values, min and max, step and stop threshold."""
    d = x.shape[1]
    mn = x[r, 0]
    mx = x[r, 0]
    for j in range(d):
        v = x[r, j]
        xb[j * GLANES + l] = v
        mn = v if v < mn else mn
        mx = v if v > mx else mx
    st = (mx - mn) / n_bins
    S[_A + l] = mn
    S[_Z + l] = mx
    S[_STEP + l] = st
    S[_THR + l] = min_bins * st
    S[_PHASE + l] = np.float32(1.0)


@njit(**_JIT)
def greedy_rows(x, r0, r1, qmax, n_bins, min_bins, lo_out, hi_out):
    """GREEDY ranges of rows r0..r1-1 of x float32 [n, d] into lo_out / hi_out (float32 [n]).

    Per row, exactly ATen `choose_qparams_optimized` (float32 throughout)::

        step = (max - min) / n_bins;  thr = min_bins * step   # min_bins = n_bins * (1 - ratio)
        cur = best = loss(min, max);  answer = (min, max)
        while a + thr < z:
            left = loss(a + step, z);  right = loss(a, z - step)
            if cur < left and cur < right and cur < best: best, answer = cur, (a, z)
            if left < right: a, cur = a + step, left  else: z, cur = z - step, right

    except that a row whose position stops moving (ATen would loop forever) ends there.
    """
    d = x.shape[1]
    L = GLANES
    S = np.zeros(_NS, np.float32)
    xb = np.zeros(d * L, np.float32)
    row = np.zeros(L, np.int64)
    one = np.float32(1.0)
    nxt = r0
    busy = 0
    for l in range(L):
        if nxt < r1:
            _load_lane(x, nxt, l, S, xb, n_bins, min_bins)
            row[l] = nxt
            nxt += 1
            busy += 1
    while busy > 0:
        # the two candidates of every lane (a lane that just took a row evaluates its full
        # range, twice)
        for l in range(L):
            init = S[_PHASE + l] == one
            a = S[_A + l]
            z = S[_Z + l]
            lo_l = a if init else a + S[_STEP + l]
            hi_r = z if init else z - S[_STEP + l]
            bl, sl, il = _aten_qp(lo_l, z, qmax)
            br, sr, ir = _aten_qp(a, hi_r, qmax)
            S[_BL + l] = bl
            S[_SL + l] = sl
            S[_IL + l] = il
            S[_BR + l] = br
            S[_SR + l] = sr
            S[_IR + l] = ir
        _pass2(S, xb, d, qmax)
        # ATen's decisions, every lane at once
        for l in range(L):
            left = np.sqrt(S[_ACCL + l])
            right = np.sqrt(S[_ACCR + l])
            a = S[_A + l]
            z = S[_Z + l]
            c = S[_CUR + l]
            bst = S[_BEST + l]
            init = S[_PHASE + l] == one
            found = (c < left) & (c < right) & (c < bst) & (not init)
            keep = found | init
            S[_ANSA + l] = a if keep else S[_ANSA + l]
            S[_ANSZ + l] = z if keep else S[_ANSZ + l]
            go_left = left < right
            na = a + S[_STEP + l] if go_left else a
            nz = z if go_left else z - S[_STEP + l]
            na = a if init else na
            nz = z if init else nz
            moved = (na != a) | (nz != z) | init
            S[_A + l] = na
            S[_Z + l] = nz
            S[_CUR + l] = left if (init | go_left) else right
            S[_BEST + l] = left if init else (c if found else bst)
            S[_LIVE + l] = one if (moved & (na + S[_THR + l] < nz)) else np.float32(0.0)
        # finished rows out, next rows in
        for l in range(L):
            if S[_PHASE + l] == np.float32(0.0):
                continue
            if S[_LIVE + l] == np.float32(0.0):
                lo_out[row[l]] = S[_ANSA + l]
                hi_out[row[l]] = S[_ANSZ + l]
                if nxt < r1:
                    _load_lane(x, nxt, l, S, xb, n_bins, min_bins)
                    row[l] = nxt
                    nxt += 1
                else:
                    S[_PHASE + l] = np.float32(0.0)
                    busy -= 1
            else:
                S[_PHASE + l] = np.float32(2.0)


@njit(**_JIT)
def aten_losses(x, lo, hi, qmax, out):
    """out[r] = ATen `calculate_quant_loss` of row r of x float32 [n, d] with range
    (lo[r], hi[r]), through the same lane machinery as `greedy_rows` (for tests: it must equal
    rowwise.greedy_loss_exact bit for bit, which an FMA contraction would break)."""
    n, d = x.shape
    L = GLANES
    S = np.zeros(_NS, np.float32)
    xb = np.zeros(d * L, np.float32)
    for r0 in range(0, n, L):
        nr = min(L, n - r0)
        for l in range(nr):
            for j in range(d):
                xb[j * L + l] = x[r0 + l, j]
            b, s, inv = _aten_qp(lo[r0 + l], hi[r0 + l], qmax)
            S[_BL + l] = b
            S[_SL + l] = s
            S[_IL + l] = inv
            S[_BR + l] = b
            S[_SR + l] = s
            S[_IR + l] = inv
        _pass2(S, xb, d, qmax)
        for l in range(nr):
            out[r0 + l] = np.sqrt(S[_ACCL + l])


# --------------------------------------------------------------------------- fused encoder


@njit(**_JIT)
def row_extremes(x, r0, r1, lo_out, hi_out):
    """lo_out[r], hi_out[r] = min and max of row r of x float32 [n, d] (d >= 1, no NaN), rows
    r0..r1-1: numpy's x.min(axis=1) costs ~0.2 us a row of 64, this ~20x less."""
    d = x.shape[1]
    for r in range(r0, r1):
        lo = x[r, 0]
        hi = lo
        for j in range(1, d):
            v = x[r, j]
            lo = v if v < lo else lo
            hi = v if v > hi else hi
        lo_out[r] = lo
        hi_out[r] = hi


@njit(**_JIT)
def encode_rows(x, lo, hi, bits, r0, r1, out):
    """Fused SBHalf rows of x float32 [n, d] with ranges (lo, hi) into out uint8 [n, bpr],
    rows r0..r1-1, exactly as `rowwise.encode_ranges` (and fbgemm / ATen's packer)."""
    d = x.shape[1]
    qmax = np.float32((1 << bits) - 1)
    per = 8 // bits
    nb = out.shape[1] - 4
    codes = np.zeros(nb * per, np.uint8)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    for r in range(r0, r1):
        b = fp16r(lo[r])
        rng = hi[r] - b
        s = one if rng == zero else fp16r(rng / qmax)
        inv = one / s if s != zero else one
        if s == zero or np.isinf(inv):
            s = one
            inv = one
        for j in range(d):
            u = np.rint((x[r, j] - b) * inv)
            u = qmax if qmax < u else u
            u = u if zero < u else zero
            codes[j] = np.uint8(u)
        if per == 2:  # element 2k in the low nibble of byte k
            for k in range(nb):
                out[r, k] = codes[2 * k] | (codes[2 * k + 1] << np.uint8(4))
        elif per == 4:
            for k in range(nb):
                lo2 = codes[4 * k] | (codes[4 * k + 1] << np.uint8(2))
                hi2 = (codes[4 * k + 2] << np.uint8(4)) | (codes[4 * k + 3] << np.uint8(6))
                out[r, k] = lo2 | hi2
        else:
            for k in range(nb):
                acc = 0
                for t in range(per):
                    acc |= np.int64(codes[k * per + t]) << (t * bits)
                out[r, k] = np.uint8(acc)
        sb = fp16_bits(s)
        bb = fp16_bits(b)
        out[r, nb] = np.uint8(sb & 0xFF)
        out[r, nb + 1] = np.uint8(sb >> 8)
        out[r, nb + 2] = np.uint8(bb & 0xFF)
        out[r, nb + 3] = np.uint8(bb >> 8)


@njit(**_JIT)
def fp16_round_array(v, out):
    """out[i] = fp16r(v[i]) (float32 in and out): for tests."""
    for i in range(v.shape[0]):
        out[i] = fp16r(v[i])


@njit(**_JIT)
def fp16_bits_array(v, out):
    """out[i] = half bits of fp16r(v[i]) (uint16): for tests."""
    for i in range(v.shape[0]):
        out[i] = np.uint16(fp16_bits(fp16r(v[i])))


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
