"""`CheckpointTable`: one 2-D tensor of a DCP checkpoint, read in row ranges in bounded memory.

The tensor may be saved as any tiling of chunks (whole table, row-wise, column-wise or grid
shards, from any number of ranks). Each chunk is a memory-mapped `TableSource` over its bytes in
the .distcp file (`embq.checkpoint.record`), so reading rows [a, b) touches only those rows of the
chunks that hold them, and drops their pages afterwards (see `embq.embedding.sources`). Memory is
about one chunk of rows, never a shard. It is a `TableSource`, so `embq.embedding.stream`'s
chunked, resumable encoding runs on it unchanged.
"""

from __future__ import annotations

from math import prod
from typing import Any

import numpy as np

from embq.checkpoint.metadata import CheckpointIndex, SavedTensor, is_float_dtype
from embq.checkpoint.record import ChunkLayout, locate_chunk
from embq.embedding.sources import TableSource
from embq.errors import DataError


def _check_tiling(t: SavedTensor) -> None:
    """The chunks must cover the tensor exactly once (else rows would be missing or doubled)."""
    if sum(prod(c.sizes) for c in t.chunks) != prod(t.shape):
        raise DataError(f"the saved chunks of {t.key!r} do not cover its shape {list(t.shape)} "
                        "exactly; the checkpoint is incomplete or inconsistent")  # fmt: skip
    boxes = []
    for c in t.chunks:
        if len(c.offsets) != len(t.shape) or any(
            o < 0 or s < 0 or o + s > n for o, s, n in zip(c.offsets, c.sizes, t.shape)
        ):
            raise DataError(f"a saved chunk of {t.key!r} at {list(c.offsets)} size "
                            f"{list(c.sizes)} lies outside its shape {list(t.shape)}")  # fmt: skip
        boxes.append((c.offsets, c.sizes))
    boxes.sort()
    for i, (a_off, a_size) in enumerate(boxes):  # chunks are few (one per shard): O(n^2) is fine
        for b_off, b_size in boxes[i + 1 :]:
            if all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in
                   zip(a_off, a_size, b_off, b_size)):  # fmt: skip
                raise DataError(f"saved chunks of {t.key!r} at {list(a_off)} and {list(b_off)} "
                                "overlap; the checkpoint is inconsistent")  # fmt: skip


class CheckpointTable(TableSource):
    """A 2-D float tensor of a DCP checkpoint as a `TableSource` (float32 rows on demand).

    Attributes (besides TableSource's): key (the state-dict key), layouts (one per chunk).
    """

    def __init__(self, index: CheckpointIndex, key: str) -> None:
        t = index.tensors.get(key)
        if t is None:
            raise DataError(f"checkpoint {index.path} has no tensor {key!r}")
        if len(t.shape) != 2 or t.shape[1] < 1:
            raise DataError(f"{key!r} in {index.path} has shape {list(t.shape)}; expected a "
                            "2-D table [rows, dim]")  # fmt: skip
        if not is_float_dtype(t.dtype):
            raise DataError(f"{key!r} in {index.path} is {t.dtype}; embq quantizes float tables")
        _check_tiling(t)
        self.index, self.key, self.saved = index, key, t
        self.path = index.path
        self.name = key
        self.rows, self.dim = t.shape
        self.dtype = t.dtype
        self.layouts: list[ChunkLayout] = [locate_chunk(c, key) for c in t.chunks]
        for layout in self.layouts:
            if layout.dtype != t.dtype:
                raise DataError(f"{key!r}: a chunk in {layout.file.name} holds {layout.dtype}, "
                                f"the metadata says {t.dtype}")  # fmt: skip
        # (row0, col0, source) per chunk, in row order
        self._parts: list[tuple[int, int, TableSource]] = []
        for c, layout in sorted(zip(t.chunks, self.layouts), key=lambda p: p[0].offsets):
            if 0 in c.sizes:
                continue
            view = layout.memmap()
            src = TableSource(layout.file, key, view, t.dtype, bf16=t.dtype == "bfloat16")
            self._parts.append((c.offsets[0], c.offsets[1], src))

    def close(self) -> None:
        for _, _, src in self._parts:
            src.close()
        self._parts = []

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 as float32 [stop - start, dim], assembled from the chunks."""
        if not 0 <= start <= stop <= self.rows:
            raise DataError(f"rows {start}..{stop} are outside {self.key!r} ({self.rows} rows)")
        out = np.empty((stop - start, self.dim), np.float32)
        for row0, col0, src in self._parts:
            lo, hi = max(start, row0), min(stop, row0 + src.rows)
            if lo < hi:
                out[lo - start : hi - start, col0 : col0 + src.dim] = src.read(lo - row0, hi - row0)
        return out

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Rows at sorted `indices` (int64 [n]) as float32 [n, dim]."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((indices.shape[0], self.dim), np.float32)
        for row0, col0, src in self._parts:
            a, b = np.searchsorted(indices, [row0, row0 + src.rows])
            if a < b:
                out[a:b, col0 : col0 + src.dim] = src.take(indices[a:b] - row0)
        return out

    def fingerprint(self) -> dict[str, Any]:
        return {"checkpoint": self.index.fingerprint(), "tensor": self.key, "rows": self.rows,
                "dim": self.dim, "dtype": self.dtype}  # fmt: skip


def read_small_tensor(index: CheckpointIndex, key: str) -> np.ndarray:
    """A whole (small) float tensor of any rank, e.g. a dense-tower weight, as float32."""
    t = index.tensors[key]
    if not is_float_dtype(t.dtype):
        raise DataError(f"{key!r} in {index.path} is {t.dtype}; expected a float tensor")
    if len(t.shape) == 2:
        with CheckpointTable(index, key) as table:
            return table.read(0, table.rows)
    if len(t.shape) > 2 or len(t.chunks) != 1:  # towers are 1-D/2-D and saved whole in DLRMs
        raise DataError(f"{key!r} in {index.path}: shape {list(t.shape)} in {len(t.chunks)} "
                        "chunks; embq reads dense tensors of 1 or 2 dims")  # fmt: skip
    layout = locate_chunk(t.chunks[0], key)
    values = np.array(layout.memmap(), copy=True)
    if t.dtype == "bfloat16":
        values = (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32).reshape(t.shape)
