"""Table readers: open a float table file memory-mapped, hand out row chunks, never the whole.

Supported inputs, all 2-D floating point (float16, bfloat16, float32, float64):

- ``.npy``: ``np.load(mmap_mode="r")`` (C or Fortran order).
- ``.safetensors``: the header is parsed (and checked by the safetensors library), the chosen
  tensor is memory-mapped with numpy at its byte offset.
- ``torch.save`` files (``.pt``, ``.pth``, ``.bin``, ``.ckpt``): ``torch.load(mmap=True,
  weights_only=True)``; a tensor, or a (nested) state dict from which one tensor is picked by name.

Why page dropping: file pages of a memory map count towards a process's RSS until the kernel
reclaims them, so reading a 4 GiB table through a plain mmap shows ~4 GiB RSS although nothing is
held (reference data-serving-scale.md section 8). After each chunk the source calls
``madvise(MADV_DONTNEED)`` on the chunk's pages, which keeps RSS at about one chunk. This is why
safetensors inputs are not read through ``safe_open(...).get_slice()``: its mapping is private to
the Rust side and cannot be advised, so RSS would grow to the table size.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from embq.errors import DataError

NPY_SUFFIXES = (".npy",)
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_FLOAT_ST = {"F16", "BF16", "F32", "F64"}
# Sampled rows gathered between page drops. Each fault on a cached file maps a whole page-cache
# folio (up to 2 MiB on current kernels), so this bounds sampling's mapped RSS to ~64 x 2 MiB;
# with 4096 a 4,096-row sample of a cached 1 GiB table mapped all of it.
_SAMPLE_BATCH = 64

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)
_libc: Any = None
if sys.platform.startswith("linux") and _MADV_DONTNEED is not None:
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    except (OSError, AttributeError):
        _libc = None


def drop_pages(address: int, nbytes: int) -> None:
    """Tell the kernel the file-backed pages covering [address, address + nbytes) are not needed.

    Only call this on read-only file mappings: the pages are dropped and re-read from the file if
    touched again. On anonymous memory it would zero data. A no-op off Linux.
    """
    if _libc is None or nbytes <= 0:
        return
    start = address - address % _PAGE
    stop = -(-(address + nbytes) // _PAGE) * _PAGE
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), _MADV_DONTNEED)


def _is_file_mapping(address: int, path: Path) -> bool:
    """True if `address` lies in a memory mapping of `path` (from /proc/self/maps)."""
    target = str(path.resolve())
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or fields[5].strip() != target:
                    continue
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= address < hi:
                    return True
    except OSError:
        pass
    return False


def _bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16 [...]) to float32 [...]: they are the high 16 bits."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class TableSource:
    """A 2-D float table on disk, read in row ranges.

    Attributes:
        path: the file.
        name: the tensor's name in the file (file stem for .npy).
        rows: number of rows.
        dim: columns (embedding dimension).
        dtype: stored dtype, as a string ("float32", "bfloat16", ...).
    """

    def __init__(self, path: Path, name: str, view: np.ndarray, dtype: str, *,
                 bf16: bool = False, droppable: bool = True,
                 keepalive: Any = None) -> None:  # fmt: skip
        self.path = path
        self.name = name
        self.rows, self.dim = (int(s) for s in view.shape)
        self.dtype = dtype
        self._view = view  # 2-D numpy view of the mapped file (uint16 bits for bfloat16)
        self._bf16 = bf16
        self._droppable = droppable and view.size > 0
        self._keepalive = keepalive  # the torch tensor / mapping that owns `view`'s memory

    def __enter__(self) -> TableSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the mapping (the object is unusable afterwards)."""
        self._view = np.empty((0, self.dim), np.float32)
        self._keepalive = None

    def _to_float32(self, block: np.ndarray) -> np.ndarray:
        """A float32 copy of a block of stored values (always a copy, never a view of the map)."""
        if self._bf16:
            return _bf16_to_float32(block)
        return np.array(block, dtype=np.float32, order="C", copy=True)

    def _drop(self, lo: int, hi: int) -> None:
        """Drop the mapped pages of rows lo..hi-1 (of the whole table when rows are strided)."""
        if not self._droppable or hi <= lo:
            return
        view = self._view
        if view.flags.c_contiguous:
            row_bytes = view.strides[0]
            drop_pages(view.ctypes.data + lo * row_bytes, (hi - lo) * row_bytes)
        else:
            first, last = np.lib.array_utils.byte_bounds(view)
            drop_pages(first, last - first)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 as float32 [stop - start, dim], C-contiguous, owned by the caller."""
        if not 0 <= start <= stop <= self.rows:
            raise DataError(f"rows {start}..{stop} are outside {self.path} ({self.rows} rows)")
        out = self._to_float32(self._view[start:stop])
        self._drop(start, stop)
        return out

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Rows at sorted `indices` (int64 [n]) as float32 [n, dim], read in bounded batches."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((indices.shape[0], self.dim), np.float32)
        for a in range(0, indices.shape[0], _SAMPLE_BATCH):
            idx = indices[a : a + _SAMPLE_BATCH]
            out[a : a + idx.shape[0]] = self._to_float32(self._view[idx])
            self._drop(int(idx.min()), int(idx.max()) + 1)
        return out

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this input when resuming: path, bytes, mtime (ns), tensor, shape."""
        st = self.path.stat()
        return {"path": str(self.path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                "tensor": self.name, "rows": self.rows, "dim": self.dim,
                "dtype": self.dtype}  # fmt: skip


def _check_2d(path: Path, name: str, shape: tuple[int, ...]) -> None:
    if len(shape) != 2:
        raise DataError(
            f"{path}: tensor {name!r} has shape {list(shape)}; expected a 2-D table [rows, dim]"
        )
    if shape[1] < 1:
        raise DataError(f"{path}: tensor {name!r} has no columns (shape {list(shape)})")


def _pick(path: Path, names: list[str], tensor: str | None) -> str:
    """Choose a tensor by name, or the only one; otherwise say which names exist."""
    if tensor is not None:
        if tensor not in names:
            shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
            raise DataError(f"{path} has no tensor {tensor!r}; it holds: {shown}")
        return tensor
    if len(names) == 1:
        return names[0]
    shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
    raise DataError(
        f"{path} holds {len(names)} tensors; choose one with --tensor NAME (tensor=...): {shown}"
    )


def _open_npy(path: Path, tensor: str | None) -> TableSource:
    if tensor is not None:
        raise DataError(f"{path} is a .npy file holding one array; --tensor does not apply to it")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"cannot read {path} as a .npy array: {e}") from e
    _check_2d(path, path.stem, array.shape)
    if array.dtype.kind != "f":
        raise DataError(
            f"{path} holds {array.dtype}; embq quantizes float tables (float16/32/64). Convert it "
            "with arr.astype(np.float32)."
        )
    # np.load returns a plain (non-mapped) array for zero-size files; never advise that memory.
    mapped = isinstance(array, np.memmap)
    return TableSource(path, path.stem, array, str(array.dtype), droppable=mapped)


def _open_safetensors(path: Path, tensor: str | None) -> TableSource:
    from safetensors import safe_open

    from embq.artifact.safetensors_io import read_safetensors_header

    try:  # the library's own validation first: its messages are the reference ones
        with safe_open(str(path), framework="numpy") as f:
            names = list(f.keys())
    except Exception as e:  # SafetensorError is a plain Exception subclass from Rust
        raise DataError(f"cannot read {path} as safetensors: {e}") from e
    spans, _ = read_safetensors_header(path, error=DataError)
    name = _pick(path, sorted(names), tensor)
    span = spans[name]
    _check_2d(path, name, span.shape)
    if span.dtype not in _FLOAT_ST:
        raise DataError(
            f"{path}: tensor {name!r} has dtype {span.dtype}; embq quantizes float tables "
            "(F16, BF16, F32, F64)"
        )
    if span.shape[0] == 0:
        view = np.empty(span.shape, span.numpy_dtype)
    else:
        view = np.memmap(path, dtype=span.numpy_dtype, mode="r", offset=span.start,
                         shape=span.shape)  # fmt: skip
    dtype = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}[span.dtype]
    return TableSource(path, name, view, dtype, bf16=span.dtype == "BF16")


def _flatten(obj: Any, prefix: str, out: dict[str, Any]) -> None:
    """Collect tensors from nested dicts as {"a.b.c": tensor}."""
    import torch

    if isinstance(obj, torch.Tensor):
        out[prefix or "tensor"] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)


def _open_torch(path: Path, tensor: str | None) -> TableSource:
    import torch

    try:
        obj = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as e:  # UnpicklingError (refused object), RuntimeError (legacy/non-zip file)
        raise DataError(
            f"cannot read {path} with torch.load(mmap=True, weights_only=True): {e}. embq reads "
            "torch.save files of tensors or state dicts in the default zip format."
        ) from e
    found: dict[str, Any] = {}
    _flatten(obj, "", found)
    if not found:
        raise DataError(f"{path} holds no tensors (got {type(obj).__name__})")
    name = _pick(path, list(found), tensor)
    t = found[name]
    _check_2d(path, name, tuple(t.shape))
    if t.layout != torch.strided or t.is_quantized:
        raise DataError(f"{path}: tensor {name!r} is sparse or quantized; save a dense float one")
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise DataError(
            f"{path}: tensor {name!r} has dtype {t.dtype}; embq quantizes float tables "
            "(float16, bfloat16, float32, float64)"
        )
    bf16 = t.dtype == torch.bfloat16
    view = t.view(torch.int16).numpy().view(np.uint16) if bf16 else t.numpy()
    # Advise pages only where the tensor really lives in a mapping of this file.
    droppable = t.numel() > 0 and _is_file_mapping(t.data_ptr(), path)
    dtype = str(t.dtype).removeprefix("torch.")
    return TableSource(path, name, view, dtype, bf16=bf16, droppable=droppable, keepalive=(obj, t))


def open_table(path: str | os.PathLike, tensor: str | None = None) -> TableSource:
    """Open a float table file for chunked reading.

    Args:
        path: a .npy, .safetensors or torch.save (.pt/.pth/.bin/.ckpt) file.
        tensor: which tensor, for files holding several (state dicts use dotted names).

    Raises:
        DataError: the file is missing or unreadable, of an unknown kind, or the tensor is not
            a 2-D float table.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"input table {path} does not exist")
    if not path.is_file():
        raise DataError(f"input table {path} is not a file")
    suffix = path.suffix.lower()
    if suffix in NPY_SUFFIXES:
        return _open_npy(path, tensor)
    if suffix in SAFETENSORS_SUFFIXES:
        return _open_safetensors(path, tensor)
    if suffix in TORCH_SUFFIXES:
        return _open_torch(path, tensor)
    raise DataError(
        f"don't know how to read {path}: unknown extension {suffix or '(none)'!r}. embq reads "
        ".npy, .safetensors and torch.save files (.pt, .pth, .bin, .ckpt)."
    )
