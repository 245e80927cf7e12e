"""Compiled (numba) kernels for `embq.embedding.rowwise`: the EMB4 GREEDY range search bit for bit
as ATen does it, the fused SBHalf encoder, row extremes, and the scalar fp16 helpers that the
better search's kernel (`embq.embedding.kernels_opt`) and the min/max encoder
(`embq.embedding.kernels_minmax`) share.

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

fp16 rounding (`fp16r`) is done with float32 arithmetic on a power-of-two quantum taken from the
exponent bits: round half to even, fp16 subnormals, and overflow to +-inf (|x| >= 65520) as
numpy / torch / c10::Half convert; it vectorises.

All functions take C-contiguous float32 rows; `embq.embedding.rowwise` prepares the arguments and splits
the rows between threads (the kernels release the GIL).
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Compile options of every embq kernel: cached machine code, GIL released, numpy's error model.
JIT_OPTIONS = dict(cache=True, nogil=True, error_model="numpy")
_JIT = JIT_OPTIONS


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
    +-inf / NaN). Selects rather than branches, so that a loop over rows vectorises."""
    v = np.float32(v)
    u = v.view(np.int32)
    sign = (u >> 16) & 0x8000
    e = (u >> 23) & 0xFF
    special = 0x7C00 | (0x200 if (u & 0x7FFFFF) else 0)  # inf / NaN
    normal = ((e - 112) << 10) | ((u >> 13) & 0x3FF)
    subnormal = np.int32(abs(v) * np.float32(16777216.0))  # or zero: a multiple of 2^-24
    return sign | (special if e == 0xFF else (normal if e >= 113 else subnormal))


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
