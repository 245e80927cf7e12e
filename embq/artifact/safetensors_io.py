"""safetensors files read and laid out by hand: headers checked without reading tensor data.

The artifact's table files are safetensors files whose header embq writes itself (8-byte
little-endian header length, JSON header padded to 8 bytes, raw data), so that rows can be
filled in row ranges without holding a table in memory; reading checks what the safetensors
library checks before any offset is trusted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embq.errors import ArtifactError, EmbqError

# safetensors refuses headers above 100 MB; so do we, before reading one into memory.
MAX_HEADER_BYTES = 100_000_000
_HASH_BLOCK = 8 * 1024 * 1024

# safetensors dtype codes <-> numpy dtypes (little-endian on disk). BF16 has no numpy dtype: it is
# read as uint16 bit patterns and widened by the caller.
ST_TO_NUMPY: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}  # fmt: skip


def st_code(dtype: np.dtype) -> str | None:
    """The safetensors dtype code for a numpy dtype (None when safetensors cannot store it)."""
    for code, known in ST_TO_NUMPY.items():
        if code != "BF16" and dtype.kind == known.kind and dtype.itemsize == known.itemsize:
            return code
    return None



@dataclass(frozen=True)
class TensorSpan:
    """Where one tensor lives in a safetensors file.

    Attributes:
        dtype: safetensors dtype code ("F32", "U8", ...).
        shape: the tensor's shape.
        start: absolute byte offset of its first byte in the file.
        stop: absolute byte offset one past its last byte.
    """

    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int

    @property
    def numpy_dtype(self) -> np.dtype:
        """The numpy dtype of the stored bytes (uint16 for BF16)."""
        return ST_TO_NUMPY[self.dtype]


def read_safetensors_header(
    path: str | os.PathLike, error: type[EmbqError] = ArtifactError
) -> tuple[dict[str, TensorSpan], dict[str, str]]:
    """Parse and check a safetensors header without reading the tensor data.

    Checks what the safetensors library checks: a bounded header, known dtypes, byte sizes that
    match shapes, and data offsets that tile the data section exactly, from 0 to the end of file.

    Returns:
        ({tensor name: TensorSpan with absolute offsets}, the "__metadata__" dict or {}).

    Raises:
        `error` (ArtifactError by default) naming the file and what is wrong.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise error(f"{path} is not a safetensors file: only {size} bytes")
            header_len = int.from_bytes(prefix, "little")
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise error(
                    f"{path} is not a valid safetensors file: header length {header_len} does not "
                    f"fit in the {size}-byte file (truncated or not safetensors)"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise error(f"cannot read {path}: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path} has a corrupt safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise error(f"{path} has a corrupt safetensors header: expected a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise error(f"{path} has a corrupt safetensors header: __metadata__ is not an object")
    data_start = 8 + header_len
    spans: dict[str, TensorSpan] = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            shape = tuple(int(s) for s in shape)
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError) as e:
            raise error(f"{path}: tensor {name!r} has a malformed header entry: {info!r}") from e
        if dtype not in ST_TO_NUMPY:
            raise error(f"{path}: tensor {name!r} has dtype {dtype!r}, which embq does not read")
        if any(s < 0 for s in shape) or not 0 <= begin <= end:
            raise error(f"{path}: tensor {name!r} has negative shape or offsets")
        nbytes = math.prod(shape) * ST_TO_NUMPY[dtype].itemsize
        if end - begin != nbytes:
            raise error(
                f"{path}: tensor {name!r} of shape {list(shape)} {dtype} needs {nbytes} bytes "
                f"but its offsets span {end - begin}"
            )
        spans[name] = TensorSpan(dtype, shape, data_start + begin, data_start + end)
    cursor = data_start
    for span in sorted(spans.values(), key=lambda s: (s.start, s.stop)):
        if span.start != cursor:
            raise error(f"{path}: tensor data offsets overlap or leave gaps (corrupt header)")
        cursor = span.stop
    if cursor != size:
        raise error(
            f"{path}: header describes {cursor} bytes but the file has {size} "
            f"({'truncated' if size < cursor else 'trailing bytes'})"
        )
    return spans, {str(k): str(v) for k, v in metadata.items()}


def safetensors_header(
    tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Lay out tensors back to back, in the given order, after a header.

    Args:
        tensors: (name, safetensors dtype code, shape) for each tensor.
        metadata: optional string -> string "__metadata__".

    Returns:
        (the header bytes: 8-byte length + JSON padded with spaces to a multiple of 8,
         {name: (start, stop) absolute byte offsets in the file}).
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    relative: dict[str, tuple[int, int]] = {}
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * ST_TO_NUMPY[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}  # fmt: skip
        relative[name] = (offset, offset + nbytes)
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the 8-byte alignment safetensors itself writes
    data_start = 8 + len(blob)
    spans = {k: (data_start + a, data_start + b) for k, (a, b) in relative.items()}
    return len(blob).to_bytes(8, "little") + blob, spans


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks (memory stays bounded for any file size)."""
    digest = hashlib.sha256()
    buf = bytearray(_HASH_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()



def read_span(path: Path, span: TensorSpan) -> np.ndarray:
    """Read one (small) tensor from a safetensors file into memory as a numpy array."""
    with open(path, "rb") as f:
        f.seek(span.start)
        raw = f.read(span.stop - span.start)
    return np.frombuffer(raw, dtype=span.numpy_dtype).reshape(span.shape).astype(
        span.numpy_dtype.newbyteorder("="), copy=True
    )

