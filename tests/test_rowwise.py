"""Row-wise uniform quantization against independent references: fbgemm / ATen ops for bytes,
float64 numpy for errors, and the exhaustive grid search for the better range search; the
compiled (numba) kernels also against the numpy reference implementations, bit for bit."""

from __future__ import annotations

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import numpy as np
import pytest
import torch

from embq.embedding import compiled
from embq.embedding.compiled import compiled_kernels, kernel_engine
from embq.embedding.fp16 import to_fp16
from embq.embedding.greedy import greedy_loss_exact, greedy_ranges, greedy_ranges_numpy
from embq.embedding.opt_search import opt_qparams, opt_qparams_numpy, opt_ranges, ranges_for_qparams
from embq.embedding.packing import pack_codes, unpack_codes
from embq.embedding.parallel import run_rows
from embq.embedding.rowwise import (
    decode_fused,
    encode_minmax,
    encode_ranges,
    encode_ranges_numpy,
    fused_row_bytes,
    minmax_ranges,
    qmax_of,
    qparams,
    row_extremes,
    row_sse,
    split_fused,
)
from tests.reference import exhaustive_ranges

F32 = np.float32


def make_rows(kind: str, n: int = 300, d: int = 64, seed: int = 0) -> np.ndarray:
    """Test rows, float32 [n, d], of several shapes seen in (or adversarial for) real tables."""
    rng = np.random.default_rng(seed)
    if kind == "gauss":
        x = rng.standard_normal((n, d)) * 0.1
    elif kind == "student_t":
        x = rng.standard_t(3, (n, d)) * 0.05
    elif kind == "constant":
        x = np.repeat(rng.standard_normal((n, 1)), d, axis=1)
    elif kind == "tiny":  # ranges around 1e-6; scales that underflow fp16 at 2 bits
        x = rng.standard_normal((n, d)) * 1e-6
    elif kind == "trained":  # a few dominant coordinates, per-row norms, small offsets
        x = rng.standard_normal((n, d)) * 0.02
        x[:, :4] += rng.standard_normal((n, 4)) * 0.5
        x *= rng.uniform(0.1, 3.0, (n, 1))
        x += rng.standard_normal((n, 1)) * 0.01
    elif kind == "offset":  # |values| >> range: fp16 rounding of the bias dominates
        x = 3.0 + rng.standard_normal((n, d)) * 0.01
    elif kind == "grid":  # values on a coarse grid: exact ties in rounding and in losses
        x = rng.integers(-8, 8, (n, d)) / 16.0
    elif kind == "outlier":
        x = rng.standard_normal((n, d)) * 0.05
        x[np.arange(n), rng.integers(0, d, n)] = rng.choice([-1.0, 1.0], n) * rng.uniform(0.5, 3, n)
    else:
        raise ValueError(kind)
    return np.ascontiguousarray(x, dtype=F32)


KINDS = ["gauss", "student_t", "constant", "tiny", "trained", "offset", "grid", "outlier"]


def aten_prepack(x: np.ndarray, bits: int, optimized: bool, n_bins: int = 200, ratio: float = 0.16):
    op = getattr(torch.ops.quantized, f"embedding_bag_{bits}bit_prepack")
    return op(torch.from_numpy(x), optimized, n_bins, ratio).numpy()


# ------------------------------------------------------------------ bytes: min/max


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_minmax_bytes_match_fbgemm(kind: str, bits: int) -> None:
    x = make_rows(kind, n=200)
    ours = encode_ranges(x, *minmax_ranges(x), bits)
    ref = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(torch.from_numpy(x), bits)
    assert ours.shape == (200, fused_row_bytes(64, bits))
    np.testing.assert_array_equal(ours, ref.numpy())


def signed_zero_rows(n: int, d: int, seed: int) -> np.ndarray:
    """Rows whose minimum is a zero of both signs (+0.0 and -0.0 in different SIMD lanes and in
    the tail), all-zero rows of either or mixed sign, and ordinary rows between them."""
    rng = np.random.default_rng(seed)
    x = np.abs(rng.standard_normal((n, d))).astype(F32) * F32(0.1)
    for r in range(n):
        kind = r % 4
        if kind == 3:
            x[r] = -x[r]  # an ordinary all-negative row
            continue
        cols = rng.choice(d, size=min(d, 1 + r % 5), replace=False)
        x[r, cols] = rng.choice(np.array([0.0, -0.0], F32), size=cols.size)
        if kind == 2:
            x[r] = rng.choice(np.array([0.0, -0.0], F32), size=d)
    return x


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_minmax_encoder_is_fbgemms_packer_byte_for_byte(bits: int) -> None:
    """encode_minmax (the compiled kernel where numba runs) against fbgemm's own packer on rows
    over several blocks, dims with a tail past fbgemm's 8 lanes, signed zeros (which zero a row's
    bias keeps depends on fbgemm's reduction order), values at +-65504, subnormals and constants."""
    op = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf
    step = 16 // bits
    for d in sorted({step, 3 * step, 5 * step, 64, 13 * step}):
        for n in (1, 255, 257, 600):
            x = np.concatenate([signed_zero_rows(n // 2, d, seed=d + n),
                                make_rows(KINDS[(d + n) % len(KINDS)], n=n - n // 2, d=d, seed=n)])
            x[min(n - 1, 3), 0] = 65504.0
            x[n // 2, -1] = -65504.0
            x[n - 1, d // 2] = 2.0**-140  # a float32 subnormal: fp16 rounds it to zero
            ours = encode_minmax(x, bits, 65504.0)
            np.testing.assert_array_equal(ours, op(torch.from_numpy(x), bits).numpy(), err_msg=f"d={d} n={n}")


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_minmax_encoder_refuses_nan_inf_and_fp16_overflow(bits: int) -> None:
    """None for any NaN (either sign, any payload), +-inf or |value| > 65504, wherever it is
    (first row, a later block, the last value); exactly +-65504 passes."""
    x = make_rows("gauss", n=600, d=32, seed=5)
    big = np.nextafter(F32(65504.0), F32(np.inf))
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF], np.uint32).view(F32)
    for value in (*nans, np.inf, -np.inf, big, -big):
        for r, c in ((0, 0), (300, 17), (599, 31)):
            y = x.copy()
            y[r, c] = value
            assert encode_minmax(y, bits, 65504.0) is None, (value, r, c)
    y = x.copy()
    y[0, 0], y[599, 31] = 65504.0, -65504.0
    assert encode_minmax(y, bits, 65504.0) is not None


def test_minmax_encoder_without_numba_gives_the_same_bytes(monkeypatch) -> None:
    x = np.concatenate([make_rows("trained", n=300, d=64, seed=8), signed_zero_rows(40, 64, seed=9)])
    with_kernel = encode_minmax(x, 4, 65504.0)
    y = x.copy()
    y[7, 7] = np.nan
    monkeypatch.setattr(compiled, "_LOADED", [None])  # as if numba could not load
    np.testing.assert_array_equal(encode_minmax(x, 4, 65504.0), with_kernel)
    assert encode_minmax(y, 4, 65504.0) is None


@pytest.mark.parametrize("bits", [4, 2])
def test_minmax_bytes_match_aten_prepack(bits: int) -> None:
    x = make_rows("trained", n=200, d=96)
    ours = encode_ranges(x, *minmax_ranges(x), bits)
    np.testing.assert_array_equal(ours, aten_prepack(x, bits, optimized=False))


def test_reference_byte_example() -> None:
    """The worked example of the reference doc: LSB-first nibbles, fp16 scale then bias."""
    x = np.array([[0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 1.5]], F32)
    four = encode_ranges(x, *minmax_ranges(x), 4)
    assert four[0].tolist() == [16, 50, 84, 246, 0x66, 0x2E, 0, 0]
    two = encode_ranges(x, *minmax_ranges(x), 2)
    assert two[0].tolist() == [64, 213, 0x00, 0x38, 0, 0]


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_decode_matches_fbgemm(bits: int) -> None:
    x = make_rows("student_t", n=200)
    fused = encode_ranges(x, *minmax_ranges(x), bits)
    ref = torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(torch.from_numpy(fused), bits)
    np.testing.assert_array_equal(decode_fused(fused, bits, 64), ref.numpy())


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pack_unpack_roundtrip(bits: int) -> None:
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 1 << bits, (50, 40), dtype=np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (50, 40 * bits // 8)
    np.testing.assert_array_equal(unpack_codes(packed, bits, 40), codes)
    if bits == 4:  # element 0 in the low nibble
        np.testing.assert_array_equal(packed[:, 0], codes[:, 0] | (codes[:, 1] << 4))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_dequantization_error_float64(bits: int) -> None:
    """Against float64 math: unclipped values land within half a step of the decoded value,
    and the decoded value is the level of the nearest code."""
    x = make_rows("gauss", n=200)
    fused = encode_ranges(x, *minmax_ranges(x), bits)
    codes, scale, bias = split_fused(fused, bits, 64)
    s = scale.astype(np.float64)[:, None]
    b = bias.astype(np.float64)[:, None]
    u = (x.astype(np.float64) - b) / s
    expect = np.clip(np.rint(u), 0, (1 << bits) - 1)
    # float32 rounding may flip a code only where u sits (almost) on a half-integer
    flip = codes != expect
    assert np.all(np.abs(np.abs(u - np.floor(u)) - 0.5)[flip] < 1e-4)
    err = np.abs(decode_fused(fused, bits, 64).astype(np.float64) - x)
    top = b + s * ((1 << bits) - 1)
    inside = x.astype(np.float64) <= top + 1e-7
    assert np.all(err[inside] <= (0.5 + 1e-4) * np.broadcast_to(s, x.shape)[inside])


def test_constant_rows_scale_one() -> None:
    x = np.full((3, 16), 0.25, F32)
    fused = encode_ranges(x, *minmax_ranges(x), 4)
    codes, scale, bias = split_fused(fused, 4, 16)
    assert np.all(scale == 1.0) and np.all(bias == 0.25) and np.all(codes == 0)
    np.testing.assert_array_equal(decode_fused(fused, 4, 16), x)


def test_fp16_cast_matches_numpy() -> None:
    rng = np.random.default_rng(2)
    v = (rng.standard_normal(200_000) * np.exp2(rng.uniform(-30, 17, 200_000))).astype(F32)
    halves = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
    ties = ((halves[:-1] + halves[1:]) / 2).astype(F32)
    for arr in (v, ties, -ties):
        with np.errstate(over="ignore"):
            ref = arr.astype(np.float16)
        np.testing.assert_array_equal(to_fp16(arr).view(np.uint16), ref.view(np.uint16))


# ------------------------------------------------------------------ GREEDY == ATen


@pytest.mark.parametrize("dim", [16, 64, 128])
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_bytes_identical_to_aten(kind: str, bits: int, dim: int) -> None:
    """The compiled GREEDY (the default path) against ATen's own op, byte for byte."""
    x = make_rows(kind, n=300, d=dim, seed=3 + dim)
    ours = encode_ranges(x, *greedy_ranges(x, bits), bits)
    np.testing.assert_array_equal(ours, aten_prepack(x, bits, optimized=True))


def test_greedy_bytes_identical_to_aten_mixed_table() -> None:
    """A larger table mixing every kind and per-row scales over 5 decades, split into several
    pieces across threads."""
    rng = np.random.default_rng(12)
    x = np.concatenate([make_rows(k, n=400, seed=12) for k in KINDS])
    x = (x * np.exp(rng.uniform(-6, 5, (x.shape[0], 1)))).astype(F32)
    x = x[rng.permutation(x.shape[0])]
    for bits in (4, 2):
        lo, hi = greedy_ranges(x, bits, chunk=300)
        ours = encode_ranges(x, lo, hi, bits)
        np.testing.assert_array_equal(ours, aten_prepack(x, bits, True))


@pytest.mark.parametrize("n_bins,ratio", [(100, 0.3), (50, 0.5)])
def test_greedy_other_parameters(n_bins: int, ratio: float) -> None:
    x = make_rows("student_t", n=100, seed=4)
    ours = encode_ranges(x, *greedy_ranges(x, 4, n_bins, ratio), 4)
    np.testing.assert_array_equal(ours, aten_prepack(x, 4, True, n_bins, ratio))


def test_greedy_dims_and_chunks() -> None:
    """Other dims, and a table split into several chunks across threads."""
    for d in (8, 128):
        x = make_rows("gauss", n=80, d=d, seed=d)
        ours = encode_ranges(x, *greedy_ranges(x, 4), 4)
        np.testing.assert_array_equal(ours, aten_prepack(x, 4, optimized=True))
    x = make_rows("trained", n=1500, seed=5)
    lo, hi = greedy_ranges(x, 4, chunk=256)
    np.testing.assert_array_equal(encode_ranges(x, lo, hi, 4), aten_prepack(x, 4, True))


def test_greedy_exact_loss_order() -> None:
    """greedy_loss_exact sums in element order: equal to an explicit float32 loop."""
    x = make_rows("outlier", n=20, seed=6)
    lo, hi = x.min(axis=1) + F32(0.01), x.max(axis=1)
    got = greedy_loss_exact(np.ascontiguousarray(x.T), lo, hi, 4)
    for r in range(20):
        b = F32(np.float16(lo[r]))
        s = F32(np.float16((hi[r] - b) / F32(15)))
        inv = F32(1) / s
        acc = F32(0)
        for v in x[r]:
            q = min(max(np.rint((v - b) * inv), F32(0)), F32(15))
            e = v - (F32(q) * s + b)
            acc = F32(acc + F32(e * e))
        assert got[r] == np.sqrt(acc)


def test_greedy_terminates_where_aten_would_not() -> None:
    """Near 1.0 with a ~1e-6 range the step is absorbed by float32 rounding: ATen's loop never
    ends there; ours stops when the position stops moving."""
    x = (1.0 + np.linspace(0, 1e-6, 16)).astype(F32)[None, :]
    lo, hi = greedy_ranges(x, 4)
    assert lo[0] >= x.min() and hi[0] <= x.max()
    for fn in (greedy_ranges, greedy_ranges_numpy):
        lo, hi = fn(x, 4)
        assert lo[0] >= x.min() and hi[0] <= x.max()


def test_greedy_signed_zero_extremes() -> None:
    """Rows whose min (or max) is 0 held as both -0.0 and 0.0: ATen takes the first one
    (std::min_element), and its sign reaches the fp16 bias bytes."""
    rng = np.random.default_rng(17)
    x = rng.random((200, 16)).astype(F32)
    for t in range(200):
        i, j = rng.choice(16, 2, replace=False)
        x[t, i], x[t, j] = (F32(-0.0), F32(0.0)) if t % 2 else (F32(0.0), F32(-0.0))
    x[::3] *= F32(-1.0)
    for bits in (4, 2):
        ref = aten_prepack(x, bits, optimized=True)
        for fn in (greedy_ranges, greedy_ranges_numpy):
            np.testing.assert_array_equal(encode_ranges(x, *fn(x, bits), bits), ref)


# ------------------------------------------------------------------ compiled kernels == numpy


@pytest.fixture(scope="module")
def kernels():
    k = compiled_kernels()
    k = None if k is None else k.greedy
    if k is None:
        pytest.skip("numba kernels unavailable (numba missing or EMBQ_NO_NUMBA set)")
    return k


@pytest.mark.parametrize("bits", [4, 2])
def test_greedy_kernel_matches_numpy_reference(kernels, bits: int) -> None:
    for kind in KINDS:
        for d in (16, 64, 128):
            x = make_rows(kind, n=120, d=d, seed=20 + d)
            got = greedy_ranges(x, bits)
            ref = greedy_ranges_numpy(x, bits)
            np.testing.assert_array_equal(got[0], ref[0], err_msg=f"{kind} d={d}")
            np.testing.assert_array_equal(got[1], ref[1], err_msg=f"{kind} d={d}")


def test_greedy_kernel_stuck_rows_match_numpy(kernels) -> None:
    """Rows of a few float32 ulps (where ATen would loop forever or crawl): the kernel stops
    where the numpy reference stops."""
    rng = np.random.default_rng(13)
    rows = []
    for c in (1.0, 100.0, -3.0, 0.5):
        ulp = np.spacing(F32(c))
        for k in (1, 3, 10, 60, 150, 199, 200, 201, 400, 1000):
            for _ in range(3):
                rows.append(F32(c) + (rng.random(16) * k * ulp).astype(F32))
    x = np.array(rows, F32)
    for bits in (4, 2):
        got, ref = greedy_ranges(x, bits), greedy_ranges_numpy(x, bits)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])


def test_kernel_loss_is_atens_float32_order(kernels) -> None:
    """The kernel's loss, bit for bit ATen's sequential float32 sum (greedy_loss_exact, checked
    against a scalar loop above). A fused multiply-add in the compiled sum (LLVM contraction)
    changes ~1 loss in 6 here, so this guards the "no FMA" requirement directly."""
    kinds = ("gauss", "student_t", "trained", "outlier", "offset")
    x = np.concatenate([make_rows(k, n=150, seed=14) for k in kinds])
    lo, hi = x.min(axis=1) + F32(0.003), x.max(axis=1) - F32(0.002)
    for bits in (4, 2):
        out = np.empty(x.shape[0], F32)
        kernels.aten_losses(x, lo, hi, F32(qmax_of(bits)), out)
        ref = greedy_loss_exact(np.ascontiguousarray(x.T), lo, hi, bits)
        np.testing.assert_array_equal(out.view(np.uint32), ref.view(np.uint32))


def test_kernel_fp16_rounding_matches_numpy(kernels) -> None:
    """fp16r / fp16_bits against numpy's float16 cast: a wide random sample, every exact tie
    between neighbouring halves (normal and subnormal), and the overflow boundary. (Checked
    once over all 2^32 float32 bit patterns: no mismatch.)"""
    rng = np.random.default_rng(2)
    v = (rng.standard_normal(200_000) * np.exp2(rng.uniform(-30, 17, 200_000))).astype(F32)
    u = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(F32)
    halves = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
    ties = ((halves[:-1] + halves[1:]) / 2).astype(F32)
    edge = np.array([65504, 65519.996, 65520, 65536, 1e30, np.inf, 0.0, -0.0, 2.0**-14, 2.0**-24,
                     2.0**-25, 2.0**-25 * 1.0000001, 2.0**-26, 1e-45], F32)
    for arr in (v, u, ties, -ties, edge, -edge):
        arr = np.ascontiguousarray(arr)
        with np.errstate(over="ignore", invalid="ignore"):
            ref = arr.astype(np.float16)
        got = np.empty(arr.size, F32)
        kernels.fp16_round_array(arr, got)
        bits = np.empty(arr.size, np.uint16)
        kernels.fp16_bits_array(arr, bits)
        nan = np.isnan(ref)
        want = ref[~nan].astype(F32).view(np.uint32)
        np.testing.assert_array_equal(got[~nan].view(np.uint32), want)
        np.testing.assert_array_equal(bits[~nan], ref[~nan].view(np.uint16))
        assert np.isnan(got[nan]).all()


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_encode_kernel_matches_numpy(kernels, bits: int) -> None:
    """The compiled encoder against the numpy one: ranges inside, outside and across the rows,
    tiny (scale rounding to 0 in fp16), empty (lo == hi) and inverted; dims that pack with and
    without padding."""
    rng = np.random.default_rng(15)
    for d in (64, 13, 1):
        if d > 1:
            x = make_rows("student_t", n=400, d=d, seed=d)
        else:
            x = rng.standard_normal((400, 1)).astype(F32)
        lo, hi = x.min(axis=1), x.max(axis=1)
        cases = [
            (lo, hi),
            (lo + F32(0.1) * (hi - lo), hi - F32(0.2) * (hi - lo)),
            (lo - F32(1.0), hi + F32(0.5)),
            (lo, lo + F32(1e-9)),
            (lo, lo),
            (hi, lo),
            (rng.standard_normal(400).astype(F32), rng.standard_normal(400).astype(F32)),
        ]
        for a, b in cases:
            got = encode_ranges(x, a, b, bits)
            np.testing.assert_array_equal(got, encode_ranges_numpy(x, a, b, bits))


def test_row_extremes_kernel_matches_numpy(kernels) -> None:
    """Row min / max: the compiled pass against numpy's, bit for bit, on heavy-tailed rows,
    one-column rows, constant rows, signed zeros and values near the float32 limits, over
    enough rows to be split across threads."""
    rng = np.random.default_rng(21)
    big = np.finfo(F32).max
    specials = np.array([[0.0, -0.0, 0.0], [-0.0, 0.0, -0.0], [big, -big, 1.0], [3.0, 3.0, 3.0]], F32)
    for x in (make_rows("student_t", n=20000, d=64, seed=3),
              rng.standard_normal((9000, 1)).astype(F32), specials):  # fmt: skip
        lo, hi = row_extremes(x)
        np.testing.assert_array_equal(lo.view(np.uint32), x.min(axis=1).view(np.uint32))
        np.testing.assert_array_equal(hi.view(np.uint32), x.max(axis=1).view(np.uint32))
        assert lo.dtype == hi.dtype == F32


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dim", [16, 64, 128])
def test_opt_kernel_matches_numpy(kernels, bits: int, dim: int) -> None:
    """The compiled better search returns the numpy reference's (scale, bias) bit for bit."""
    for kind in KINDS:
        x = make_rows(kind, n=100, d=dim, seed=30 + dim)
        s1, b1 = opt_qparams(x, bits)
        s2, b2 = opt_qparams_numpy(x, bits)
        np.testing.assert_array_equal(s1.view(np.uint32), s2.view(np.uint32), err_msg=kind)
        np.testing.assert_array_equal(b1.view(np.uint32), b2.view(np.uint32), err_msg=kind)


def test_numpy_fallback(monkeypatch) -> None:
    """Without numba the numpy paths run, with the same results."""
    x = make_rows("trained", n=200, seed=16)
    with_kernels = (greedy_ranges(x, 4), opt_ranges(x, 2))
    monkeypatch.setattr(compiled, "_LOADED", [None])  # as if numba could not load
    assert kernel_engine() == "numpy"
    lo, hi = greedy_ranges(x, 4)
    np.testing.assert_array_equal(encode_ranges(x, lo, hi, 4), aten_prepack(x, 4, True))
    np.testing.assert_array_equal(lo, with_kernels[0][0])
    np.testing.assert_array_equal(opt_ranges(x, 2)[0], with_kernels[1][0])


def test_run_rows_covers_every_row_once_and_raises() -> None:
    seen = np.zeros(5000, np.int64)

    def fn(r0: int, r1: int) -> None:
        seen[r0:r1] += 1

    run_rows(fn, 5000, most=300, least=100)
    assert np.all(seen == 1)

    def boom(r0: int, r1: int) -> None:
        if r0 >= 1000:
            raise RuntimeError("piece failed")

    with pytest.raises(RuntimeError, match="piece failed"):
        run_rows(boom, 5000, most=300, least=100)


# ------------------------------------------------------------------ better search


@pytest.fixture(scope="module")
def search_rows() -> dict[str, np.ndarray]:
    return {k: make_rows(k, n=96, seed=7) for k in ("gauss", "student_t")}


@pytest.mark.parametrize("bits", [4, 2])
def test_opt_within_half_percent_of_exhaustive(search_rows, bits: int) -> None:
    for kind, x in search_rows.items():
        _, _, best = exhaustive_ranges(x, bits)
        ours = row_sse(x, *opt_ranges(x, bits), bits)
        greedy = row_sse(x, *greedy_ranges(x, bits), bits)
        assert ours.sum() <= 1.005 * best.sum(), (kind, ours.sum() / best.sum())
        limit = 1.0 if bits == 4 else 0.7
        assert ours.sum() < limit * greedy.sum(), (kind, ours.sum() / greedy.sum())


def test_exhaustive_is_a_lower_bound_on_its_grid() -> None:
    """Every grid point, min/max included, scores no better than the exhaustive optimum."""
    x = make_rows("gauss", n=30, seed=8)
    lo, hi, best = exhaustive_ranges(x, 4)
    np.testing.assert_allclose(row_sse(x, lo, hi, 4), best, rtol=1e-12)
    assert np.all(best <= row_sse(x, *minmax_ranges(x), 4) * (1 + 1e-12))
    x64 = x.astype(np.float64)
    step = (x64.max(axis=1) - x64.min(axis=1)) / 200
    for i, j in ((3, 7), (10, 0), (40, 40)):
        lo2 = (x64.min(axis=1) + i * step).astype(F32)
        hi2 = (x64.max(axis=1) - j * step).astype(F32)
        assert np.all(best <= row_sse(x, lo2, hi2, 4) * (1 + 1e-12))


def test_opt_qparams_are_fp16_and_roundtrip() -> None:
    x = make_rows("trained", n=64, seed=9)
    scale, bias = opt_qparams(x, 4)
    assert np.all(scale > 0)
    np.testing.assert_array_equal(scale, scale.astype(np.float16).astype(F32))
    np.testing.assert_array_equal(bias, bias.astype(np.float16).astype(F32))
    lo, hi = ranges_for_qparams(scale, bias, 4)
    s16, b16, _ = qparams(lo, hi, 4)
    np.testing.assert_array_equal(s16.astype(F32), scale)
    np.testing.assert_array_equal(b16.astype(F32), bias)


@pytest.mark.parametrize("kind", ["constant", "tiny", "grid", "outlier", "offset"])
def test_opt_never_worse_than_minmax(kind: str) -> None:
    x = make_rows(kind, n=64, seed=10)
    for bits in (4, 2):
        ours = row_sse(x, *opt_ranges(x, bits), bits)
        mm = row_sse(x, *minmax_ranges(x), bits)
        assert np.all(ours <= mm * (1 + 1e-9) + 1e-30), kind
