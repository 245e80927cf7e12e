"""Compiled (numba) min/max encoder: fbgemm's `FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf`
bytes, with embq's NaN / Inf / fp16-range check fused in, on one thread.

Why not call fbgemm's op after a check pass: fbgemm's AVX2 packer costs ~100 cycles a row of 64
and a separate check pass another ~15% (it reads every value again), so the pair could not reach
fbgemm's own speed. This kernel does the check inside its first pass and beats the bare op.

Each block of BLOCK rows (its codes fit in L2) takes three passes:

1. Row extremes on ORDER KEYS: a float32's bits as int32 with the 31 low bits flipped where the
   sign is set, so that signed integer order is float order. An integer min/max reduction
   vectorises without fastmath (a float compare-and-select reduction does not: NaN semantics).
   NaN keys lie beyond the keys of +-inf, so `key(-limit) <= min key` and `max key <= key(limit)`
   is the whole check.
2. qparams of the block's rows exactly as fbgemm derives them (fp16 bias, fp16 scale of the
   range, a scale that rounds to zero or whose inverse overflows becomes 1), vectorised over rows.
3. Codes `clamp(rint((x - bias) * inv_scale), 0, qmax)` into a scratch, then packed 2 or 4 to a
   byte through a uint16 / uint32 view (element 2k in the low nibble of byte k).

Which zero a min reduction returns when a row holds +0.0 and -0.0 depends on its order, and the
bias keeps that sign: rows whose minimum is a zero redo fbgemm's order (`fbgemm_row_min`).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from embq.embedding.kernels_greedy import JIT_OPTIONS, fp16_bits, fp16r

BLOCK = 256  # rows per block: its codes (BLOCK x dim bytes) stay in cache between coding and packing
_ABS = np.int32(0x7FFFFFFF)
_FLT_MAX = np.float32(3.4028234663852886e38)


@njit(**JIT_OPTIONS)
def order_key(i):
    """The order key of float32 bits i (int32): signed order of keys == float order."""
    return i ^ ((i >> 31) & _ABS)


@njit(**JIT_OPTIONS)
def key_value(k):
    """The float32 whose order key is k (the inverse of `order_key`)."""
    return np.int32(k ^ ((k >> 31) & _ABS)).view(np.float32)


@njit(**JIT_OPTIONS)
def fbgemm_row_min(x, base, d):
    """The minimum of x[base:base + d] in fbgemm's AVX2 order, the sign of a zero included:
    8 lanes `min_v = min_ps(min_v, v)` (returns v on ties), then lanes 0..7 and the tail by
    `std::min(m, v)` (keeps m on ties)."""
    nv = d // 8 * 8
    mn = _FLT_MAX
    for lane in range(8):
        m = _FLT_MAX
        for c in range(lane, nv, 8):
            v = x[base + c]
            m = m if m < v else v
        mn = m if m < mn else mn
    for c in range(nv, d):
        v = x[base + c]
        mn = v if v < mn else mn
    return mn


@njit(**JIT_OPTIONS)
def encode_rows(x, bits, limit, out, out16):
    """Fused SBHalf rows of x float32 [n, d] (C-contiguous; d a multiple of 16 // bits) into out
    uint8 [n, bpr] (out16: the same memory as uint16 [n, bpr / 2]), min/max ranges.

    Returns -1, or the first row holding a NaN, an infinity or a value beyond +-limit (out is
    then incomplete).
    """
    n, d = x.shape
    xf = x.reshape(-1)
    xi = xf.view(np.int32)
    per = 8 // bits
    nb = d // per
    qmax = np.float32((1 << bits) - 1)
    klo = order_key(np.float32(-limit).view(np.int32))
    khi = order_key(np.float32(limit).view(np.int32))
    zero = np.float32(0.0)
    one = np.float32(1.0)
    kmin = np.empty(BLOCK, np.int32)
    kmax = np.empty(BLOCK, np.int32)
    lo_val = np.empty(BLOCK, np.float32)
    bias = np.empty(BLOCK, np.float32)
    inv = np.empty(BLOCK, np.float32)
    tail = np.empty(2 * BLOCK, np.uint16)  # fp16 scale and bias bits of each row
    codes = np.empty(BLOCK * d, np.uint8)
    c16 = codes.view(np.uint16)
    c32 = codes.view(np.uint32)
    for blk in range((n + BLOCK - 1) // BLOCK):  # (a stepped range() stops LLVM vectorising)
        r0 = blk * BLOCK
        m = min(BLOCK, n - r0)
        for j in range(m):  # pass 1: extremes and the check
            base = (r0 + j) * d
            lo = np.int32(2147483647)
            hi = np.int32(-2147483648)
            for c in range(d):
                k = order_key(xi[base + c])
                lo = k if k < lo else lo
                hi = k if k > hi else hi
            kmin[j] = lo
            kmax[j] = hi
        for j in range(m):
            if kmin[j] < klo or kmax[j] > khi:
                return r0 + j
        for j in range(m):  # pass 2: qparams (fbgemm's), vectorised over the block's rows
            lo_val[j] = key_value(kmin[j])
        for j in range(m):
            if lo_val[j] == zero:
                lo_val[j] = fbgemm_row_min(xf, (r0 + j) * d, d)
        for j in range(m):
            b = fp16r(lo_val[j])
            rng = key_value(kmax[j]) - b
            s = one if rng == zero else fp16r(rng / qmax)
            iv = one / (one if s == zero else s)
            unusable = (s == zero) | np.isinf(iv)
            s = one if unusable else s
            bias[j] = b
            inv[j] = one if unusable else iv
            tail[2 * j] = np.uint16(fp16_bits(s))
            tail[2 * j + 1] = np.uint16(fp16_bits(b))
        for j in range(m):
            out16[r0 + j, nb // 2] = tail[2 * j]
            out16[r0 + j, nb // 2 + 1] = tail[2 * j + 1]
        for j in range(m):  # pass 3: codes, then packed
            base = (r0 + j) * d
            b = bias[j]
            iv = inv[j]
            for c in range(d):
                u = np.rint((xf[base + c] - b) * iv)
                u = qmax if qmax < u else u
                u = u if zero < u else zero
                codes[j * d + c] = np.uint8(np.int32(u))
        for j in range(m):
            r = r0 + j
            if per == 2:  # two codes c0 | c1 << 8 -> c0 | c1 << 4
                w0 = j * nb
                for k in range(nb):
                    v = c16[w0 + k]
                    out[r, k] = np.uint8((v | (v >> 4)) & 0xFF)
            elif per == 4:  # four 2-bit codes, bytes of a uint32 -> one byte
                w0 = j * nb
                for k in range(nb):
                    v = c32[w0 + k]
                    out[r, k] = np.uint8((v | (v >> 6) | (v >> 12) | (v >> 18)) & 0xFF)
            else:
                for k in range(nb):
                    out[r, k] = codes[j * d + k]
    return -1
