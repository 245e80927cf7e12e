"""Test-only references: brute-force searches that the fast code is judged against.

They live here, not in the package, because nothing but tests and benchmarks should run them
(each is orders of magnitude slower than what it checks).
"""

from __future__ import annotations

import numpy as np

from embq.embedding.fp16 import F32
from embq.embedding.rowwise import qmax_of, qparams


def exhaustive_ranges(
    x: np.ndarray, bits: int, n_bins: int = 200
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best (lo, hi) over all pairs lo = min + i*step < hi = max - j*step (i, j >= 0,
    i + j < n_bins, step = (max - min) / n_bins in float64), scored by the exact squared error
    with fp16 qparams. The reference the better search is judged against: ~n_bins^2 / 2
    quantizations per row (about 20k at n_bins = 200), for tests and benchmarks only.

    Returns:
        (lo float32 [n], hi float32 [n], sse float64 [n]).
    """
    x = np.ascontiguousarray(x, dtype=F32)
    n, d = x.shape
    x64 = x.astype(np.float64)
    xmin, xmax = x64.min(axis=1), x64.max(axis=1)
    step = (xmax - xmin) / n_bins
    best = np.full(n, np.inf)
    best_lo = xmin.astype(F32)
    best_hi = xmax.astype(F32)
    jj = np.arange(n_bins)
    for i in range(n_bins):
        js = jj[: n_bins - i]  # i + j < n_bins keeps lo < hi
        lo = np.repeat((xmin + i * step).astype(F32)[:, None], js.size, axis=1)  # [n, J]
        hi = (xmax[:, None] - js[None, :] * step[:, None]).astype(F32)
        scale16, bias16, inv = qparams(lo.ravel(), hi.ravel(), bits)
        sc = scale16.astype(F32).reshape(n, -1, 1)
        bi = bias16.astype(F32).reshape(n, -1, 1)
        t = (x[:, None, :] - bi) * inv.reshape(n, -1, 1)
        np.rint(t, out=t)
        np.clip(t, 0, qmax_of(bits), out=t)
        t *= sc
        t += bi
        e = x64[:, None, :] - t
        sse = np.einsum("njd,njd->nj", e, e)
        k = sse.argmin(axis=1)
        v = sse[np.arange(n), k]
        better = v < best
        best = np.where(better, v, best)
        best_lo = np.where(better, lo[np.arange(n), k], best_lo)
        best_hi = np.where(better, hi[np.arange(n), k], best_hi)
    return best_lo, best_hi, best


def kmeans1d_exact(x: np.ndarray, k: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Exact 1-D k-means per row (the full O(k * d^2) dynamic program, no band): the reference
    for `embq.embedding.codebook.row_codebooks`."""
    from embq.embedding.codebook import kmeans1d_dp

    return kmeans1d_dp(x, k, band=None)
