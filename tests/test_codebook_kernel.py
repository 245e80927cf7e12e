"""The compiled cb4-shared encoder (`KERNELS.codebook.shared_rows`, behind `shared_encode`)
against its numpy reference (`shared_encode_numpy`), bit for bit: fp16 scale and offset (signed
zeros included), codes, whole encoded tables, fitted params, and the FormatError naming the
first row no candidate can store."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from embq.embedding import compiled
from embq.embedding.codebook import shared_encode, shared_encode_numpy
from embq.embedding.registry import get_format
from embq.errors import FormatError
from tests.test_format_properties import PROPS, tables

F32 = np.float32
KERNELS = compiled.compiled_kernels()
pytestmark = pytest.mark.skipif(KERNELS is None, reason="numba unavailable: nothing to compare")


def kinds(n: int, d: int, seed: int) -> np.ndarray:
    """n float32 rows of dim d cycling through row kinds: Gaussian, Student-t, constant, +0,
    -0, zeros of both signs among values, tiny (1e-6), near +-65504, ties, subnormals, offset
    rows of several magnitudes."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, d), np.float64)
    for i in range(n):
        k = i % 11
        if k == 0:
            r = rng.standard_normal(d) * 0.1
        elif k == 1:
            r = rng.standard_t(3, d) * 0.05
        elif k == 2:
            r = np.full(d, rng.standard_normal())
        elif k == 3:
            r = np.zeros(d)
        elif k == 4:
            r = np.full(d, -0.0)
        elif k == 5:  # the minimum a zero of both signs
            r = np.abs(rng.standard_normal(d))
            r[rng.permutation(d)[: max(1, d // 3)]] = 0.0
            r[rng.permutation(d)[: max(1, d // 3)]] = -0.0
        elif k == 6:
            r = rng.standard_normal(d) * 1e-6
        elif k == 7:  # near the fp16 limit (a span fp16 scales can still map)
            top = rng.choice([65504.0, -65504.0])
            r = top - np.sign(top) * np.abs(rng.standard_normal(d)) * 100
            r[rng.integers(d)] = top
        elif k == 8:
            r = rng.integers(-8, 9, d) * 0.25
        elif k == 9:
            r = rng.standard_normal(d) * 1e-40  # float32 subnormals
        else:
            r = rng.standard_normal(d) * rng.choice([1e-3, 1.0, 300.0]) + rng.standard_normal() * 10
        x[i] = r
    return x.astype(F32)


@functools.cache
def codebooks() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(codebook, moments) pairs: fitted on Gaussian rows, and edge cases: the lowest level
    exactly 0 (integers: a zero minimum's sign reaches the offset), a zero level with zero mean
    (quarters), levels so close that the min/max start overflows fp16 for a zero row (tiny: the
    mean/std start wins, its offset the row mean's sign), repeated levels."""
    fit = get_format("cb4-shared").fit((np.random.default_rng(1).standard_normal((300, 16)) * 0.1).astype(F32))
    return {
        "fitted": (fit["codebook"], fit["moments"]),
        "integers": (np.arange(16, dtype=F32), np.array([7.5, 4.6], F32)),
        "quarters": ((np.arange(16) - 7).astype(F32) * F32(0.25), np.array([0.0, 0.5], F32)),
        "tiny": ((np.arange(16) - 1).astype(F32) * F32(1e-6), np.array([0.0, 1e-6], F32)),
        "repeated": (np.array([-2, -1, -1, -1, -0.5, 0, 0, 0, 0.25, 0.5, 0.5, 1, 1, 2, 3, 3], F32),
                     np.array([0.1, 1.2], F32)),  # fmt: skip
    }


def outcome(fn, x, cb, mom):
    """fn's (scale16, offset16, codes) as raw bits, or its FormatError message."""
    try:
        s, o, q = fn(x, cb, mom)
    except FormatError as e:
        return str(e)
    return s.view(np.uint16).copy(), o.view(np.uint16).copy(), q


def assert_same(x: np.ndarray, cb: np.ndarray, mom: np.ndarray) -> int:
    """Both paths give the same bits, or name the same row in the same FormatError; then the
    same again without that row, until the rest encodes. Returns the rows dropped."""
    x = np.asarray(x)
    dropped = 0
    while True:
        got, ref = outcome(shared_encode, x, cb, mom), outcome(shared_encode_numpy, x, cb, mom)
        if not isinstance(ref, str):
            break
        assert got == ref
        row = int(ref.split(" row ")[1].split()[0])
        x = np.delete(x, row, axis=0)
        dropped += 1
    assert not isinstance(got, str), got
    for g, r, what in zip(got, ref, ("scale16", "offset16", "codes")):
        assert g.dtype == r.dtype and g.shape == r.shape, what
        bad = np.flatnonzero((g != r).reshape(len(x), -1).any(axis=1)) if len(x) else np.array([], int)
        assert bad.size == 0, f"{what} differ in rows {bad[:10]} (of {len(x)})"
    return dropped


@pytest.mark.parametrize("d", [2, 6, 16, 64, 130, 300])
@pytest.mark.parametrize("cb_name", ["fitted", "integers", "quarters", "repeated"])
def test_kernel_matches_numpy_on_row_kinds(d: int, cb_name: str) -> None:
    cb, mom = codebooks()[cb_name]
    x = kinds(233, d, seed=d)
    for n in (1, 2, 11, 233):
        assert_same(x[:n], cb, mom)


@pytest.mark.parametrize("d", [16, 64])
def test_kernel_matches_numpy_split_between_threads(d: int) -> None:
    """~5000 rows: `run_rows` splits them between threads (pieces starting past row 0)."""
    cb, mom = codebooks()["fitted"]
    rng = np.random.default_rng(d)
    x = np.concatenate([kinds(1000, d, seed=3), (rng.standard_normal((4000, d)) * 0.1).astype(F32)])
    x = x[rng.permutation(len(x))]
    assert_same(x, cb, mom)


@pytest.mark.parametrize("d", [6, 16])
def test_values_on_a_grid_tie_at_midpoints_alike(d: int) -> None:
    """Rows of multiples of one step, against integer and quarter levels: values land exactly
    on midpoints (searchsorted's side decides), and z = (x - offset) / scale must be that
    division (a multiplication by 1 / scale rounds some of them across)."""
    rng = np.random.default_rng(d)
    for step in (1 / 3, 0.375, 3.0):
        x = (rng.integers(-20, 21, (3000, d)) * step).astype(F32)
        for cb_name in ("integers", "quarters"):
            assert_same(x, *codebooks()[cb_name])


def test_signed_zero_offsets_alike() -> None:
    """Offsets that are zeros keep the sign the reference gives them: the min/max start's
    offset is the row minimum when the lowest level is 0 (a zero minimum is +0.0, whichever
    zero comes first), and the mean/std start's is the row mean when the table mean is 0 (the
    mean of -0.0 values is +0.0, numpy's sum starting from its identity)."""
    rng = np.random.default_rng(11)
    d = 16
    x = rng.integers(0, 16, (64, d)).astype(F32)
    x[:, 1] = 15.0  # min/max start: scale 1, offset the minimum; an exact fit, so it is kept
    x[:, 0] = np.where(np.arange(64) % 2, F32(-0.0), F32(0.0))
    x[:, 2:5] = np.where(rng.random((64, 3)) < 0.5, F32(-0.0), F32(0.0))
    assert_same(x, *codebooks()["integers"])
    # min/max start overflows fp16 on a zero row here; the mean/std one fits it exactly
    zeros = np.full((8, d), -0.0, F32)
    zeros[4:, ::3] = 0.0
    assert_same(zeros, *codebooks()["tiny"])
    assert_same(zeros[:, :6], *codebooks()["tiny"])


def test_every_fitted_codebook_kind() -> None:
    """Codebooks fitted on several row kinds (as `fit` and its refinement rounds produce them)."""
    for seed in range(3):
        p = get_format("cb4-shared").fit(kinds(120, 16, seed=seed))
        assert_same(kinds(400, 16, seed=seed + 10), p["codebook"], p["moments"])


def test_the_same_row_is_named_when_no_candidate_fits() -> None:
    """Rows that span more than fp16 scales can map onto a narrow codebook: the same
    FormatError (the first such row) from both paths, whichever thread meets it first."""
    cb, mom = np.linspace(0, 1e-3, 16).astype(F32), np.array([5e-4, 3e-4], F32)
    x = (np.random.default_rng(9).standard_normal((3000, 16)) * 0.1).astype(F32)
    x[[2600, 2900]] *= 1e3
    msg = outcome(shared_encode_numpy, x, cb, mom)
    assert isinstance(msg, str) and "row 2600 " in msg
    assert outcome(shared_encode, x, cb, mom) == msg
    x[4] *= 1e3
    assert "row 4 " in outcome(shared_encode, x, cb, mom)
    assert assert_same(x, cb, mom) == 3


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the numpy path computes with NaN
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_handled_alike(bad: float) -> None:
    """`encode` refuses NaN / Inf before coding; called directly, both paths name the same
    rows."""
    cb, mom = codebooks()["fitted"]
    x = kinds(40, 16, seed=4)
    x[7, 3] = bad
    x[20, 0] = bad
    assert assert_same(x, cb, mom) == 2


def test_format_bytes_and_fit_params_identical_without_numba(monkeypatch) -> None:
    """`get_format("cb4-shared")`: fit params and encoded bytes with the kernel equal those of
    the numpy path (numba off)."""
    fmt = get_format("cb4-shared")
    rng = np.random.default_rng(5)
    sample = np.concatenate([rng.standard_normal((600, 64)) * 0.1, rng.standard_t(3, (600, 64)) * 0.05,
                             rng.integers(-20, 21, (600, 64)) * 0.375]).astype(F32)  # fmt: skip
    rows = np.concatenate([kinds(700, 64, seed=6), sample[::3]])
    rows = rows[np.abs(rows).max(axis=1) < 6e4]  # near +-65504 the fp16 offset can overflow
    with_kernel = fmt.fit(sample)
    codes = fmt.encode(rows, with_kernel)
    monkeypatch.setattr(compiled, "_LOADED", [None])  # as if numba could not load
    assert compiled.kernel_engine() == "numpy"
    reference = fmt.fit(sample)
    for k in ("codebook", "moments"):
        assert with_kernel[k].tobytes() == reference[k].tobytes(), k
    np.testing.assert_array_equal(fmt.encode(rows, reference), codes)


@st.composite
def codebook_and_moments(draw):
    """An ascending float32 codebook of 16 levels (repeats allowed) and moments."""
    scale = draw(st.sampled_from([1e-4, 1.0, 300.0]))
    cb = np.sort(draw(arrays(F32, 16, elements=st.floats(-1, 1, width=32)))) * F32(scale)
    mom = np.array([draw(st.floats(-1, 1, width=32)) * scale, draw(st.floats(0, 1, width=32)) * scale], F32)
    return cb, mom


@PROPS
@given(x=tables((2, 6, 16, 64, 130)), cbm=codebook_and_moments())
def test_kernel_matches_numpy_on_arbitrary_rows(x, cbm):
    assert_same(x, *cbm)


def test_other_codebooks_take_the_numpy_path() -> None:
    """The kernel is for the format's 16 ascending levels; other codebooks (8 levels, or not
    ascending) still encode, through the numpy path."""
    x = kinds(50, 16, seed=7)
    for cb in (np.linspace(-1, 1, 8).astype(F32), np.linspace(1, -1, 16).astype(F32)):
        assert_same(x, cb, np.array([0.0, 0.5], F32))


# --------------------------------------------------------------------------- the kernel's parts


def test_row_sums_are_numpys_row_sums() -> None:
    """`row_sums` (numpy's pairwise order, on an explicit stack above 128 values) against
    `sum(axis=1)` on values whose sum depends on the order, at every dim up to 300 and beyond;
    zeros of one sign sum to +0.0 as numpy's do."""
    L = KERNELS.codebook.LANES
    rng = np.random.default_rng(12)
    work = np.empty(KERNELS.codebook.WORK)
    out = np.empty(L)
    for d in [*range(1, 301), 511, 1000, 1029, 4096, 9000]:
        rows = rng.standard_normal((L, d)) * np.exp(rng.standard_normal((L, d)) * 6)
        rows[0] = -0.0
        KERNELS.codebook.row_sums(np.ascontiguousarray(rows.T).ravel(), d, out, work)
        ref = rows.sum(axis=1)
        assert out.tobytes() == ref.tobytes(), d


def test_the_code_search_is_searchsorted() -> None:
    """Counting midpoints with `count` is `np.searchsorted(mids, z, side="left")` (ties on the
    left, NaN last) and `pick` gives the level of that code, on repeated levels too."""
    for cb in (codebooks()["integers"][0], codebooks()["repeated"][0]):
        cbd = cb.astype(np.float64)
        mids = 0.5 * (cbd[:-1] + cbd[1:])
        z = np.concatenate([mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf),
                            [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e300, -1e300]])  # fmt: skip
        for zi, ref in zip(z, np.searchsorted(mids, z, side="left")):
            n, level = 0, cbd[0]
            for m in range(15):
                n = KERNELS.codebook.count(zi, mids[m], n)
                level = KERNELS.codebook.pick(zi, mids[m], cbd[m + 1], level)
            assert (n, level) == (ref, cbd[ref]), zi
