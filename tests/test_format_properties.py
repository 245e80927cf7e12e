"""Property tests (hypothesis) of every format family on arbitrary finite rows: signed zeros,
subnormals, constant rows, values at the fp16 limit, mixed magnitudes.

Each decoded row is checked against the format's own error bound, computed in float64 from the
stored bytes: row-wise formats land on the nearest level of their stored (fp16 scale, fp16
bias) grid, clamped to it, and min/max picks that grid from the row's extremes (half a step
plus the fp16 rounding of the qparams); codebook formats decode to one of their stored
centroids, the nearest. Independent references where they exist: fbgemm's packer and ATen's
GREEDY prepack for bytes, numpy's float16 cast. Rows holding NaN or +-Inf are refused.
"""

from __future__ import annotations

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from embq.embedding.registry import get_format
from embq.embedding.rowwise import (
    decode_fused,
    encode_ranges,
    encode_ranges_numpy,
    qmax_of,
    row_extremes,
    split_fused,
)
from embq.errors import FormatError

F32 = np.float32
FP16_MAX = 65504.0
EPS32 = float(np.finfo(F32).eps)
# Deterministic (make test reruns the same examples) and quick: a few dozen rows per property.
PROPS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


def finite(limit: float = FP16_MAX) -> st.SearchStrategy[float]:
    """float32 values within +-limit: hypothesis favours 0.0, -0.0, subnormals and the ends."""
    return st.floats(-limit, limit, width=32, allow_nan=False, allow_subnormal=True)


@st.composite
def tables(draw, dims: tuple[int, ...], limit: float = FP16_MAX) -> np.ndarray:
    """float32 [n, d] rows: arbitrary values, or constant rows, or one row scale times small
    integers (many ties), or a few magnitudes apart, or zeros of both signs among a few values."""
    d = draw(st.sampled_from(dims))
    n = draw(st.integers(1, 5))
    kind = draw(st.sampled_from(["any", "constant", "ties", "scaled", "zeros"]))
    if kind == "zeros":
        x = draw(arrays(F32, (n, d), elements=st.sampled_from([-0.0, 0.0, 1.0, -1.0, 2.0**-24])))
    elif kind == "any":
        x = draw(arrays(F32, (n, d), elements=finite(limit)))
    elif kind == "constant":
        x = np.repeat(draw(arrays(F32, (n, 1), elements=finite(limit))), d, axis=1)
    elif kind == "ties":
        step = draw(st.floats(2.0**-20, limit / 16, width=32))
        x = (draw(arrays(np.int8, (n, d), elements=st.integers(-8, 8))) * step).astype(F32)
    else:
        mags = np.asarray(draw(st.lists(st.sampled_from([1e-30, 1e-6, 1e-2, 1.0, 300.0]),
                                        min_size=n, max_size=n)))  # fmt: skip
        x = (draw(arrays(F32, (n, d), elements=st.floats(-1, 1, width=32))) * mags[:, None])
    return np.ascontiguousarray(np.clip(x, -limit, limit), dtype=F32)


def stored_qparams(codes: np.ndarray, bits: int, dim: int) -> tuple[np.ndarray, ...]:
    """(scale, bias) float64 [n] and codes [n, dim] read back from fused SBHalf rows."""
    q, scale, bias = split_fused(codes, bits, dim)
    return scale.astype(np.float64), bias.astype(np.float64), q


def grid_error(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, bits: int) -> np.ndarray:
    """float64 distance of each value to the nearest level of its row's clamped grid
    {bias + k * scale, k = 0..qmax}."""
    k = np.clip(np.rint((x - bias[:, None]) / scale[:, None]), 0, qmax_of(bits))
    return np.abs(x - (bias[:, None] + k * scale[:, None]))


def slack(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, bits: int) -> np.ndarray:
    """Float32 arithmetic in the encoder and decoder: a few ulps of the largest magnitude."""
    big = np.maximum(np.abs(x).max(axis=1), np.abs(bias) + qmax_of(bits) * np.abs(scale))
    return 8 * EPS32 * big[:, None] + 1e-45


def check_rowwise(x: np.ndarray, codes: np.ndarray, decoded: np.ndarray, bits: int) -> tuple:
    """Every value decodes to the nearest level of its row's stored grid (the clamping
    included); returns the stored (scale, bias) float64 [n]. The scale is negative when fp16
    rounds a near-constant row's min above its max (fbgemm and ATen do so): the grid then
    runs downwards from the bias, still onto the row."""
    xd = x.astype(np.float64)
    scale, bias, _ = stored_qparams(codes, bits, x.shape[1])
    assert np.isfinite(scale).all() and np.isfinite(bias).all() and (scale != 0).all()
    err = np.abs(decoded.astype(np.float64) - xd)
    assert (err <= grid_error(xd, scale, bias, bits) + slack(xd, scale, bias, bits)).all()
    return scale, bias


# --------------------------------------------------------------------------- fp32 / fp16


@PROPS
@given(tables((1, 3, 16)))
def test_fp32_is_exact(x):
    fmt = get_format("fp32")
    y = fmt.decode(fmt.encode(x), None, x.shape[1])
    np.testing.assert_array_equal(y.view(np.uint32), x.view(np.uint32))  # -0.0 and subnormals too


@PROPS
@given(tables((1, 3, 16)))
def test_fp16_is_numpys_round_to_nearest_even(x):
    fmt = get_format("fp16")
    y = fmt.decode(fmt.encode(x), None, x.shape[1])
    ref = x.astype(np.float16).astype(F32)  # the IEEE cast, signs of zeros kept
    np.testing.assert_array_equal(y.view(np.uint32), ref.view(np.uint32))
    with np.errstate(over="ignore"):  # the spacing above 65504 is inf: fine as a bound
        ulp = np.spacing(np.abs(ref).astype(np.float16)).astype(np.float64)
    assert (np.abs(y.astype(np.float64) - x) <= ulp / 2).all()


# --------------------------------------------------------------------------- row-wise uniform


@PROPS
@pytest.mark.parametrize("bits", [8, 4, 2])
@given(x=tables((8, 16, 64)))
def test_minmax_within_half_a_step_plus_qparam_rounding(bits, x):
    fmt = get_format(f"int{bits}")
    codes = fmt.encode(x)
    np.testing.assert_array_equal(  # fbgemm's own packer: the bytes TorchRec would write
        codes, torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(torch.from_numpy(x), bits).numpy())
    y = fmt.decode(codes, None, x.shape[1])
    scale, bias = check_rowwise(x, codes, y, bits)
    xd = x.astype(np.float64)
    lo, hi = xd.min(axis=1), xd.max(axis=1)
    qmax = qmax_of(bits)
    np.testing.assert_array_equal(bias, lo.astype(np.float16).astype(np.float64))  # fp16(min)
    exact = (hi - bias) / qmax
    wide = np.abs(exact) > 2.0**-24  # a step fp16 can hold; otherwise fbgemm uses scale 1
    ulp16 = np.abs(np.spacing(exact.astype(np.float16)).astype(np.float64))
    assert (np.abs(scale - exact)[wide] <= ulp16[wide]).all()
    assert (scale[~wide] == 1.0).all() or (hi - lo)[~wide].max() <= 2.0**-23
    # the format's bound: half a step, plus what rounding the qparams to fp16 moved the ends
    ends = np.sort(np.stack([bias, bias + qmax * scale]), axis=0)
    bound = np.abs(scale) / 2 + np.maximum(ends[0] - lo, 0) + np.maximum(hi - ends[1], 0)
    err = np.abs(y.astype(np.float64) - xd)
    assert (err <= bound[:, None] + slack(xd, scale, bias, bits)).all()


@PROPS
@pytest.mark.parametrize("bits", [4, 2])
@given(x=tables((8, 16, 64)))
def test_greedy_is_atens_prepack_and_clips_inside_the_row(bits, x):
    fmt = get_format(f"int{bits}-greedy")
    codes = fmt.encode(x)
    aten = getattr(torch.ops.quantized, f"embedding_bag_{bits}bit_prepack")
    np.testing.assert_array_equal(codes, aten(torch.from_numpy(x), True, 200, 0.16).numpy())
    check_clipped_search(x, codes, fmt.decode(codes, None, x.shape[1]), bits)


@PROPS
@pytest.mark.parametrize("bits", [4, 2])
@given(x=tables((8, 16, 64)))
def test_opt_search_never_loses_to_minmax(bits, x):
    """Its bound is min/max's: that range is among its candidates (scores are float32 sums,
    ~1e-5 relative, hence the tolerance). It may move the bias a few fp16 steps below the row's
    minimum, so no clipping-inside check here."""
    fmt = get_format(f"int{bits}-opt")
    codes = fmt.encode(x)
    y = fmt.decode(codes, None, x.shape[1])
    check_rowwise(x, codes, y, bits)
    mm = get_format(f"int{bits}")
    base = mm.decode(mm.encode(x), None, x.shape[1]).astype(np.float64)
    xd = x.astype(np.float64)
    ours, theirs = ((y - xd) ** 2).sum(axis=1), ((base - xd) ** 2).sum(axis=1)
    assert (ours <= theirs * (1 + 1e-4) + 1e-30).all()


def check_clipped_search(x: np.ndarray, codes: np.ndarray, y: np.ndarray, bits: int) -> None:
    """A searched range lies inside the row (up to fp16 rounding of its qparams): its bias no
    lower than fp16(min), its top no higher than max plus the rounding of the scale; values
    decode to the nearest level of that grid, values outside it to its ends. (A step below
    fp16's smallest subnormal is stored as scale 1, as fbgemm does: the row is then all bias.)"""
    scale, bias = check_rowwise(x, codes, y, bits)
    xd = x.astype(np.float64)
    lo, hi = xd.min(axis=1), xd.max(axis=1)
    assert (bias >= lo.astype(np.float16).astype(np.float64)).all()
    top = bias + qmax_of(bits) * scale
    ulp16 = np.spacing(scale.astype(np.float16)).astype(np.float64)
    underflow = (scale == 1.0) & ((hi - bias) / qmax_of(bits) < 2.0**-24)
    assert ((top <= hi + qmax_of(bits) * ulp16) | (hi == lo) | underflow).all()


@PROPS
@pytest.mark.parametrize("bits", [4, 2])
@given(x=tables((8, 16, 64)))
def test_fallback_encoders_give_fbgemms_bytes(bits, x):
    """Without fbgemm_gpu, min/max rows come from embq's compiled or numpy encoder: fbgemm's
    bytes, except the sign of a zero bias where a row's minimum is a zero of both signs (which
    zero a min reduction returns depends on its order); the decoded rows are the same."""
    ref = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(torch.from_numpy(x), bits).numpy()
    lo, hi = row_extremes(x)
    for ours in (encode_ranges(x, lo, hi, bits), encode_ranges_numpy(x, x.min(axis=1), x.max(axis=1), bits)):
        differ = ours != ref
        zero_bias = (ref[:, -2:].view("<f2")[:, 0] == 0)[:, None]
        sign_byte = np.arange(ref.shape[1]) == ref.shape[1] - 1
        assert not (differ & ~(zero_bias & sign_byte & ((ours ^ ref) == 0x80))).any()
        np.testing.assert_array_equal(decode_fused(ours, bits, x.shape[1]), decode_fused(ref, bits, x.shape[1]))


# --------------------------------------------------------------------------- codebooks


@PROPS
@given(tables((2, 8, 16)))
def test_cb4_row_decodes_to_its_nearest_stored_centroid(x):
    fmt = get_format("cb4-row")
    codes = fmt.encode(x)
    y = fmt.decode(codes, None, x.shape[1]).astype(np.float64)
    cents = np.ascontiguousarray(codes[:, -32:]).view("<f2").astype(np.float64)  # [n, 16]
    assert np.isfinite(cents).all() and (np.diff(cents, axis=1) >= 0).all()
    assert (y[:, :, None] == cents[:, None, :]).any(axis=2).all()  # one of the row's centroids
    xd = x.astype(np.float64)
    nearest = np.abs(xd[:, :, None] - cents[:, None, :]).min(axis=2)
    assert (np.abs(y - xd) <= nearest).all()


@pytest.fixture(scope="module")
def shared_params() -> dict:
    sample = (np.random.default_rng(0).standard_normal((400, 16)) * 0.1).astype(F32)
    return get_format("cb4-shared").fit(sample)


@PROPS
@given(x=tables((16,), limit=1000.0))
def test_cb4_shared_decodes_to_the_nearest_level_of_its_row(shared_params, x):
    """x_hat = offset + scale * codebook[code], with the nearest code for the row's stored fp16
    (scale, offset)."""
    fmt = get_format("cb4-shared")
    codes = fmt.encode(x, shared_params)
    y = fmt.decode(codes, shared_params, 16).astype(np.float64)
    n = x.shape[0]
    scale, off = np.ascontiguousarray(codes[:, -4:]).view("<f2").reshape(n, 2).astype(np.float64).T
    assert np.isfinite(scale).all() and np.isfinite(off).all() and (scale > 0).all()
    levels = off[:, None] + scale[:, None] * shared_params["codebook"].astype(np.float64)  # [n, 16]
    xd = x.astype(np.float64)
    nearest = np.abs(xd[:, :, None] - levels[:, None, :]).min(axis=2)
    tol = 4 * EPS32 * (np.abs(levels).max(axis=1) + np.abs(xd).max(axis=1))[:, None] + 1e-45
    assert (np.abs(y - xd) <= nearest + tol).all()
    assert (np.abs(y[:, :, None] - levels[:, None, :]).min(axis=2) <= tol).all()


@PROPS
@given(x=tables((16,), limit=1000.0))
def test_cb4_shared_fit_on_any_sample_gives_a_usable_codebook(x):
    params = get_format("cb4-shared").fit(x)
    cb = params["codebook"]
    assert cb.shape == (16,) and np.isfinite(cb).all() and (np.diff(cb) >= 0).all()
    assert np.isfinite(params["moments"]).all()
    y = get_format("cb4-shared").decode(get_format("cb4-shared").encode(x, params), params, 16)
    assert np.isfinite(y).all()


@pytest.fixture(scope="module")
def pq_params() -> dict:
    sample = (np.random.default_rng(1).standard_normal((256, 16)) * 0.1).astype(F32)
    return get_format("pq4x4").fit(sample)


@PROPS
@given(x=tables((16,), limit=1000.0))
def test_pq_decodes_each_subvector_to_its_nearest_centroid(pq_params, x):
    fmt = get_format("pq4x4")
    y = fmt.decode(fmt.encode(x, pq_params), pq_params, 16).astype(np.float64)
    cents = pq_params["centroids"].astype(np.float64)  # [4, 16, 4]
    xs = x.astype(np.float64).reshape(-1, 4, 1, 4)
    dist = ((xs - cents[None]) ** 2).sum(axis=3)  # [n, 4, 16]
    got = ((y.reshape(-1, 4, 1, 4) - cents[None]) ** 2).sum(axis=3).min(axis=2)
    assert (got <= 1e-6 * (1 + (xs**2).sum(axis=3).max())).all()  # y is one of the centroids
    ours = ((xs[:, :, 0, :] - y.reshape(-1, 4, 4)) ** 2).sum(axis=2)
    best = dist.min(axis=2)
    assert (ours <= best + 1e-5 * (best + (xs[:, :, 0, :] ** 2).sum(axis=2)) + 1e-30).all()


# --------------------------------------------------------------------------- refusals

ALL = ["fp32", "fp16", "int8", "int4", "int2", "int4-greedy", "int2-greedy", "int4-opt", "int2-opt",
       "cb4-row", "cb4-shared", "pq4x4"]  # fmt: skip


@PROPS
@pytest.mark.parametrize("name", ALL)
@given(x=tables((16,), limit=1000.0), bad=st.sampled_from([np.nan, np.inf, -np.inf]),
       where=st.tuples(st.integers(0, 4), st.integers(0, 15)))  # fmt: skip
def test_non_finite_rows_are_refused_naming_the_row(name, shared_params, pq_params, x, bad, where):
    fmt = get_format(name)
    params = {"cb4-shared": shared_params, "pq4x4": pq_params}.get(name, {})
    i = where[0] % x.shape[0]
    x = x.copy()
    x[i, where[1]] = bad
    with pytest.raises(FormatError, match=rf"row {i}\b"):
        fmt.encode(x, params)
    if name in ("cb4-shared", "pq4x4"):
        with pytest.raises(FormatError, match="NaN or Inf"):
            fmt.fit(np.concatenate([x] * 64))
