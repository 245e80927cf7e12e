"""Append rows to a `.npy` file whose final row count is unknown until the end.

The header is written last into a fixed reserved prefix, so data streams straight to disk in
bounded memory and the result is an ordinary `.npy` that `np.load(mmap_mode="r")` opens.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

HEADER_BYTES = 128  # magic (6) + version (2) + length (2) + dict, padded: room for any 2-D shape


def npy_header(dtype: np.dtype, shape: tuple[int, int]) -> bytes:
    """The HEADER_BYTES-long .npy header (version 1.0) of a C-order array: data starts after it."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(shape)}
    text = repr(header).encode("latin1")
    pad = HEADER_BYTES - 10 - len(text) - 1
    prefix = b"\x93NUMPY\x01\x00" + (HEADER_BYTES - 10).to_bytes(2, "little")
    return prefix + text + b" " * pad + b"\n"


def preallocate_npy(path: str | os.PathLike, dtype: np.dtype, shape: tuple[int, int]) -> None:
    """Create a .npy of `shape` with its final header and (sparse) zero data, for writers that
    fill disjoint row ranges at `HEADER_BYTES + first_row * row_bytes` (torchrun ranks)."""
    with open(path, "wb") as f:
        f.write(npy_header(dtype, shape))
        f.truncate(HEADER_BYTES + int(np.prod(shape)) * np.dtype(dtype).itemsize)


def write_rows_at(path: str | os.PathLike, first_row: int, rows: np.ndarray) -> None:
    """Write C-order `rows` into a preallocated .npy starting at row `first_row`."""
    rows = np.ascontiguousarray(rows)
    row_bytes = rows.dtype.itemsize * int(np.prod(rows.shape[1:]))
    with open(path, "r+b") as f:
        f.seek(HEADER_BYTES + first_row * row_bytes)
        f.write(rows.tobytes())


def read_rows(path: str | os.PathLike, dtype: np.dtype, width: int, start: int,
              stop: int) -> np.ndarray:
    """Rows start..stop-1 of a .npy written by NpyAppender, read (not memory-mapped, so they do
    not stay resident in the reader's RSS after use)."""
    dtype = np.dtype(dtype)
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES + start * width * dtype.itemsize)
        rows = np.fromfile(f, dtype=dtype, count=(stop - start) * width)
    return rows.reshape(stop - start, width)


class NpyAppender:
    """Write rows of a fixed dtype and width, then `close()` to finalise the header."""

    def __init__(self, path: str | os.PathLike, dtype: np.dtype, width: int) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.width = width
        self.rows = 0
        self._file = open(self.path, "wb")
        self._file.write(b"\0" * HEADER_BYTES)

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype).reshape(-1, self.width)
        self._file.write(rows.tobytes())
        self.rows += len(rows)

    def close(self) -> None:
        self._file.seek(0)
        self._file.write(npy_header(self.dtype, (self.rows, self.width)))
        self._file.close()

    def __enter__(self) -> NpyAppender:
        return self

    def __exit__(self, *exc) -> None:
        if not self._file.closed:
            self.close()
