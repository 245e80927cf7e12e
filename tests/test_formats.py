"""The format registry: names, bytes per row, encode/decode contracts, input validation, and
that row-wise bytes are what fbgemm / ATen / TBE produce and read."""

from __future__ import annotations

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import numpy as np
import pytest
import torch

from embq.embedding.formats import TableFormat
from embq.embedding.registry import format_names, get_format
from embq.errors import EmbqError, FormatError

F32 = np.float32
ALL = format_names()
BPR64 = {
    "fp32": 256, "fp16": 128, "int8": 68, "int4": 36, "int2": 20, "int4-greedy": 36,
    "int2-greedy": 20, "int4-opt": 36, "int2-opt": 20, "cb4-row": 64, "cb4-shared": 36,
    "pq32x4": 16, "pq16x8": 16,
}


def rows(n: int = 300, d: int = 64, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, d)) * 0.1).astype(F32)


@pytest.fixture(scope="module")
def fitted() -> dict[str, tuple[TableFormat, dict]]:
    x = rows(600, seed=1)
    return {name: (get_format(name), get_format(name).fit(x)) for name in ALL}


def test_registry_names_and_sparse_types() -> None:
    assert set(BPR64) == set(ALL)
    for name in ALL:
        fmt = get_format(name)
        assert fmt.name == name
        assert isinstance(fmt, TableFormat)
    assert {n: get_format(n).sparse_type for n in ("fp32", "fp16", "int8", "int4", "int2")} == {
        "fp32": "FP32", "fp16": "FP16", "int8": "INT8", "int4": "INT4", "int2": "INT2"}
    assert get_format("int4-greedy").sparse_type == "INT4"
    assert get_format("int2-opt").sparse_type == "INT2"
    assert get_format("cb4-row").sparse_type is None and get_format("pq32x4").sparse_type is None
    assert get_format("pq8x6").bytes_per_row(64) == 6  # any pq<M>x<bits>


def test_unknown_name_lists_known() -> None:
    with pytest.raises(FormatError) as e:
        get_format("int3")
    assert "int3" in str(e.value) and "int4-greedy" in str(e.value) and "cb4-row" in str(e.value)
    assert issubclass(FormatError, EmbqError)


@pytest.mark.parametrize("name", ALL)
def test_bytes_per_row_and_roundtrip(name: str, fitted) -> None:
    fmt, params = fitted[name]
    assert fmt.bytes_per_row(64) == BPR64[name]
    x = rows(50, seed=2)
    codes = fmt.encode(x, params)
    assert codes.dtype == np.uint8 and codes.shape == (50, BPR64[name])
    y = fmt.decode(codes, params, 64)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.sqrt(np.mean((y - x) ** 2)) < 0.1  # a loose sanity bound; quality is tested elsewhere
    # empty input gives an empty table of the right width, and decodes to 0 rows
    empty = fmt.encode(np.zeros((0, 64), F32), params)
    assert empty.shape == (0, BPR64[name]) and empty.dtype == np.uint8
    assert fmt.decode(empty, params, 64).shape == (0, 64)


def test_params_bytes(fitted) -> None:
    for name in ("fp32", "int8", "int4-greedy", "cb4-row"):
        assert fitted[name][0].params_bytes(64, fitted[name][1]) == 0
    assert fitted["cb4-shared"][0].params_bytes(64, fitted["cb4-shared"][1]) == 16 * 4 + 2 * 4
    assert fitted["pq32x4"][0].params_bytes(64, fitted["pq32x4"][1]) == 32 * 16 * 2 * 4
    assert fitted["pq16x8"][0].params_bytes(64, fitted["pq16x8"][1]) == 16 * 256 * 4 * 4


@pytest.mark.parametrize(
    "name,dim",
    [("int4", 6), ("int2", 12), ("int8", 5), ("int4-greedy", 2), ("cb4-row", 7),
     ("cb4-shared", 3), ("pq32x4", 48), ("fp16", 0)],
)
def test_dims_that_do_not_pack(name: str, dim: int) -> None:
    fmt = get_format(name)
    with pytest.raises(FormatError, match=name):
        fmt.check_dim(dim)
    with pytest.raises(FormatError):
        fmt.bytes_per_row(dim)
    if dim > 0:
        with pytest.raises(FormatError):
            fmt.encode(rows(3, dim) if dim else np.zeros((3, 0), F32), {})


@pytest.mark.parametrize("name", ["fp32", "fp16", "int8", "int4", "int2", "int4-greedy", "int2-opt",
                                  "cb4-row"])
def test_bad_values_name_the_row(name: str) -> None:
    fmt = get_format(name)
    for bad in (np.nan, np.inf, -np.inf):
        x = rows(10, 16)
        x[7, 3] = bad
        with pytest.raises(FormatError, match="row 7"):
            fmt.encode(x)


@pytest.mark.parametrize("name", ["fp32", "int4"])
def test_float64_overflow_is_reported(name: str) -> None:
    x = np.zeros((4, 8))
    x[2, 0] = 1e300  # finite in float64, inf once converted to float32
    with pytest.raises(FormatError, match="row 2.*overflows float32"):
        get_format(name).encode(x)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_minmax_checks_what_fbgemm_does_not(bits: int) -> None:
    """fbgemm's packer turns a NaN into an ordinary row (it decodes to finite values); embq
    refuses it, and still gives fbgemm's bytes for values up to +-65504."""
    op = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf
    x = rows(6, 16)
    y = x.copy()
    y[4, 5] = np.nan
    silent = op(torch.from_numpy(y), bits)
    back = torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(silent, bits)
    assert torch.isfinite(back).all()
    with pytest.raises(FormatError, match="row 4"):
        get_format(f"int{bits}").encode(y)
    x[1, 2], x[3, 0] = 65504.0, -65504.0
    ref = op(torch.from_numpy(x), bits).numpy()
    np.testing.assert_array_equal(get_format(f"int{bits}").encode(x), ref)


@pytest.mark.parametrize("name", ["fp16", "int8", "int4", "int2-greedy", "int4-opt", "cb4-row"])
def test_fp16_overflow(name: str) -> None:
    x = rows(5, 16)
    x[3, 1] = 70000.0
    with pytest.raises(FormatError, match="row 3.*65504"):
        get_format(name).encode(x)


def test_bad_shapes_and_dtypes() -> None:
    fmt = get_format("int4")
    with pytest.raises(FormatError, match="2-D"):
        fmt.encode(np.zeros(16, F32))
    with pytest.raises(FormatError, match="2-D"):
        fmt.encode(np.zeros((2, 4, 4), F32))
    with pytest.raises(FormatError, match="dtype int64"):
        fmt.encode(np.zeros((2, 16), np.int64))
    with pytest.raises(FormatError, match="dtype"):
        fmt.encode(np.zeros((2, 16), np.complex64))
    with pytest.raises(FormatError, match=r"uint8 \[rows, 12\]"):
        fmt.decode(np.zeros((2, 11), np.uint8), None, 16)
    with pytest.raises(FormatError, match="uint8"):
        fmt.decode(np.zeros((2, 12), np.int8), None, 16)


def test_documented_conversions() -> None:
    """float64, float16 and CPU torch tensors are accepted and converted to float32."""
    x = rows(20, 32)
    fmt = get_format("int4-greedy")
    ref = fmt.encode(x)
    np.testing.assert_array_equal(fmt.encode(x.astype(np.float64)), ref)
    np.testing.assert_array_equal(fmt.encode(torch.from_numpy(x)), ref)
    h = x.astype(np.float16)
    np.testing.assert_array_equal(fmt.encode(h), fmt.encode(h.astype(F32)))


def test_constant_and_zero_rows() -> None:
    x = np.zeros((4, 16), F32)
    x[1] = 0.5
    x[2] = -3.0
    for name in ("int8", "int4", "int2", "int4-greedy", "int2-greedy", "int4-opt", "int2-opt"):
        fmt = get_format(name)
        np.testing.assert_array_equal(fmt.decode(fmt.encode(x), None, 16), x)
    cb = get_format("cb4-row")
    np.testing.assert_array_equal(cb.decode(cb.encode(x), None, 16), x)


def test_float_formats_are_raw_bytes() -> None:
    x = rows(10, 8)
    np.testing.assert_array_equal(get_format("fp32").encode(x), x.view(np.uint8))
    np.testing.assert_array_equal(get_format("fp16").encode(x), x.astype("<f2").view(np.uint8))
    np.testing.assert_array_equal(get_format("fp32").decode(x.view(np.uint8), None, 8), x)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_rowwise_bytes_are_fbgemm_sbhalf(bits: int) -> None:
    x = rows(100, 64, seed=3)
    ref = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(torch.from_numpy(x), bits)
    np.testing.assert_array_equal(get_format(f"int{bits}").encode(x), ref.numpy())


@pytest.mark.parametrize("bits", [4, 2])
def test_greedy_format_is_aten_optimized_prepack(bits: int) -> None:
    x = (np.random.default_rng(4).standard_t(3, (100, 64)) * 0.05).astype(F32)
    op = getattr(torch.ops.quantized, f"embedding_bag_{bits}bit_prepack")
    ref = op(torch.from_numpy(x), True, 200, 0.16).numpy()
    np.testing.assert_array_equal(get_format(f"int{bits}-greedy").encode(x), ref)


@pytest.mark.parametrize("name", ["int8", "int4-greedy", "int2-opt"])
def test_rows_load_into_tbe(name: str) -> None:
    """Row-wise formats load into fbgemm's inference TBE unchanged: (codes, qparams) split."""
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
        IntNBitTableBatchedEmbeddingBagsCodegen,
    )

    fmt = get_format(name)
    x = rows(40, 32, seed=5)
    fused = fmt.encode(x)
    tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
        [("t", 40, 32, SparseType[fmt.sparse_type], EmbeddingLocation.HOST)],
        device="cpu", output_dtype=SparseType.FP32,
    )
    tbe.initialize_weights()
    tbe.assign_embedding_weights([(torch.from_numpy(fused[:, :-4].copy()), torch.from_numpy(fused[:, -4:].copy()))])
    idx = torch.tensor([0, 5, 7, 39, 3], dtype=torch.int32)
    offsets = torch.tensor([0, 2, 5], dtype=torch.int32)
    out = tbe(idx, offsets).numpy()
    dec = fmt.decode(fused, None, 32).astype(np.float64)
    np.testing.assert_allclose(out[0], dec[0] + dec[5], rtol=0, atol=1e-6)
    np.testing.assert_allclose(out[1], dec[7] + dec[39] + dec[3], rtol=0, atol=1e-6)


def test_fit_needs_rows_for_learned_formats() -> None:
    with pytest.raises(FormatError, match="at least 256"):
        get_format("pq16x8").fit(rows(100, 64))
    with pytest.raises(FormatError, match="fit"):
        get_format("cb4-shared").encode(rows(4, 64), {})
    with pytest.raises(FormatError, match="fit"):
        get_format("pq32x4").decode(np.zeros((1, 16), np.uint8), None, 64)
