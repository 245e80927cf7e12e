"""Codebook formats: per-row 16-centroid codebooks (EMB4) and a table-shared codebook over
row-normalised values (product quantization is in `embq.embedding.pq`).

Byte layouts (all little-endian, codes LSB-first like fbgemm: element 0 in the low nibble):

    cb4-row      [dim/2 B 4-bit codes][16 x fp16 centroids, ascending]          dim/2 + 32 B/row
    cb4-shared   [dim/2 B 4-bit codes][fp16 scale][fp16 offset]                 dim/2 + 4 B/row
                 + table params {"codebook": float32[16], "moments": float32[2]};
                 x_hat = offset + scale * codebook[code]

No codebook format has a fused lookup kernel in fbgemm / TorchRec: `embq.runtime.codebook_bag`
looks them up. faiss is imported only when a shared codebook is fitted (and by `pq`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from embq.embedding.compiled import compiled_kernels
from embq.embedding.formats import TableFormat, as_rows, check_codes, check_fp16_range
from embq.embedding.fp16 import FP16_MAX, to_fp16
from embq.embedding.packing import pack_codes, unpack_codes
from embq.embedding.parallel import run_chunks, run_rows
from embq.errors import FormatError

F32 = np.float32
K16 = 16


# --------------------------------------------------------------------------- 1-D k-means


def load_faiss():
    """faiss, imported on first use. faiss bundles its own OpenMP runtime: beside torch's, two
    pools of busy-waiting threads on few cores slow a k-means fit from milliseconds to seconds,
    so faiss's threads are told to sleep when idle (unless the user chose a policy)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import faiss

    return faiss


def _prefix(xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Prefix sums (float64 [n, d+1]) of sorted rows and of their squares."""
    n, d = xs.shape
    p1 = np.zeros((n, d + 1))
    p2 = np.zeros((n, d + 1))
    np.cumsum(xs, axis=1, out=p1[:, 1:])
    np.cumsum(xs * xs, axis=1, out=p2[:, 1:])
    return p1, p2


def kmeans1d_dp(x: np.ndarray, k: int = K16, band: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Optimal 1-D k-means of each row by dynamic programming over its sorted values.

    D_c[j] = min over the last cluster (sorted points i..j-1) of D_{c-1}[i] + SSE(i, j), with
    SSE from float64 prefix sums; clusters may stay empty. Vectorised over rows.

    Args:
        x: float [n, d].
        k: clusters per row.
        band: if set, clusters hold at most `band` points: O(k * d * band) instead of
            O(k * d^2) per row. Exact whenever the optimal clusters are that small (at d = 64,
            k = 16 and band = 24 this fails only for rows with long runs of equal values).
    Returns:
        (sse float64 [n], centroids float64 [n, k] ascending; empty clusters repeat a
        neighbouring centroid).
    """
    xs = np.sort(np.asarray(x, dtype=np.float64), axis=1)
    n, d = xs.shape
    w = d if band is None else max(1, min(band, d))
    p1, p2 = _prefix(xs)
    jj = np.arange(1, d + 1)[:, None]  # last cluster ends before sorted point j
    ii = jj - np.arange(1, w + 1)[None, :]  # ... and starts at i = j - size
    valid = ii >= 0
    ic = np.maximum(ii, 0)
    cnt = (jj - ic).astype(np.float64)
    s1 = p1[:, 1:, None] - p1[:, ic]
    cost = (p2[:, 1:, None] - p2[:, ic]) - s1 * s1 / cnt  # [n, d, w]
    np.maximum(cost, 0.0, out=cost)
    cost[:, ~valid] = np.inf
    # cost[:, j-1, s-1] pairs with best[:, j - s]; a reversed sliding window over best (padded
    # with inf for i < 0) lines them up without a gather
    cost_r = np.ascontiguousarray(cost[:, :, ::-1])  # [n, d, w]: last axis = size w..1
    best = np.full((n, d + 1 + w), np.inf)  # best[:, w + i] = D[i]; first w are padding
    best[:, w] = 0.0
    choice = np.zeros((k, n, d + 1), np.int16)  # size of cluster c ending at j; 0 = empty
    tot = np.empty_like(cost_r)
    for c in range(k):
        win = np.lib.stride_tricks.sliding_window_view(best[:, 1 : d + w], w, axis=1)  # [n, d, w]
        np.add(win, cost_r, out=tot)
        arg = tot.argmin(axis=2)
        val = np.take_along_axis(tot, arg[:, :, None], axis=2)[:, :, 0]
        cur = best[:, w + 1 :]
        take = val < cur
        choice[c, :, 1:] = np.where(take, w - arg, 0)
        best[:, w + 1 :] = np.where(take, val, cur)
    best = best[:, w:]
    cents = np.full((n, k), np.nan)
    j = np.full(n, d)
    rows = np.arange(n)
    for c in range(k - 1, -1, -1):
        size = choice[c, rows, j].astype(np.int64)
        i = j - size
        full = size > 0
        cents[full, c] = (p1[rows, j] - p1[rows, i])[full] / size[full]
        j = i
    # empty clusters: copy the next centroid up (or down at the top) to keep them ascending
    for c in range(k - 2, -1, -1):
        cents[:, c] = np.where(np.isnan(cents[:, c]), cents[:, c + 1], cents[:, c])
    for c in range(1, k):
        cents[:, c] = np.where(np.isnan(cents[:, c]), cents[:, c - 1], cents[:, c])
    return best[:, d], cents


def row_codebooks(x: np.ndarray, k: int = K16, band: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Per-row k-centroid codebooks: optimal 1-D k-means by banded DP (`kmeans1d_dp`), with
    centroids rounded to fp16 and every value assigned to its nearest rounded centroid.

    Args:
        x: float32 [n, d].
    Returns:
        (centroids float16 [n, k] ascending, codes uint8 [n, d] indexing them).
    """
    x = np.asarray(x, dtype=F32)
    n, d = x.shape
    if n == 0:
        return np.zeros((0, k), np.float16), np.zeros((0, d), np.uint8)
    out_c = np.empty((n, k), np.float16)
    out_q = np.empty((n, d), np.uint8)
    step = max(1, (1 << 22) // (d * min(band, d) * 8))  # rows per chunk: ~4 MB per DP array

    def work(i: int) -> None:
        _, cents = kmeans1d_dp(x[i : i + step], k, band)
        c16 = to_fp16(cents.astype(F32))
        c16.sort(axis=1)
        out_c[i : i + step] = c16
        out_q[i : i + step] = _nearest_codes(x[i : i + step], c16.astype(F32))

    run_chunks(work, list(range(0, n, step)))
    return out_c, out_q


def _nearest_codes(x: np.ndarray, cents: np.ndarray) -> np.ndarray:
    """Index of the nearest of ascending centroids (ties to the lower one), uint8 [n, d].

    x: float32 [n, d]; cents: float32 [n, k] (or [1, k] shared), ascending.
    """
    mids = 0.5 * (cents[:, :-1].astype(np.float64) + cents[:, 1:].astype(np.float64))
    return (x.astype(np.float64)[:, :, None] > mids[:, None, :]).sum(axis=2).astype(np.uint8)


# --------------------------------------------------------------------------- formats


def _check_even(name: str, dim: int) -> None:
    if not isinstance(dim, (int, np.integer)) or dim < 2 or dim % 2:
        raise FormatError(f"{name}: dim must be a positive even integer (4-bit codes), got {dim!r}")


class RowCodebookFormat(TableFormat):
    """cb4-row: each row has its own 16 fp16 centroids (1-D k-means) and 4-bit codes."""

    name = "cb4-row"
    sparse_type = None
    bits = 4

    def check_dim(self, dim: int) -> None:
        _check_even(self.name, dim)

    def bytes_per_row(self, dim: int) -> int:
        self.check_dim(dim)
        return dim // 2 + 2 * K16

    def encode(self, rows: Any, params: dict[str, np.ndarray] | None = None) -> np.ndarray:
        x = as_rows(rows)
        self.check_dim(x.shape[1])
        if x.shape[0] and np.abs(x).max() > FP16_MAX:
            i = int(np.flatnonzero(np.abs(x).max(axis=1) > FP16_MAX)[0])
            raise FormatError(f"{self.name}: row {i} has |value| > 65504; fp16 centroids overflow")
        cents, codes = row_codebooks(x)
        n = x.shape[0]
        out = np.empty((n, self.bytes_per_row(x.shape[1])), np.uint8)
        out[:, : -2 * K16] = pack_codes(codes, 4)
        out[:, -2 * K16 :] = cents.astype("<f2").view(np.uint8)
        return out

    def decode(self, codes: Any, params: dict[str, np.ndarray] | None, dim: int) -> np.ndarray:
        c = check_codes(codes, self.bytes_per_row(dim), self.name)
        cents = np.ascontiguousarray(c[:, -2 * K16 :]).view("<f2").astype(F32)
        q = unpack_codes(c[:, : -2 * K16], 4, dim)
        return np.take_along_axis(cents, q.astype(np.int64), axis=1)


class SharedCodebookFormat(TableFormat):
    """cb4-shared: rows normalised by a per-row fp16 scale and offset, then 4-bit codes into
    ONE 16-level codebook learned for the table (faiss k-means over the normalised values).

    Same bytes per row as int4 (dim/2 + 4) plus 72 bytes per table. The codebook adapts to the
    shape of the value distribution (denser levels where values are dense), which a uniform
    grid cannot; each row's scale and offset are fitted by least squares to its codes from
    two starts (min/max and mean/std), so both range-filling and heavy-tailed rows fit.
    It assumes the rows of a table share a distribution shape; a table mixing very different
    shapes is better served by int4-opt (or by fitting one codebook per group of rows).
    """

    name = "cb4-shared"
    sparse_type = None
    bits = 4

    def __init__(self, name: str = "cb4-shared") -> None:
        self.name = name  # with the config's parameters, e.g. "cb4-shared(seed=3)"

    def check_dim(self, dim: int) -> None:
        _check_even(self.name, dim)

    def bytes_per_row(self, dim: int) -> int:
        self.check_dim(dim)
        return dim // 2 + 4

    def min_fit_rows(self) -> int:
        return 1

    def fit(self, sample: Any) -> dict[str, np.ndarray]:
        x = as_rows(sample, "sample")
        self.check_dim(x.shape[1])
        if x.shape[0] == 0:
            raise FormatError(f"{self.name}: fit needs at least one sample row")
        # as every fp16-qparam format: a value fp16 cannot hold would otherwise pull levels
        # of the one shared codebook out to it
        check_fp16_range(x, self.bits, self.name)
        cb, mom = shared_codebook(x, name=self.name)
        return {"codebook": cb, "moments": mom}

    def encode(self, rows: Any, params: dict[str, np.ndarray] | None = None) -> np.ndarray:
        x = as_rows(rows)
        self.check_dim(x.shape[1])
        cb = self._codebook(params)
        if x.shape[0]:
            check_fp16_range(x, self.bits, self.name)
        moments = np.asarray(params["moments"], F32)
        scale16, off16, codes = shared_encode(x, cb, moments, name=self.name)
        n = x.shape[0]
        out = np.empty((n, self.bytes_per_row(x.shape[1])), np.uint8)
        out[:, :-4] = pack_codes(codes, 4)
        out[:, -4:-2] = scale16.astype("<f2").reshape(n, 1).view(np.uint8)
        out[:, -2:] = off16.astype("<f2").reshape(n, 1).view(np.uint8)
        return out

    def decode(self, codes: Any, params: dict[str, np.ndarray] | None, dim: int) -> np.ndarray:
        c = check_codes(codes, self.bytes_per_row(dim), self.name)
        cb = self._codebook(params)
        n = c.shape[0]
        qp = np.ascontiguousarray(c[:, -4:]).view("<f2").reshape(n, 2).astype(F32)
        q = unpack_codes(c[:, :-4], 4, dim)
        return qp[:, 1:2] + qp[:, 0:1] * cb[q]

    def _codebook(self, params: dict[str, np.ndarray] | None) -> np.ndarray:
        if not params or "codebook" not in params or "moments" not in params:
            raise FormatError(
                f"{self.name}: params 'codebook' and 'moments' missing; call fit(sample) first"
            )
        cb = np.asarray(params["codebook"], dtype=F32)
        mom = np.asarray(params["moments"], dtype=F32)
        if cb.shape != (K16,) or mom.shape != (2,) or not (np.isfinite(cb).all() and np.isfinite(mom).all()):
            raise FormatError(
                f"{self.name}: codebook must be 16 finite floats and moments 2, got "
                f"{cb.shape} and {mom.shape}"
            )
        if np.any(np.diff(cb) < 0):
            raise FormatError(f"{self.name}: codebook must be ascending")
        return cb


def _minmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row max - min (1 for constant rows) and min, float64 [n]. A zero minimum is +0.0:
    which zero a min returns among +0.0 and -0.0 depends on its order (numpy's SIMD order here,
    the compiled kernel's there), and the offset keeps its sign."""
    lo = x.min(axis=1).astype(np.float64) + 0.0
    rng = x.max(axis=1).astype(np.float64) - lo
    return np.where(rng > 0, rng, 1.0), lo


def shared_codebook(
    x: np.ndarray, k: int = K16, rounds: int = 4, seed: int = 1234, name: str = "cb4-shared"
) -> tuple[np.ndarray, np.ndarray]:
    """A k-level codebook shared by all rows of a table: (codebook float32 [k] ascending,
    moments float32 [2] = mean and std of the sample's values in codebook units).

    Two candidates, each from faiss k-means over the sample's values normalised per row
    (by min/max, which suits rows that fill their range, and by mean/std, which suits
    heavy-tailed rows), refined by `rounds` of alternating least squares on the sample (rows'
    scale/offset and codes by `shared_encode`, then each level as the weighted mean of its
    values in codebook units). The candidate with the lower sample error is returned.
    """
    faiss = load_faiss()

    x64 = x.astype(np.float64)
    rng, lo = _minmax(x)
    sd = x64.std(axis=1)
    sd = np.where(sd > 0, sd, 1.0)
    norms = [(x64 - lo[:, None]) / rng[:, None], (x64 - x64.mean(axis=1)[:, None]) / sd[:, None]]
    best = (np.inf, None, None)
    for z in norms:
        km = faiss.Kmeans(1, k, niter=30, seed=seed, max_points_per_centroid=1 << 20)
        km.cp.min_points_per_centroid = 1  # a small sample is fine for a 1-D codebook
        zc = np.ascontiguousarray(z.reshape(-1, 1), dtype=F32)
        km.train(zc)
        cb = np.sort(km.centroids.reshape(-1)).astype(np.float64)
        mom = np.array([zc.mean(), max(float(zc.std()), 1e-12)])
        for r in range(rounds + 1):
            s16, o16, q = shared_encode(x, cb.astype(F32), mom.astype(F32), name=name)
            sc = s16.astype(np.float64)[:, None]
            t = (x64 - o16.astype(np.float64)[:, None]) / sc  # each value in codebook units
            err = float((((t - cb[q]) * sc) ** 2).sum())
            if r == rounds:
                break
            w = np.broadcast_to(sc * sc, x.shape)  # its squared-error weight
            num = np.bincount(q.ravel(), weights=(w * t).ravel(), minlength=k)
            den = np.bincount(q.ravel(), weights=w.ravel(), minlength=k)
            cb = np.where(den > 0, num / np.maximum(den, 1e-300), cb)
            cb.sort()
            mom = np.array([t.mean(), max(float(t.std()), 1e-12)])
        if err < best[0]:
            best = (err, cb, mom)
    return best[1].astype(F32), best[2].astype(F32)


def _codes_shared(z: np.ndarray, cb: np.ndarray) -> np.ndarray:
    """Nearest level of ascending codebook cb [k] for values z [n, d] (ties to the lower)."""
    mids = 0.5 * (cb[:-1].astype(np.float64) + cb[1:].astype(np.float64))
    return np.searchsorted(mids, z.astype(np.float64), side="left").astype(np.uint8)


def shared_encode(
    x: np.ndarray, cb: np.ndarray, moments: np.ndarray, rounds: int = 3, name: str = "cb4-shared"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes of rows x float32 [n, d] into the shared codebook cb float32 [k] with per-row fp16
    (scale, offset), x_hat = offset + scale * cb[code].

    Two starts per row, both mapped into codebook units: min/max onto the end levels (fits
    rows that fill their range) and mean/std onto `moments` (the table's mean and std in
    codebook units; fits heavy-tailed rows); each is refined by `rounds` of least squares
    (scale, offset given the codes, then the nearest codes), in fp16; the better one is kept.
    A candidate whose scale or offset overflows fp16 is never kept; a row with no other
    candidate raises FormatError naming it (`name` is the format's, for the message).

    Runs the compiled kernel (`kernels_codebook.shared_rows`, rows split between threads) where
    numba loads, else `shared_encode_numpy`: the same bytes (tested). The kernel takes the
    format's codebooks (16 ascending levels); any other goes to the numpy path.

    Returns (scale16 float16 [n], offset16 float16 [n], codes uint8 [n, d]).
    """
    kernels = compiled_kernels()
    x = np.ascontiguousarray(x, dtype=F32)
    n, d = x.shape
    cb = np.asarray(cb)
    if kernels is None or d == 0 or cb.shape != (K16,) or not np.all(cb[1:] >= cb[:-1]):
        return shared_encode_numpy(x, cb, moments, rounds, name)
    cbd = cb.astype(np.float64)
    lo_cb, rng_cb = cbd[0], max(cbd[-1] - cbd[0], 1e-12)
    mids = np.ascontiguousarray(0.5 * (cb[:-1].astype(np.float64) + cb[1:].astype(np.float64)))
    cb_mean, cb_sd = float(moments[0]), max(float(moments[1]), 1e-12)
    s_out, o_out = np.empty(n, F32), np.empty(n, F32)
    codes = np.empty((n, d), np.uint8)
    lost = np.empty(n, np.uint8)

    def work(r0: int, r1: int) -> None:
        kernels.codebook.shared_rows(x, r0, r1, cbd, mids, float(lo_cb), float(rng_cb), cb_mean, cb_sd,
                                     int(rounds), s_out, o_out, codes, lost)  # fmt: skip

    run_rows(work, n, least=256)
    if lost.any():
        raise _span_error(name, int(np.flatnonzero(lost)[0]), rng_cb)
    return s_out.astype(np.float16), o_out.astype(np.float16), codes


def _span_error(name: str, row: int, rng_cb: float) -> FormatError:
    return FormatError(
        f"{name}: row {row} spans more than fp16 scales can map onto the codebook's "
        f"{rng_cb:.3g} units (its fp16 scale or offset overflows 65504); rescale the table "
        "or use int8 / fp32"
    )


def shared_encode_numpy(
    x: np.ndarray, cb: np.ndarray, moments: np.ndarray, rounds: int = 3, name: str = "cb4-shared"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`shared_encode` in numpy, float64 (the reference the compiled kernel is tested against,
    and the path where numba cannot load)."""
    x = np.asarray(x, dtype=F32)
    n, d = x.shape
    x64 = x.astype(np.float64)
    cbd = cb.astype(np.float64)
    lo_cb, rng_cb = cbd[0], max(cbd[-1] - cbd[0], 1e-12)
    rng, lo = _minmax(x)
    sd = x64.std(axis=1)
    mean = x64.mean(axis=1)
    cb_mean, cb_sd = float(moments[0]), max(float(moments[1]), 1e-12)
    starts = [
        (rng / rng_cb, lo - rng / rng_cb * lo_cb),
        (np.where(sd > 0, sd / cb_sd, 1.0), mean - np.where(sd > 0, sd / cb_sd, 1.0) * cb_mean),
    ]
    best = (np.full(n, np.inf), np.ones(n, np.float16), np.zeros(n, np.float16), np.zeros((n, d), np.uint8))
    for scale, off in starts:
        for r in range(rounds + 1):
            with np.errstate(over="ignore", invalid="ignore"):
                s16 = to_fp16(scale.astype(F32))
                s16 = np.where(s16 > 0, s16, np.float16(1.0))
                o16 = to_fp16(off.astype(F32))
                s32, o32 = s16.astype(np.float64), o16.astype(np.float64)
                q = _codes_shared((x64 - o32[:, None]) / s32[:, None], cb)
                c = cbd[q]
                sse = ((x64 - o32[:, None] - s32[:, None] * c) ** 2).sum(axis=1)
            sse[~(np.isfinite(s32) & np.isfinite(o32))] = np.inf  # NaN / inf never compare better
            better = sse < best[0]
            best = (
                np.where(better, sse, best[0]),
                np.where(better, s16, best[1]),
                np.where(better, o16, best[2]),
                np.where(better[:, None], q, best[3]),
            )
            if r == rounds:
                break
            cm = c.mean(axis=1)
            cc = ((c - cm[:, None]) ** 2).sum(axis=1)
            cx = ((c - cm[:, None]) * (x64 - mean[:, None])).sum(axis=1)
            ok = (cc > 0) & (cx > 0)
            scale = np.where(ok, cx / np.where(ok, cc, 1.0), s32)
            with np.errstate(invalid="ignore"):  # an inf scale: its candidate is never kept
                off = mean - scale * cm
    lost = ~np.isfinite(best[0])
    if lost.any():
        raise _span_error(name, int(np.flatnonzero(lost)[0]), rng_cb)
    return best[1], best[2], best[3]
