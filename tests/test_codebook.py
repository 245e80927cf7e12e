"""Codebook formats against independent references: brute-force partitions and faiss k-means
for the 1-D k-means DP, the exact DP for cb4-row, int4-greedy / int2 for the shared codebook
and product quantization."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from embq.embedding.codebook import kmeans1d_dp
from embq.embedding.packing import unpack_codes
from embq.embedding.registry import get_format
from embq.errors import FormatError
from tests.reference import kmeans1d_exact

F32 = np.float32


def make(kind: str, n: int, d: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gauss":
        x = rng.standard_normal((n, d)) * 0.1
    elif kind == "student_t":
        x = rng.standard_t(3, (n, d)) * 0.05
    else:  # trained-like: a few dominant coordinates, per-row norms
        x = rng.standard_normal((n, d)) * 0.02
        x[:, :4] += rng.standard_normal((n, 4)) * 0.5
        x *= rng.uniform(0.1, 3.0, (n, 1))
    return np.ascontiguousarray(x, dtype=F32)


def sse(x: np.ndarray, y: np.ndarray) -> float:
    return float(((x.astype(np.float64) - y.astype(np.float64)) ** 2).sum())


def brute_kmeans1d(v: np.ndarray, k: int) -> float:
    """Optimal SSE over every partition of sorted v into at most k contiguous groups."""
    v = np.sort(v.astype(np.float64))
    best = np.inf
    for cuts in itertools.combinations(range(1, len(v)), k - 1):
        parts = np.split(v, cuts)
        best = min(best, sum(((p - p.mean()) ** 2).sum() for p in parts))
    return best


def test_dp_matches_brute_force() -> None:
    x = make("gauss", 12, d=9, seed=1)
    for k in (2, 3, 4):
        got, cents = kmeans1d_exact(x, k)
        ref = np.array([brute_kmeans1d(r, k) for r in x])
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-15)
        assert np.all(np.diff(cents, axis=1) >= 0)


def test_dp_never_loses_to_faiss_kmeans() -> None:
    import faiss

    x = make("student_t", 8, seed=2)
    dp, _ = kmeans1d_exact(x, 16)
    for r in range(len(x)):
        km = faiss.Kmeans(1, 16, niter=50, nredo=5, seed=r)
        km.cp.min_points_per_centroid = 1
        km.train(x[r].reshape(-1, 1))
        c = km.centroids.reshape(-1).astype(np.float64)
        faiss_sse = ((x[r][:, None] - c[None, :]) ** 2).min(axis=1).sum()
        assert dp[r] <= faiss_sse * (1 + 1e-9)


def test_banded_dp_is_exact_on_typical_rows() -> None:
    for kind in ("gauss", "student_t", "trained"):
        x = make(kind, 120, seed=3)
        full, _ = kmeans1d_exact(x)
        band, _ = kmeans1d_dp(x, 16, band=24)
        np.testing.assert_allclose(band, full, rtol=1e-9, atol=1e-15)


@pytest.fixture(scope="module")
def row_cb() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    fmt = get_format("cb4-row")
    out = {}
    for kind in ("gauss", "student_t", "trained"):
        x = make(kind, 160, seed=4)
        out[kind] = (x, fmt.decode(fmt.encode(x), None, 64))
    return out


def test_cb4_row_within_2pct_of_exact_optimum(row_cb) -> None:
    for kind, (x, y) in row_cb.items():
        opt, _ = kmeans1d_exact(x)
        assert sse(x, y) <= 1.02 * opt.sum(), kind


def test_cb4_row_halves_int4_greedy_error(row_cb) -> None:
    g = get_format("int4-greedy")
    for kind, (x, y) in row_cb.items():
        assert sse(x, y) <= 0.5 * sse(x, g.decode(g.encode(x), None, 64)), kind


def test_cb4_row_layout() -> None:
    x = make("gauss", 5, d=8, seed=5)
    fmt = get_format("cb4-row")
    c = fmt.encode(x)
    assert c.shape == (5, 8 // 2 + 32)
    cents = np.ascontiguousarray(c[:, 4:]).view("<f2").astype(F32)
    assert np.all(np.diff(cents, axis=1) >= 0)
    codes = unpack_codes(c[:, :4], 4, 8)
    np.testing.assert_array_equal(fmt.decode(c, None, 8), np.take_along_axis(cents, codes.astype(int), 1))
    # a row with <= 16 distinct values is stored exactly (they are fp16 values here)
    v = np.linspace(-1, 1, 16).astype(np.float16).astype(F32)
    row = np.tile(v, 4)[None, :]
    np.testing.assert_array_equal(fmt.decode(fmt.encode(row), None, 64), row)


@pytest.mark.parametrize("kind", ["gauss", "student_t"])
def test_cb4_shared_beats_int4_greedy_at_equal_bytes(kind: str) -> None:
    x = make(kind, 2400, seed=6)
    fmt, g = get_format("cb4-shared"), get_format("int4-greedy")
    assert fmt.bytes_per_row(64) <= g.bytes_per_row(64)
    params = fmt.fit(x[:1200])
    test = x[1200:]
    ours = sse(test, fmt.decode(fmt.encode(test, params), params, 64))
    assert ours < sse(test, g.decode(g.encode(test), None, 64)), kind


def test_cb4_shared_params_checked() -> None:
    fmt = get_format("cb4-shared")
    x = make("gauss", 50, d=16, seed=7)
    params = fmt.fit(x)
    assert params["codebook"].shape == (16,) and params["moments"].shape == (2,)
    bad = dict(params, codebook=params["codebook"][::-1].copy())
    with pytest.raises(FormatError, match="ascending"):
        fmt.encode(x, bad)
    with pytest.raises(FormatError, match="fit"):
        fmt.decode(fmt.encode(x, params), {"codebook": params["codebook"]}, 16)


@pytest.mark.parametrize("big", [70000.0, -1e7])
def test_cb4_shared_refuses_values_fp16_cannot_hold(big: float) -> None:
    """Like every fp16-qparam format: fit and encode name the row; nothing is spent on it."""
    fmt = get_format("cb4-shared")
    x = make("gauss", 200, d=16, seed=8)
    params = fmt.fit(x)
    y = x.copy()
    y[37, 5] = big
    with pytest.raises(FormatError, match=r"cb4-shared: row 37 .*65504"):
        fmt.fit(y)
    with pytest.raises(FormatError, match=r"cb4-shared: row 37 .*65504"):
        fmt.encode(y, params)
    y[37, 5] = 65504.0  # the largest fp16 value is fine (its row is coarse, but stored)
    out = fmt.decode(fmt.encode(y, params), params, 16)
    assert np.isfinite(out).all()


def test_cb4_shared_refuses_a_range_its_fp16_scale_cannot_map() -> None:
    """A row whose span over the codebook's span overflows the fp16 scale: a FormatError naming
    it, never inf / NaN rows in the table."""
    fmt = get_format("cb4-shared")
    narrow = {"codebook": np.linspace(0, 1e-3, 16).astype(F32),
              "moments": np.array([5e-4, 3e-4], F32)}  # fmt: skip
    x = make("gauss", 6, d=16, seed=9)
    np.testing.assert_allclose(fmt.decode(fmt.encode(x, narrow), narrow, 16), x, atol=0.05)
    x[4] *= 1e3  # ~100 units wide: a scale of ~1e5 per codebook unit
    with pytest.raises(FormatError, match=r"cb4-shared: row 4 .*overflows 65504"):
        fmt.encode(x, narrow)


@pytest.mark.parametrize("name", ["pq32x4", "pq16x8"])
def test_pq_beats_int2_with_fewer_bytes(name: str) -> None:
    x = make("gauss", 3000, seed=8)
    pq, i2 = get_format(name), get_format("int2")
    assert pq.bytes_per_row(64) < i2.bytes_per_row(64)
    params = pq.fit(x[:2000])
    test = x[2000:]
    ours = sse(test, pq.decode(pq.encode(test, params), params, 64))
    assert ours < sse(test, i2.decode(i2.encode(test), None, 64))


def test_pq_decode_is_faiss_reconstruction() -> None:
    import faiss

    x = make("trained", 600, d=32, seed=9)
    fmt = get_format("pq8x4")
    params = fmt.fit(x)
    codes = fmt.encode(x, params)
    pq = faiss.ProductQuantizer(32, 8, 4)
    faiss.copy_array_to_vector(params["centroids"].ravel(), pq.centroids)
    np.testing.assert_array_equal(codes, pq.compute_codes(x))
    np.testing.assert_array_equal(fmt.decode(codes, params, 32), pq.decode(codes))
    with pytest.raises(FormatError, match="not for dim"):
        fmt.decode(codes, params, 64)
