"""Table formats: bytes per row, encode / decode, fbgemm SparseType (`embq.embedding.registry`
finds a format by name, `embq.embedding.configs` holds the typed configs the names parse to).

A format turns float32 rows [n, dim] into uint8 rows [n, bytes_per_row(dim)] and back. Formats
that learn table-level parameters (a shared codebook, PQ centroids) return them from `fit` as a
dict of numpy arrays (stored next to the codes; `params_bytes` counts them); row-wise formats
return {}.

Input conventions for `encode` (checked by every format):
    - a 2-D array-like of real floats (float16/32/64 or a CPU torch tensor); it is converted to
      float32. 1-D, non-float or complex input raises FormatError.
    - NaN or +-Inf anywhere raises FormatError naming the first bad row.
    - 0 rows return an empty uint8 array of shape (0, bytes_per_row(dim)).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from embq.embedding import rowwise
from embq.embedding.fp16 import FP16_MAX
from embq.embedding.greedy import greedy_ranges
from embq.embedding.opt_search import opt_ranges
from embq.errors import FormatError


def as_rows(rows: Any, what: str = "rows", finite: bool = True) -> np.ndarray:
    """Validate and convert `rows` to a C-contiguous float32 [n, dim] array.

    Raises FormatError for non-2-D or non-float input and for NaN/Inf (naming the row index);
    `finite=False` leaves the NaN/Inf check to a caller that makes it while encoding.
    """
    if hasattr(rows, "detach") and hasattr(rows, "cpu"):  # torch tensor, without importing torch
        rows = rows.detach().cpu().numpy()
    arr = np.asarray(rows)
    if arr.ndim != 2:
        raise FormatError(
            f"{what} must be a 2-D array [rows, dim], got shape {arr.shape}; "
            "reshape a single row with x[None, :]"
        )
    if arr.dtype.kind != "f":
        raise FormatError(
            f"{what} must hold real floating-point values (float16/32/64), got dtype {arr.dtype}"
        )
    if arr.dtype == np.float32:  # nothing to convert (and no errstate to pay for)
        x = np.ascontiguousarray(arr)
    else:
        with np.errstate(over="ignore"):
            x = np.ascontiguousarray(arr, dtype=np.float32)
    if finite and x.size and not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        hint = " (it overflows float32)" if np.isfinite(arr[bad]).all() else ""
        raise FormatError(f"{what}: row {bad} contains NaN or Inf{hint}; clean the table first")
    return x


def check_codes(codes: Any, width: int, name: str) -> np.ndarray:
    """Encoded rows as a C-contiguous uint8 [n, width] array, or FormatError."""
    arr = np.asarray(codes)
    if arr.ndim != 2 or arr.dtype != np.uint8 or arr.shape[1] != width:
        raise FormatError(
            f"{name}: codes must be uint8 [rows, {width}], got {arr.dtype} {arr.shape}"
        )
    return np.ascontiguousarray(arr)


class TableFormat:
    """Base class of every table format. Subclasses set name, sparse_type and bits."""

    name: str = ""
    sparse_type: str | None = None  # fbgemm SparseType member name, None if TBE cannot load it
    bits: int = 0  # nominal bits per value

    def check_dim(self, dim: int) -> None:
        """Raise FormatError if rows of `dim` values cannot be stored in this format."""
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise FormatError(f"{self.name}: dim must be a positive integer, got {dim!r}")

    def bytes_per_row(self, dim: int) -> int:
        """Exact stored bytes per row (codes plus per-row qparams; no alignment padding)."""
        raise NotImplementedError

    def params_bytes(self, dim: int, params: dict[str, np.ndarray]) -> int:
        """Bytes of table-level parameters (shared codebooks, PQ centroids); 0 for row-wise."""
        return int(sum(np.asarray(v).nbytes for v in params.values()))

    def min_fit_rows(self) -> int:
        """Fewest sample rows `fit` accepts (PQ needs one per centroid); 0 if it learns nothing."""
        return 0

    def fit(self, sample: Any) -> dict[str, np.ndarray]:
        """Learn table-level parameters from a float32 sample of rows [n, dim]; {} if none."""
        x = as_rows(sample, "sample")
        self.check_dim(x.shape[1])
        return {}

    def encode(self, rows: Any, params: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """float32 rows [n, dim] -> uint8 [n, bytes_per_row(dim)]."""
        raise NotImplementedError

    def decode(
        self, codes: Any, params: dict[str, np.ndarray] | None, dim: int
    ) -> np.ndarray:
        """uint8 [n, bytes_per_row(dim)] -> float32 [n, dim]."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<TableFormat {self.name}>"


class FloatFormat(TableFormat):
    """fp32 / fp16: the raw little-endian bytes of each row."""

    def __init__(self, name: str, dtype: str, sparse_type: str, bits: int) -> None:
        self.name, self.sparse_type, self.bits = name, sparse_type, bits
        self._dtype = np.dtype(dtype)

    def bytes_per_row(self, dim: int) -> int:
        self.check_dim(dim)
        return dim * self._dtype.itemsize

    def encode(self, rows: Any, params: dict[str, np.ndarray] | None = None) -> np.ndarray:
        x = as_rows(rows)
        self.check_dim(x.shape[1])
        if self._dtype == np.float16 and x.size:
            big = np.abs(x).max(axis=1) > FP16_MAX
            if big.any():
                i = int(np.flatnonzero(big)[0])
                raise FormatError(
                    f"{self.name}: row {i} has |value| > {FP16_MAX:g}, which overflows fp16; "
                    "use fp32 or int8"
                )
        out = np.ascontiguousarray(x.astype(self._dtype)).view(np.uint8)
        return out.reshape(x.shape[0], self.bytes_per_row(x.shape[1]))

    def decode(
        self, codes: Any, params: dict[str, np.ndarray] | None, dim: int
    ) -> np.ndarray:
        c = check_codes(codes, self.bytes_per_row(dim), self.name)
        return c.view(self._dtype).reshape(c.shape[0], dim).astype(np.float32)


class RowwiseFormat(TableFormat):
    """Row-wise uniform N-bit (2, 4, 8) in fbgemm's fused SBHalf layout, loadable by TBE.

    Built from its `embq.embedding.configs.Rowwise` config, whose `search` picks each row's
    clipping range: "minmax" (fbgemm / TorchRec), "greedy" (EMB4, byte-identical to ATen's
    optimized prepack) or "opt" (embq's better search).
    """

    def __init__(self, config: Any) -> None:
        self.config = config
        self.name, self.bits, self.search = str(config), config.bits, config.search
        self.sparse_type = f"INT{self.bits}"

    def check_dim(self, dim: int) -> None:
        super().check_dim(dim)
        # fbgemm-gpu-cpu 1.8 needs an even number of code bytes (fp16 qparams stay aligned).
        need = 2 * (8 // self.bits)
        if dim % need:
            raise FormatError(
                f"{self.name}: dim {dim} does not pack; it must be a multiple of {need} "
                f"({self.bits}-bit codes need an even byte count in fbgemm)"
            )

    def bytes_per_row(self, dim: int) -> int:
        self.check_dim(dim)
        return rowwise.fused_row_bytes(dim, self.bits)

    def ranges(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The clipping range (lo, hi) of each validated float32 row, float32 [n] each."""
        if self.search == "minmax":
            return rowwise.minmax_ranges(x)
        if self.search == "greedy":
            return greedy_ranges(x, self.bits, self.config.n_bins, self.config.ratio)
        return opt_ranges(x, self.bits, self.config.n_bins)

    def encode(self, rows: Any, params: dict[str, np.ndarray] | None = None) -> np.ndarray:
        minmax = self.search == "minmax"
        x = as_rows(rows, finite=not minmax)
        self.check_dim(x.shape[1])
        if x.shape[0] == 0:
            return np.zeros((0, self.bytes_per_row(x.shape[1])), np.uint8)
        if minmax:
            # One check inside the packing kernel: every value finite and within +-65504
            # covers the NaN/Inf and fp16 checks below (a range is then at most 2 * 65504, so
            # its scale at least 3 levels fits fp16). Those name the row when it fails.
            out = rowwise.encode_minmax(x, self.bits, limit=FP16_MAX)
            if out is not None:
                return out
            as_rows(rows)
            check_fp16_range(x, self.bits, self.name)
            raise FormatError(f"{self.name}: a value is NaN, Inf or beyond +-65504")
        check_fp16_range(x, self.bits, self.name)
        lo, hi = self.ranges(x)
        return rowwise.encode_ranges(x, lo, hi, self.bits)

    def decode(
        self, codes: Any, params: dict[str, np.ndarray] | None, dim: int
    ) -> np.ndarray:
        c = check_codes(codes, self.bytes_per_row(dim), self.name)
        return rowwise.decode_fused(c, self.bits, dim)


def check_fp16_range(x: np.ndarray, bits: int, name: str) -> None:
    """FormatError if a row's bias (|value| > 65504) or scale ((max-min)/(2^bits-1) > 65504)
    cannot be stored in fp16. x: validated float32 [n, d] with n > 0."""
    lo, hi = (v.astype(np.float64) for v in rowwise.row_extremes(x))
    big = np.maximum(np.abs(lo), np.abs(hi)) > FP16_MAX
    wide = (hi - lo) / rowwise.qmax_of(bits) > FP16_MAX
    bad = big | wide
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        why = "a |value| above 65504" if big[i] else f"a range (max-min)/{rowwise.qmax_of(bits)} above 65504"
        raise FormatError(
            f"{name}: row {i} has {why}, which fp16 scale/bias cannot store; "
            "rescale the table or use fp32"
        )
