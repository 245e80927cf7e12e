"""Where a saved chunk's tensor bytes lie inside a .distcp file, found without loading them.

torch 2.13's `FileSystemWriter` (default `SerializationFormat.TORCH_SAVE`) writes each chunk as
`torch.save(tensor, stream)` at the chunk's byte offset: a zip archive whose members are stored
uncompressed: ``archive/data.pkl`` (a small pickle describing the tensor: storage key, dtype,
storage offset, size, stride) and ``archive/data/<key>`` (the raw storage bytes, little endian,
64-byte aligned). So the rows of a chunk are a plain array at a fixed file offset, and can be
memory-mapped with numpy and read in row ranges like any table file.

`locate_chunk` parses the zip's central directory (Python's zipfile over a view of the record's
byte range) and the tensor pickle with `_TensorRecordUnpickler`, which resolves only torch's
tensor-rebuild function, storage classes and OrderedDict, to stand-ins: no torch code runs. Any
other layout (compressed members, a non-contiguous or big-endian tensor, a record that is not a
torch.save zip such as a safetensors-format or transformed checkpoint) is refused with a
DataError rather than loaded whole.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embq.checkpoint.metadata import SavedChunk
from embq.errors import DataError

_STORAGE_DTYPES = {
    "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "DoubleStorage": "float64", "LongStorage": "int64", "IntStorage": "int32",
}  # fmt: skip
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16,
                "float64": np.float64, "int64": np.int64, "int32": np.int32}  # fmt: skip
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zip local file header, 30 bytes


@dataclass(frozen=True)
class ChunkLayout:
    """A chunk's values as a C-contiguous array in its .distcp file.

    Attributes:
        file: the .distcp file.
        offset: absolute byte offset of the first value.
        shape: the chunk's shape.
        dtype: torch dtype name ("float32", "bfloat16", ...).
    """

    file: Path
    offset: int
    shape: tuple[int, ...]
    dtype: str

    def memmap(self) -> np.ndarray:
        """The values, memory-mapped read-only (bfloat16 as uint16 bit patterns)."""
        if 0 in self.shape:
            return np.empty(self.shape, NUMPY_DTYPES[self.dtype])
        return np.memmap(self.file, dtype=NUMPY_DTYPES[self.dtype], mode="r", offset=self.offset,
                         shape=self.shape)  # fmt: skip


class _FileRange(io.RawIOBase):
    """A read-only, seekable view of bytes [start, start + length) of an open file."""

    def __init__(self, f: Any, start: int, length: int) -> None:
        self._f, self._start, self._len, self._pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._len}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buf: Any) -> int:
        n = max(0, min(len(buf), self._len - self._pos))
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buf)[:n])
        self._pos += got
        return got


@dataclass
class _Storage:
    key: str
    dtype: str


@dataclass
class _Rebuilt:
    storage: _Storage
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild(storage: Any, storage_offset: Any, size: Any, stride: Any, *rest: Any) -> _Rebuilt:
    return _Rebuilt(storage, int(storage_offset), tuple(size), tuple(stride))


class _TensorRecordUnpickler(pickle.Unpickler):
    """Reads torch.save's data.pkl of one tensor into a description; executes nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise DataError(f"the saved chunk refers to {module}.{name}; embq reads records holding "
                        "one plain dense tensor")  # fmt: skip

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise DataError(f"unexpected storage reference {pid!r} in a saved chunk")
        if not isinstance(pid[1], str):
            raise DataError(f"unexpected storage type {pid[1]!r} in a saved chunk")
        return _Storage(str(pid[2]), pid[1])


def _member(zf: zipfile.ZipFile, suffix: str) -> zipfile.ZipInfo | None:
    for info in zf.infolist():
        if info.filename.endswith(suffix) and info.filename.count("/") == suffix.count("/"):
            return info
    return None


def locate_chunk(chunk: SavedChunk, key: str) -> ChunkLayout:
    """The byte layout of `chunk` (of state-dict key `key`), checked against the metadata.

    Raises:
        DataError: the record is not an uncompressed torch.save of one C-contiguous,
            little-endian dense tensor of the chunk's shape.
    """
    where = f"{key!r} (chunk at {list(chunk.offsets)} in {chunk.file.name})"
    with open(chunk.file, "rb", buffering=0) as f:
        f.seek(chunk.offset)
        magic = f.read(4)
        if magic != b"PK\x03\x04":
            raise DataError(
                f"{where} is not stored as a torch.save record (the FileSystemWriter default); "
                "embq cannot read this layout (e.g. safetensors-format or transformed DCP "
                "checkpoints) in bounded memory. Re-save with the default FileSystemWriter."
            )
        try:
            zf = zipfile.ZipFile(io.BufferedReader(_FileRange(f, chunk.offset, chunk.length)))
            pkl, order = _member(zf, "/data.pkl"), _member(zf, "/byteorder")
            if pkl is None:
                raise DataError(f"{where}: the record has no data.pkl")
            if order is not None and zf.read(order).strip() != b"little":
                raise DataError(f"{where} was saved big-endian; embq reads little-endian records")
            desc = _TensorRecordUnpickler(io.BytesIO(zf.read(pkl))).load()
            if not isinstance(desc, _Rebuilt):
                raise DataError(f"{where}: the record holds {type(desc).__name__}, not a tensor")
            data = _member(zf, f"/data/{desc.storage.key}")
        except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, struct.error, ValueError,
                KeyError, IndexError, TypeError) as e:  # fmt: skip
            raise DataError(f"{where} is corrupt or truncated: {type(e).__name__}: {e}") from e
        if data is None:
            raise DataError(f"{where}: the record has no storage {desc.storage.key!r}")
        if data.compress_type != zipfile.ZIP_STORED:
            raise DataError(f"{where}: the storage is compressed; embq reads stored records only")
        f.seek(chunk.offset + data.header_offset)
        local = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
        start = chunk.offset + data.header_offset + _LOCAL_HEADER.size + local[10] + local[11]
    return _check(where, chunk, desc, start, data.file_size)


def _check(where: str, chunk: SavedChunk, desc: _Rebuilt, start: int, nbytes: int) -> ChunkLayout:
    dtype = desc.storage.dtype
    if dtype not in NUMPY_DTYPES:
        raise DataError(f"{where} holds {dtype} values; embq reads float tensors")
    itemsize = np.dtype(NUMPY_DTYPES[dtype]).itemsize
    size = desc.size
    if size != chunk.sizes:
        raise DataError(f"{where}: the record holds shape {list(size)} but the metadata says "
                        f"{list(chunk.sizes)}; the checkpoint is inconsistent")  # fmt: skip
    contiguous, expect = [], 1
    for s in reversed(size):
        contiguous.append(expect)
        expect *= s
    if tuple(reversed(contiguous)) != desc.stride and expect > 1:
        raise DataError(f"{where} is saved with strides {list(desc.stride)} (not row-major); "
                        "embq reads contiguous chunks only")  # fmt: skip
    first = start + desc.storage_offset * itemsize
    if first + expect * itemsize > start + nbytes or first + expect * itemsize > chunk.offset + chunk.length:
        raise DataError(f"{where} is truncated: its storage holds {nbytes} bytes")
    return ChunkLayout(chunk.file, first, tuple(size), dtype)
