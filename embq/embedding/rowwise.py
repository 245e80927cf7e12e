"""Row-wise asymmetric uniform quantization in fbgemm's fused SBHalf layout.

Everything here is vectorised over rows (numpy, float32 arithmetic in the same order as the C++
it reproduces) and knows nothing about format names or validation: `embq.embedding.formats` does
that. The range searches live beside it: `greedy` (EMB4's GREEDY, byte-identical to ATen) and
`opt_search` (embq's better search).

Fused row layout (fbgemm `FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf`, ATen
`embedding_bag_{4,2}bit_prepack`)::

    [ceil(D * bits / 8) bytes of codes, element 0 in the low bits][fp16 scale][fp16 bias]

Quantization of a row with range (lo, hi), all float32 except where fp16 is named::

    bias  = fp16(lo)                                  # rounded first
    scale = fp16((hi - bias) / (2^bits - 1))          # 1.0 if hi - bias == 0, or if it rounds to 0
    q     = clamp(round_half_even((x - bias) * (1 / scale)), 0, 2^bits - 1)
    x_hat = q * scale + bias                          # exact in float32: q*scale needs <= 19 bits

Speed: `encode_ranges` and `row_extremes` run compiled numba kernels (`embq.embedding.compiled`:
rows in SIMD lanes, so every row keeps the exact float32 order), split into row pieces that this
thread and a persistent pool share (`embq.embedding.parallel`). The numpy versions stay as the
references the kernels are tested against and as the fallback where numba cannot load.
"""

from __future__ import annotations

import numpy as np

from embq.embedding.compiled import compiled_kernels
from embq.embedding.fp16 import F16, F32, fp16_round, to_fp16
from embq.embedding.packing import pack_codes, packed_bytes, unpack_codes
from embq.embedding.parallel import run_rows

__all__ = ["F16", "F32", "SUPPORTED_BITS", "pack_codes", "packed_bytes", "unpack_codes"]

# The 8 / bits codes that share one byte, per supported bit width.
SUPPORTED_BITS = (2, 4, 8)


def qmax_of(bits: int) -> int:
    """Largest code of a `bits`-bit quantizer (15 for 4 bits)."""
    return (1 << bits) - 1



def fused_row_bytes(dim: int, bits: int) -> int:
    """Bytes of one fused SBHalf row: packed codes + fp16 scale + fp16 bias."""
    return packed_bytes(dim, bits) + 4



def qparams(
    lo: np.ndarray, hi: np.ndarray, bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """fbgemm / ATen qparams for ranges (lo, hi).

    Args:
        lo, hi: float32 [n], the clipping range of each row.
        bits: 2, 4 or 8.
    Returns:
        (scale16, bias16, inv_scale): float16 [n], float16 [n], float32 [n], where inv_scale is
        the float32 `1 / float(scale16)` the quantizer multiplies by.
    """
    lo = np.ascontiguousarray(lo, dtype=F32)
    hi = np.asarray(hi, dtype=F32)
    bias16 = to_fp16(lo)
    rng = hi - bias16.astype(F32)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        scale = fp16_round(rng / F32(qmax_of(bits)))
        if not rng.all():
            scale[rng == 0] = 1.0
        # fbgemm: a scale that rounds to 0 in fp16 (or whose inverse overflows) becomes 1.0.
        if scale.all():
            inv = F32(1.0) / scale
        else:
            inv = F32(1.0) / np.where(scale == 0, F32(1.0), scale)
        bad = (scale == 0) | np.isinf(inv)
    if bad.any():
        scale = np.where(bad, F32(1.0), scale)
        inv = np.where(bad, F32(1.0), inv)
    return to_fp16(scale), bias16, inv.astype(F32, copy=False)


def quantize_codes(
    x: np.ndarray, bias16: np.ndarray, inv_scale: np.ndarray, bits: int
) -> np.ndarray:
    """Codes `clamp(rint((x - bias) * inv_scale), 0, qmax)` as uint8 [n, d] (float32 math)."""
    u = (x - bias16.astype(F32)[:, None]) * inv_scale[:, None]
    np.rint(u, out=u)
    np.clip(u, 0, qmax_of(bits), out=u)
    return u.astype(np.uint8)



def fuse(packed: np.ndarray, scale16: np.ndarray, bias16: np.ndarray) -> np.ndarray:
    """Concatenate packed codes [n, p], fp16 scale [n], fp16 bias [n] -> uint8 [n, p + 4]."""
    n = packed.shape[0]
    out = np.empty((n, packed.shape[1] + 4), np.uint8)
    out[:, : packed.shape[1]] = packed
    out[:, -4:-2] = scale16.astype("<f2").reshape(n, 1).view(np.uint8)
    out[:, -2:] = bias16.astype("<f2").reshape(n, 1).view(np.uint8)
    return out


def encode_ranges(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    """Quantize float32 rows [n, d] with per-row ranges into fused SBHalf rows uint8 [n, bpr].

    Values outside (lo, hi) clamp to the end codes, as `..._prepack_with_rowwise_min_max` does.
    Compiled (`kernels_greedy.encode_rows`), byte-identical to `encode_ranges_numpy`.
    """
    kernels = compiled_kernels()
    if kernels is None:
        return encode_ranges_numpy(x, lo, hi, bits)
    x = np.ascontiguousarray(x, dtype=F32)
    lo = np.ascontiguousarray(lo, dtype=F32)
    hi = np.ascontiguousarray(hi, dtype=F32)
    n, d = x.shape
    out = np.empty((n, fused_row_bytes(d, bits)), np.uint8)
    if n:
        run_rows(lambda r0, r1: kernels.greedy.encode_rows(x, lo, hi, bits, r0, r1, out), n, least=2048)
    return out


def encode_ranges_numpy(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    """`encode_ranges` in numpy (the reference the kernel is tested against)."""
    scale16, bias16, inv = qparams(lo, hi, bits)
    codes = quantize_codes(x, bias16, inv, bits)
    return fuse(pack_codes(codes, bits), scale16, bias16)


def split_fused(fused: np.ndarray, bits: int, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fused rows uint8 [n, bpr] -> (codes uint8 [n, dim], scale float32 [n], bias float32 [n])."""
    n = fused.shape[0]
    qp = np.ascontiguousarray(fused[:, -4:]).view("<f2").reshape(n, 2).astype(F32)
    codes = unpack_codes(fused[:, :-4], bits, dim)
    return codes, qp[:, 0], qp[:, 1]


def decode_fused(fused: np.ndarray, bits: int, dim: int) -> np.ndarray:
    """Dequantize fused SBHalf rows: float32 [n, dim] = code * scale + bias.

    Equal to fbgemm's `FusedNBitRowwiseQuantizedSBHalfToFloat`: the product of a <= 8-bit code
    and an fp16 scale is exact in float32, so fused multiply-add or not gives the same bits.
    """
    codes, scale, bias = split_fused(fused, bits, dim)
    return codes.astype(F32) * scale[:, None] + bias[:, None]


def dequantize(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    """Quantize-dequantize float32 rows [n, d] with ranges (lo, hi), float32 [n, d]."""
    scale16, bias16, inv = qparams(lo, hi, bits)
    q = quantize_codes(x, bias16, inv, bits).astype(F32)
    return q * scale16.astype(F32)[:, None] + bias16.astype(F32)[:, None]


def row_sse(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    """Squared error per row, float64 [n], of quantizing rows x with ranges (lo, hi)."""
    err = x.astype(np.float64) - dequantize(x, lo, hi, bits).astype(np.float64)
    return np.einsum("ij,ij->i", err, err)


_PACKER: list = []  # [(fbgemm's packer, torch) or None], filled on first use


def _fbgemm_packer():
    """fbgemm's `FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf` and torch, or None where
    fbgemm_gpu cannot load (looked up once: the lookup costs as much as packing 50 rows)."""
    if not _PACKER:
        try:
            import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
            import torch

            _PACKER.append((torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf, torch))
        except (ImportError, AttributeError, RuntimeError):
            _PACKER.append(None)
    return _PACKER[0]


def encode_minmax(x: np.ndarray, bits: int, limit: float) -> np.ndarray | None:
    """Min/max fused rows uint8 [n, bpr]: fbgemm's `FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf`
    bytes (the packer TorchRec uses), or None when a value is NaN, infinite or beyond +-limit,
    which fbgemm's packer does not check (a NaN becomes an ordinary code).

    The compiled kernel (`kernels_minmax.encode_rows`) checks and packs in one go, on this
    thread, faster than fbgemm's bare op. Without numba: a numpy check, then fbgemm's op (or
    `encode_ranges` where fbgemm_gpu cannot load: the same bytes, tested, except the sign of a
    zero bias where a row's minimum is a zero of both signs; same decoded rows).
    """
    x = np.ascontiguousarray(x, dtype=F32)
    n, d = x.shape
    kernels = compiled_kernels()
    if kernels is not None and d % (16 // bits) == 0:  # whole uint16 words of codes per row
        out = np.empty((n, fused_row_bytes(d, bits)), np.uint8)
        bad = kernels.minmax.encode_rows(x, bits, limit, out, out.view(np.uint16))
        return out if bad < 0 else None
    with np.errstate(invalid="ignore"):
        if not np.all(np.abs(x) <= limit):
            return None
    packer = _fbgemm_packer()
    if packer is None:
        return encode_ranges(x, *minmax_ranges(x), bits)
    op, torch = packer
    return op(torch.from_numpy(x), bits).numpy()


def minmax_ranges(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row min and max, float32 [n] each (fbgemm's and TorchRec's choice)."""
    return row_extremes(x)


def row_extremes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of each row of float32 [n, d] rows without NaN, float32 [n] each: one
    compiled pass over the rows (`kernels_greedy.row_extremes`), numpy where numba is off."""
    kernels = compiled_kernels()
    if kernels is None or x.shape[1] == 0:
        return x.min(axis=1), x.max(axis=1)
    x = np.ascontiguousarray(x, dtype=F32)
    lo = np.empty(x.shape[0], F32)
    hi = np.empty(x.shape[0], F32)
    run_rows(lambda r0, r1: kernels.greedy.row_extremes(x, r0, r1, lo, hi), x.shape[0], least=4096)
    return lo, hi
