"""The compiled cb4-shared encoder (`kernels_codebook.shared_rows`, behind `shared_encode`)
against its numpy reference (`shared_encode_numpy`), bit for bit: fp16 scale and offset (signed
zeros included), codes, whole encoded tables, fitted params, and the FormatError naming the
first row no candidate can store."""

from __future__ import annotations

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
pytestmark = pytest.mark.skipif(compiled.compiled_kernels() is None, reason="numba unavailable")


def kinds(n: int, d: int, seed: int) -> np.ndarray:
    """n float32 rows of dim d cycling through row kinds: Gaussian, Student-t, constant, +0,
    -0, zeros of both signs among values, tiny, large (near +-65504), ties, subnormals."""
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
        elif k == 7:
            r = rng.uniform(-65504, 65504, d)
            r[rng.integers(d)] = rng.choice([65504.0, -65504.0])
        elif k == 8:
            r = rng.integers(-8, 9, d) * 0.25
        elif k == 9:
            r = rng.standard_normal(d) * 1e-40  # float32 subnormals
        else:
            r = rng.standard_normal(d) * rng.choice([1e-3, 1.0, 300.0]) + rng.standard_normal() * 10
        x[i] = r
    return x.astype(F32)


def codebooks() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(codebook, moments) pairs: fitted on Gaussian rows, and edge cases (lowest level exactly
    0.0, a zero level with zero mean (the sign of zero offsets shows), repeated levels)."""
    fit = get_format("cb4-shared").fit((np.random.default_rng(1).standard_normal((300, 16)) * 0.1).astype(F32))
    out = {"fitted": (fit["codebook"], fit["moments"])}
    out["from_zero"] = (np.linspace(0, 1e-3, 16).astype(F32), np.array([5e-4, 3e-4], F32))
    out["zero_level"] = ((np.arange(16) - 7).astype(F32) * F32(0.25), np.array([0.0, 0.5], F32))
    out["repeated"] = (np.array([-2, -1, -1, -1, -0.5, 0, 0, 0, 0.25, 0.5, 0.5, 1, 1, 2, 3, 3], F32),
                       np.array([0.1, 1.2], F32))  # fmt: skip
    return out


CODEBOOKS = codebooks()


def outcome(fn, x, cb, mom):
    """fn's (scale16, offset16, codes) as raw bits, or its FormatError message."""
    try:
        s, o, q = fn(x, cb, mom)
    except FormatError as e:
        return str(e)
    return s.view(np.uint16).copy(), o.view(np.uint16).copy(), q


def assert_same(x: np.ndarray, cb: np.ndarray, mom: np.ndarray) -> None:
    got, ref = outcome(shared_encode, x, cb, mom), outcome(shared_encode_numpy, x, cb, mom)
    if isinstance(ref, str) or isinstance(got, str):
        assert got == ref
        return
    for g, r, what in zip(got, ref, ("scale16", "offset16", "codes")):
        assert g.dtype == r.dtype and g.shape == r.shape, what
        bad = np.flatnonzero((g != r).reshape(len(x), -1).any(axis=1))
        assert bad.size == 0, f"{what} differ in rows {bad[:10]} (of {len(x)})"


@pytest.mark.parametrize("d", [2, 6, 16, 64, 130, 300])
@pytest.mark.parametrize("cb_name", list(CODEBOOKS))
def test_kernel_matches_numpy_on_row_kinds(d: int, cb_name: str) -> None:
    cb, mom = CODEBOOKS[cb_name]
    x = kinds(233, d, seed=d)
    for n in (1, 2, 11, 233):
        assert_same(x[:n], cb, mom)


@pytest.mark.parametrize("d", [16, 64])
def test_kernel_matches_numpy_split_between_threads(d: int) -> None:
    """~5000 rows: `run_rows` splits them between threads."""
    cb, mom = CODEBOOKS["fitted"]
    rng = np.random.default_rng(d)
    x = np.concatenate([kinds(1000, d, seed=3), (rng.standard_normal((4000, d)) * 0.1).astype(F32)])
    x = x[rng.permutation(len(x))]
    assert_same(x, cb, mom)


def test_every_fitted_codebook_kind() -> None:
    """Codebooks fitted on several row kinds (as `fit` and its refinement rounds produce them)."""
    for seed in range(3):
        sample = kinds(120, 16, seed=seed)
        sample = sample[np.abs(sample).max(axis=1) < 1e4]  # fit refuses scales fp16 cannot hold
        p = get_format("cb4-shared").fit(sample)
        assert_same(kinds(400, 16, seed=seed + 10), p["codebook"], p["moments"])


def test_the_same_row_is_named_when_no_candidate_fits() -> None:
    """Rows that span more than fp16 scales can map onto a narrow codebook: the same
    FormatError (the first such row) from both paths, whichever thread meets it first."""
    cb, mom = CODEBOOKS["from_zero"]
    x = (np.random.default_rng(9).standard_normal((3000, 16)) * 0.1).astype(F32)
    x[[2600, 2900]] *= 1e3
    msg = outcome(shared_encode_numpy, x, cb, mom)
    assert isinstance(msg, str) and "row 2600 " in msg
    assert outcome(shared_encode, x, cb, mom) == msg
    x[4] *= 1e3
    assert "row 4 " in outcome(shared_encode, x, cb, mom)
    assert_same(x, cb, mom)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the numpy path computes with NaN
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_handled_alike(bad: float) -> None:
    """`encode` refuses NaN / Inf before coding; called directly, both paths still agree."""
    cb, mom = CODEBOOKS["fitted"]
    x = kinds(40, 16, seed=4)
    x[7, 3] = bad
    x[20, 0] = bad
    assert_same(x, cb, mom)
    assert_same(x[[1, 2, 5]], cb, mom)


def test_format_bytes_and_fit_params_identical_without_numba(monkeypatch) -> None:
    """`get_format("cb4-shared")`: fit params and encoded bytes with the kernel equal those of
    the numpy path (numba off)."""
    fmt = get_format("cb4-shared")
    rng = np.random.default_rng(5)
    sample = np.concatenate([(rng.standard_normal((600, 64)) * 0.1), rng.standard_t(3, (600, 64)) * 0.05]).astype(F32)
    rows = np.concatenate([kinds(700, 64, seed=6), sample[:300]])
    rows = rows[np.ptp(rows, axis=1) < 1e4]  # wider rows overflow the fp16 scale: FormatError
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
