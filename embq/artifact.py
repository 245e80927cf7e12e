"""The on-disk artifact: a directory of JSON + safetensors, written atomically, loaded with checks.

Layout (version 1)::

    model.embq/
      manifest.json               {"format": "embq", "version": 1, "tables": [...],
                                   "dense": {...} | null, "model": {...} | null}
      tables/NAME.safetensors     "rows": uint8 [rows, bytes_per_row] (fused rows or codes),
                                  plus one tensor per table-level param (codebooks), by name
      dense.safetensors           the dense tower's tensors

A table entry in the manifest::

    {"name": "t_cat_0", "rows": 1000, "dim": 64, "format": "int4", "bytes_per_row": 36,
     "feature_names": ["cat_0"], "file": "tables/t_cat_0.safetensors", "sha256": "...",
     "bytes": 36144, "params": [], "stats": {...}}

Writing goes to a hidden sibling directory that `ArtifactWriter.publish` renames into place, so a
crash never leaves something at the output path that looks whole, and an existing path is never
replaced. Loading checks every path stays inside the directory, every file has the size and
sha256 the manifest records, and every safetensors header agrees with the manifest. Nothing is
ever pickled.

Tables are written through `TableFileWriter`, which lays out the safetensors header itself
(8-byte little-endian header length, JSON header, raw data) so that rows can be filled in row
ranges, in any order, from several processes, without holding the table in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embq.errors import ArtifactError, EmbqError, FormatError

if TYPE_CHECKING:  # formats.py imports heavy kernels lazily; artifact only needs it at call time
    import torch

    from embq.formats import TableFormat

ARTIFACT_FORMAT = "embq"
ARTIFACT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TABLES_DIR = "tables"
DENSE_FILE = "dense.safetensors"
ROWS_TENSOR = "rows"

# safetensors refuses headers above 100 MB; so do we, before reading one into memory.
MAX_HEADER_BYTES = 100_000_000
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
_HASH_BLOCK = 8 * 1024 * 1024
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")

# safetensors dtype codes <-> numpy dtypes (little-endian on disk). BF16 has no numpy dtype: it is
# read as uint16 bit patterns and widened by the caller.
_ST_TO_NUMPY: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}  # fmt: skip


def _st_code(dtype: np.dtype) -> str | None:
    """The safetensors dtype code for a numpy dtype (None when safetensors cannot store it)."""
    for code, known in _ST_TO_NUMPY.items():
        if code != "BF16" and dtype.kind == known.kind and dtype.itemsize == known.itemsize:
            return code
    return None


# --------------------------------------------------------------------------- safetensors layout


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
        return _ST_TO_NUMPY[self.dtype]


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
        if dtype not in _ST_TO_NUMPY:
            raise error(f"{path}: tensor {name!r} has dtype {dtype!r}, which embq does not read")
        if any(s < 0 for s in shape) or not 0 <= begin <= end:
            raise error(f"{path}: tensor {name!r} has negative shape or offsets")
        nbytes = math.prod(shape) * _ST_TO_NUMPY[dtype].itemsize
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


def _safetensors_header(
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
        nbytes = math.prod(shape) * _ST_TO_NUMPY[dtype].itemsize
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


def _fsync_dir(path: Path) -> None:
    """Make a rename or new file in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _json_text(obj: Any, what: str) -> str:
    """Serialise to JSON, refusing NaN/Inf and non-JSON types with a clear message."""
    try:
        return json.dumps(obj, indent=1, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{what} cannot be stored as JSON: {e}") from e


def check_table_name(name: str) -> None:
    """Table names become file names: letters, digits, '_', '.', '-', not starting with '.'/'-'."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ArtifactError(
            f"table name {name!r} cannot be a file name; use letters, digits, '_', '.', '-' "
            "(at most 200, not starting with '.' or '-')"
        )


def table_file_name(name: str) -> str:
    """A table's file, relative to the artifact directory: tables/NAME.safetensors."""
    return f"{TABLES_DIR}/{name}.safetensors"


def _get_format(name: str) -> TableFormat:
    from embq.formats import get_format

    return get_format(name)


# --------------------------------------------------------------------------- writing


class TableFileWriter:
    """One table file whose header and params are fixed up front and whose rows are filled later.

    The file is preallocated (sparse) to its final size, so rows can be written by row range, in
    any order and from several processes at once (each owning disjoint rows). Writes go through
    plain `seek` + `write`, not a memory map, so written pages do not count towards this process's
    RSS.

    Attributes:
        path: the .safetensors file.
        num_rows: rows in the table.
        bytes_per_row: bytes of one encoded row.
        params: {name: array} table-level params stored next to the rows.
    """

    def __init__(self, path: Path, num_rows: int, bytes_per_row: int, rows_offset: int,
                 params: dict[str, np.ndarray]) -> None:  # fmt: skip
        self.path = path
        self.num_rows = num_rows
        self.bytes_per_row = bytes_per_row
        self.params = params
        self._rows_offset = rows_offset
        self._file = open(path, "r+b")

    @classmethod
    def create(cls, path: str | os.PathLike, num_rows: int, bytes_per_row: int,
               params: dict[str, np.ndarray] | None = None) -> TableFileWriter:  # fmt: skip
        """Create (or replace) the file: header, params, then num_rows x bytes_per_row zeros."""
        path = Path(path)
        params = {k: np.ascontiguousarray(v) for k, v in sorted((params or {}).items())}
        layout = []
        for pname, value in params.items():
            if pname == ROWS_TENSOR or not _NAME_RE.match(pname):
                raise ArtifactError(f"table param name {pname!r} is reserved or not a valid name")
            code = _st_code(value.dtype)
            if code is None:
                raise ArtifactError(
                    f"table param {pname!r} has dtype {value.dtype}, which safetensors cannot store"
                )
            layout.append((pname, code, value.shape))
        layout.append((ROWS_TENSOR, "U8", (num_rows, bytes_per_row)))
        header, spans = _safetensors_header(layout)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(header)
            for pname, value in params.items():
                f.write(value.astype(_ST_TO_NUMPY[_st_code(value.dtype)], copy=False).tobytes())
            f.truncate(spans[ROWS_TENSOR][1])
        return cls(path, num_rows, bytes_per_row, spans[ROWS_TENSOR][0], params)

    @classmethod
    def open(cls, path: str | os.PathLike, num_rows: int, bytes_per_row: int) -> TableFileWriter:
        """Reopen a file made by `create` (to resume, or from another rank), checking its shape."""
        path = Path(path)
        spans, _ = read_safetensors_header(path)
        rows = spans.get(ROWS_TENSOR)
        if rows is None or rows.dtype != "U8" or rows.shape != (num_rows, bytes_per_row):
            raise ArtifactError(
                f"{path} does not hold uint8 rows of shape [{num_rows}, {bytes_per_row}]; it was "
                "written for other arguments"
            )
        params = {k: _read_span(path, s) for k, s in spans.items() if k != ROWS_TENSOR}
        return cls(path, num_rows, bytes_per_row, rows.start, params)

    def write_rows(self, start: int, codes: np.ndarray) -> None:
        """Write encoded rows `codes` (uint8 [n, bytes_per_row]) at rows start .. start+n-1."""
        if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != self.bytes_per_row:
            raise ArtifactError(
                f"expected uint8 rows of width {self.bytes_per_row} for {self.path.name}, "
                f"but got {codes.dtype} {list(codes.shape)}"
            )
        if not 0 <= start <= self.num_rows - codes.shape[0]:
            raise ArtifactError(
                f"rows {start}..{start + codes.shape[0] - 1} are outside the table's "
                f"{self.num_rows} rows"
            )
        self._file.seek(self._rows_offset + start * self.bytes_per_row)
        self._file.write(memoryview(np.ascontiguousarray(codes)).cast("B"))

    def sync(self) -> None:
        """Flush written rows to disk (fsync), so a recorded checkpoint survives a crash."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Flush and close; safe to call twice."""
        if not self._file.closed:
            self.sync()
            self._file.close()


@dataclass
class _PendingTable:
    entry: dict[str, Any]
    writer: TableFileWriter | None = None


class ArtifactWriter:
    """Builds an artifact in a hidden sibling directory and publishes it atomically.

    Example::

        with ArtifactWriter("model.embq") as w:
            w.add_table("t_cat_0", "int4", codes, dim=64, feature_names=["cat_0"])
            w.add_dense({"mlp.0.weight": weight}, meta={"scheme": "int8"})
            w.set_model(config_dict)
            w.publish()

    Args:
        path: where the artifact directory will appear. It must not exist: publishing never
            replaces anything.
        staging: the directory to build in. By default a fresh hidden temporary sibling that is
            removed if the `with` block fails; a caller that resumes work (embq.stream) passes a
            fixed path and keeps it on failure.
    """

    def __init__(self, path: str | os.PathLike, staging: str | os.PathLike | None = None) -> None:
        self.path = Path(path).absolute()
        if os.path.lexists(self.path):
            raise ArtifactError(
                f"{self.path} already exists; embq never overwrites an artifact. Choose another "
                "output path or remove the old one."
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if staging is None:
            prefix = f".{self.path.name}.tmp-"
            self.staging = Path(tempfile.mkdtemp(prefix=prefix, dir=self.path.parent))
            self._owns_staging = True
        else:
            self.staging = Path(staging).absolute()
            self.staging.mkdir(parents=True, exist_ok=True)
            self._owns_staging = False
        self._tables: dict[str, _PendingTable] = {}
        self._dense: dict[str, Any] | None = None
        self._model: dict[str, Any] | None = None
        self._published = False

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._published:
            self.abort()

    def begin_table(self, name: str, format_name: str, num_rows: int, dim: int, *,
                    params: dict[str, np.ndarray] | None = None,
                    feature_names: list[str] | tuple[str, ...] = (),
                    stats: dict[str, Any] | None = None,
                    reuse: bool = False) -> TableFileWriter:  # fmt: skip
        """Start a table whose rows are written later in row ranges (for tables larger than RAM).

        Args:
            name: table name; also its file name, tables/NAME.safetensors.
            format_name: an embq.formats name ("int4", "int8", ...).
            num_rows: rows in the table (>= 1).
            dim: embedding dimension of the float table.
            params: table-level params from `TableFormat.fit` ({} for row-wise formats).
            feature_names: the sparse features this table serves.
            stats: JSON-able numbers to keep in the manifest (quality, timing).
            reuse: reopen an existing file from an earlier, interrupted run instead of creating
                it; its params are then read from the file (`writer.params`).

        Returns:
            A TableFileWriter; call `write_rows(start, codes)` until every row is written.
        """
        check_table_name(name)
        if name in self._tables:
            raise ArtifactError(f"table {name!r} was already added to this artifact")
        fmt = _get_format(format_name)
        fmt.check_dim(dim)
        if int(num_rows) < 1:
            raise FormatError(f"table {name!r} has {num_rows} rows; a table needs at least one row")
        bpr = int(fmt.bytes_per_row(dim))
        rel = table_file_name(name)
        path = self.staging / rel
        if reuse and path.exists():
            writer = TableFileWriter.open(path, int(num_rows), bpr)
        else:
            writer = TableFileWriter.create(path, int(num_rows), bpr, params)
        entry = {
            "name": name, "rows": int(num_rows), "dim": int(dim), "format": format_name,
            "bytes_per_row": bpr, "feature_names": [str(f) for f in feature_names], "file": rel,
            "sha256": None, "bytes": None, "params": sorted(writer.params),
            "stats": dict(stats or {}),
        }  # fmt: skip
        _json_text(entry, f"table {name!r} entry")
        self._tables[name] = _PendingTable(entry, writer)
        return writer

    def add_table(self, name: str, format_name: str, rows: np.ndarray, dim: int, *,
                  params: dict[str, np.ndarray] | None = None,
                  feature_names: list[str] | tuple[str, ...] = (),
                  stats: dict[str, Any] | None = None) -> None:  # fmt: skip
        """Add a table whose encoded rows are in memory: uint8 [rows, bytes_per_row].

        See `begin_table` for the arguments; large tables should stream through it instead.
        """
        rows = np.asarray(rows)
        if rows.ndim != 2:
            raise ArtifactError(
                f"table {name!r}: expected 2-D uint8 rows, got shape {list(rows.shape)}"
            )
        writer = self.begin_table(name, format_name, rows.shape[0], dim, params=params,
                                  feature_names=feature_names, stats=stats)  # fmt: skip
        writer.write_rows(0, rows)
        writer.close()

    def set_table_stats(self, name: str, stats: dict[str, Any]) -> None:
        """Replace a table's stats (e.g. once a streamed table is complete)."""
        self._tables[name].entry["stats"] = dict(stats)
        _json_text(stats, f"table {name!r} stats")

    def add_dense(self, tensors: dict[str, torch.Tensor],
                  meta: dict[str, Any] | None = None) -> None:  # fmt: skip
        """Store the dense tensors in dense.safetensors and `meta` (JSON) in the manifest."""
        from safetensors.torch import save_file

        if self._dense is not None:
            raise ArtifactError("dense tensors were already added to this artifact")
        meta = dict(meta or {})
        _json_text(meta, "dense meta")
        # clone: safetensors refuses tensors that share storage (tied or sliced weights)
        plain = {str(k): v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
        try:
            save_file(plain, str(self.staging / DENSE_FILE))
        except Exception as e:  # safetensors raises plain ValueError/TypeError/SafetensorError
            raise ArtifactError(f"dense tensors cannot be stored in safetensors: {e}") from e
        self._dense = {"file": DENSE_FILE, "sha256": None, "bytes": None,
                       "tensors": sorted(plain), "meta": meta}  # fmt: skip

    def set_model(self, model: dict[str, Any]) -> None:
        """Store a JSON description of the model (e.g. the DLRM config) in the manifest."""
        _json_text(model, "model description")
        self._model = dict(model)

    def publish(self) -> Path:
        """Hash every file, write manifest.json, and rename the staging directory to `path`.

        Returns:
            The artifact path.
        """
        if self._published:
            return self.path
        tables = []
        for pending in self._tables.values():
            if pending.writer is not None:
                pending.writer.close()
                pending.writer = None
            entry = pending.entry
            file = self.staging / entry["file"]
            entry["bytes"], entry["sha256"] = file.stat().st_size, sha256_file(file)
            tables.append(entry)
        dense = None
        if self._dense is not None:
            dense = dict(self._dense)
            file = self.staging / DENSE_FILE
            dense["bytes"], dense["sha256"] = file.stat().st_size, sha256_file(file)
        manifest = {"format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, "tables": tables,
                    "dense": dense, "model": self._model}  # fmt: skip
        text = _json_text(manifest, "manifest")
        manifest_path = self.staging / MANIFEST_FILE
        with open(manifest_path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(self.staging / TABLES_DIR)
        _fsync_dir(self.staging)
        publish_directory(self.staging, self.path)
        self._published = True
        return self.path

    def abort(self) -> None:
        """Close open files; remove the staging directory if this writer created it."""
        for pending in self._tables.values():
            if pending.writer is not None:
                pending.writer._file.close()
                pending.writer = None
        if self._owns_staging and not self._published:
            shutil.rmtree(self.staging, ignore_errors=True)


def publish_directory(staging: Path, path: Path) -> None:
    """Rename a finished staging directory to `path`, never replacing anything there."""
    if os.path.lexists(path):
        raise ArtifactError(
            f"{path} appeared while the artifact was being written; the finished artifact is "
            f"left in {staging}. Move it into place yourself."
        )
    try:
        # On POSIX a rename onto an existing *empty* directory succeeds; onto anything else it
        # fails. Either way nothing a user had is lost.
        os.rename(staging, path)
    except OSError as e:
        raise ArtifactError(f"cannot move {staging} to {path}: {e}") from e
    _fsync_dir(path.parent)


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class TableEntry:
    """One table as the manifest describes it (see the module docstring for the fields)."""

    name: str
    rows: int
    dim: int
    format: str
    bytes_per_row: int
    feature_names: list[str]
    file: str
    sha256: str
    bytes: int
    params: list[str]
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Table:
    """A loaded table.

    Attributes:
        entry: its manifest entry.
        format: the embq.formats TableFormat that decodes it.
        rows: uint8 [rows, bytes_per_row], memory-mapped read-only from the table file.
        params: {name: array} table-level params (codebooks), {} for row-wise formats.
    """

    entry: TableEntry
    format: TableFormat
    rows: np.ndarray
    params: dict[str, np.ndarray]

    def decode(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Dequantize rows start..stop-1 to float32 [stop - start, dim]."""
        return self.format.decode(np.asarray(self.rows[start:stop]), self.params, self.entry.dim)


def _read_span(path: Path, span: TensorSpan) -> np.ndarray:
    """Read one (small) tensor from a safetensors file into memory as a numpy array."""
    with open(path, "rb") as f:
        f.seek(span.start)
        raw = f.read(span.stop - span.start)
    return np.frombuffer(raw, dtype=span.numpy_dtype).reshape(span.shape).astype(
        span.numpy_dtype.newbyteorder("="), copy=True
    )


def _safe_file(root: Path, rel: Any, what: str) -> Path:
    """Resolve a manifest file path, refusing anything that could leave the artifact directory."""
    if not isinstance(rel, str) or not rel:
        raise ArtifactError(f"{what}: file must be a non-empty relative path, got {rel!r}")
    parts = rel.split("/")
    if (
        rel.startswith(("/", "\\")) or "\\" in rel or ":" in rel or os.path.isabs(rel)
        or any(p in ("", ".", "..") for p in parts)
    ):  # fmt: skip
        raise ArtifactError(
            f"{what}: file path {rel!r} is absolute or escapes the artifact directory; refusing it"
        )
    real_root = root.resolve()
    full = (root / rel).resolve()
    if not full.is_relative_to(real_root):
        raise ArtifactError(
            f"{what}: {rel!r} resolves to {full}, outside the artifact (a symlink?); refusing it"
        )
    if not full.is_file():
        raise ArtifactError(f"{what}: {rel} is missing from {root}")
    return full


def _check_file(root: Path, rel: Any, size: Any, digest: Any, what: str, verify: bool) -> Path:
    """Check a manifest file's path, size (bytes) and, when `verify`, its sha256."""
    path = _safe_file(root, rel, what)
    actual = path.stat().st_size
    if not isinstance(size, int) or actual != size:
        state = "truncated" if isinstance(size, int) and actual < size else "the wrong size"
        raise ArtifactError(
            f"{what}: {rel} is {state}: {actual} bytes on disk, {size} in the manifest. "
            "The artifact is damaged; re-create or re-copy it."
        )
    if verify:
        if not isinstance(digest, str) or sha256_file(path) != digest:
            raise ArtifactError(
                f"{what}: {rel} does not match its sha256 in the manifest: the file was modified "
                "or corrupted. Re-create or re-copy the artifact."
            )
    return path


_ENTRY_TYPES: dict[str, type | tuple[type, ...]] = {
    "name": str, "rows": int, "dim": int, "format": str, "bytes_per_row": int,
    "feature_names": list, "file": str, "sha256": str, "bytes": int, "params": list,
}  # fmt: skip


class Artifact:
    """A loaded artifact directory (returned by `load_artifact`).

    Attributes:
        path: the artifact directory.
        manifest: the parsed manifest.json.
        tables: {name: TableEntry}, in manifest order.
        model: the stored model description, or None.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], tables: dict[str, TableEntry],
                 formats: dict[str, TableFormat], table_spans: dict[str, dict[str, TensorSpan]],
                 dense_path: Path | None) -> None:  # fmt: skip
        self.path = path
        self.manifest = manifest
        self.tables = tables
        self.model: dict[str, Any] | None = manifest.get("model")
        self._formats = formats
        self._spans = table_spans
        self._dense_path = dense_path

    def table_names(self) -> list[str]:
        """Names of the tables, in manifest order."""
        return list(self.tables)

    def table(self, name: str) -> Table:
        """The table `name`: memory-mapped uint8 rows, params and format."""
        if name not in self.tables:
            raise ArtifactError(
                f"artifact {self.path} has no table {name!r}; it has {self.table_names()}"
            )
        entry = self.tables[name]
        path = self.path / entry.file
        spans = self._spans[name]
        rows_span = spans[ROWS_TENSOR]
        rows = np.memmap(path, dtype=np.uint8, mode="r", offset=rows_span.start,
                         shape=rows_span.shape)  # fmt: skip
        params = {k: _read_span(path, spans[k]) for k in entry.params}
        return Table(entry, self._formats[name], rows, params)

    @property
    def dense_meta(self) -> dict[str, Any] | None:
        """The dense section's "meta" dict, or None if the artifact has no dense tower."""
        dense = self.manifest.get("dense")
        return None if dense is None else dense.get("meta", {})

    def dense(self) -> dict[str, torch.Tensor]:
        """The dense tensors, {name: tensor}, or {} when the artifact has none."""
        if self._dense_path is None:
            return {}
        from safetensors.torch import load_file

        try:
            return load_file(str(self._dense_path))
        except Exception as e:  # SafetensorError and friends from the Rust side
            raise ArtifactError(f"cannot read {self._dense_path}: {e}") from e


def _parse_table_entry(index: int, raw: Any) -> TableEntry:
    if not isinstance(raw, dict):
        raise ArtifactError(f"manifest table #{index} is not a JSON object")
    label = f"manifest table #{index} ({raw.get('name', '?')!r})"
    for key, kind in _ENTRY_TYPES.items():
        if key not in raw:
            raise ArtifactError(f"{label} lacks {key!r}")
        value = raw[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            kind_name = getattr(kind, "__name__", kind)
            raise ArtifactError(f"{label}: {key!r} must be {kind_name}, got {value!r}")
    if raw["rows"] < 1 or raw["dim"] < 1 or raw["bytes_per_row"] < 1:
        raise ArtifactError(f"{label}: rows, dim and bytes_per_row must be positive")
    stats = raw.get("stats", {})
    if not isinstance(stats, dict):
        raise ArtifactError(f"{label}: 'stats' must be an object")
    return TableEntry(
        name=raw["name"], rows=raw["rows"], dim=raw["dim"], format=raw["format"],
        bytes_per_row=raw["bytes_per_row"], feature_names=[str(f) for f in raw["feature_names"]],
        file=raw["file"], sha256=raw["sha256"], bytes=raw["bytes"],
        params=[str(p) for p in raw["params"]], stats=stats,
    )  # fmt: skip


def _check_table(
    root: Path, entry: TableEntry, verify: bool
) -> tuple[TableFormat, dict[str, TensorSpan]]:
    """Check one table's file against its entry; return its format and tensor spans."""
    what = f"table {entry.name!r}"
    try:
        check_table_name(entry.name)
    except ArtifactError as e:
        raise ArtifactError(f"{what}: {e}") from e
    path = _check_file(root, entry.file, entry.bytes, entry.sha256, what, verify)
    try:
        fmt = _get_format(entry.format)
        bpr = int(fmt.bytes_per_row(entry.dim))
    except EmbqError as e:
        raise ArtifactError(
            f"{what} uses format {entry.format!r} with dim {entry.dim}, which this embq cannot "
            f"read ({e}); upgrade embq or re-create the artifact"
        ) from e
    if bpr != entry.bytes_per_row:
        raise ArtifactError(
            f"{what}: format {entry.format} stores {bpr} bytes per row at dim {entry.dim}, but the "
            f"manifest says {entry.bytes_per_row}"
        )
    spans, _ = read_safetensors_header(path)
    rows = spans.get(ROWS_TENSOR)
    if rows is None or rows.dtype != "U8" or rows.shape != (entry.rows, bpr):
        got = "no 'rows' tensor" if rows is None else f"{rows.dtype} {list(rows.shape)}"
        raise ArtifactError(
            f"{what}: {entry.file} holds {got}, but the manifest says uint8 "
            f"[{entry.rows}, {bpr}] ({entry.rows} rows x {bpr} bytes)"
        )
    if set(spans) != {ROWS_TENSOR, *entry.params}:
        raise ArtifactError(
            f"{what}: {entry.file} holds tensors {sorted(spans)}, but the manifest lists rows plus "
            f"params {entry.params}"
        )
    return fmt, spans


def load_artifact(path: str | os.PathLike, verify: bool = True) -> Artifact:
    """Open an artifact directory, checking it before anything is used.

    Args:
        path: the artifact directory (X.embq).
        verify: also check every file's sha256 (reads every byte once, in bounded memory). With
            False only sizes, paths and headers are checked, which is instant at any size.

    Raises:
        ArtifactError: missing or invalid manifest, unknown format tag or version, a path that is
            absolute or leaves the directory (also through symlinks), a truncated or modified
            file, or a safetensors header that disagrees with the manifest.
    """
    root = Path(path).absolute()
    if not root.is_dir():
        raise ArtifactError(
            f"{root} is not an artifact directory (expected X.embq/ with {MANIFEST_FILE})"
        )
    if not os.path.lexists(root / MANIFEST_FILE):
        raise ArtifactError(
            f"{root} has no {MANIFEST_FILE}: it is not an embq artifact, or an unfinished one"
        )
    manifest_path = _safe_file(root, MANIFEST_FILE, "manifest")
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{manifest_path} is over {MAX_MANIFEST_BYTES} bytes; refusing it")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{manifest_path} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
        tag = manifest.get("format") if isinstance(manifest, dict) else None
        raise ArtifactError(
            f"{manifest_path}: expected \"format\": \"{ARTIFACT_FORMAT}\", got {tag!r}"
        )
    version = manifest.get("version")
    if version != ARTIFACT_VERSION or isinstance(version, bool):
        is_int = isinstance(version, int) and not isinstance(version, bool)
        newer = is_int and version > ARTIFACT_VERSION
        raise ArtifactError(
            f"{root}: artifact version {version!r} is "
            + ("newer than this embq reads" if newer else "unknown")
            + f" (this embq reads version {ARTIFACT_VERSION})"
            + ("; upgrade embq" if newer else "")
        )
    raw_tables = manifest.get("tables", [])
    if not isinstance(raw_tables, list):
        raise ArtifactError(f"{manifest_path}: 'tables' must be a list")
    tables: dict[str, TableEntry] = {}
    formats: dict[str, TableFormat] = {}
    spans: dict[str, dict[str, TensorSpan]] = {}
    for i, raw in enumerate(raw_tables):
        entry = _parse_table_entry(i, raw)
        if entry.name in tables:
            raise ArtifactError(f"{manifest_path}: table {entry.name!r} appears twice")
        formats[entry.name], spans[entry.name] = _check_table(root, entry, verify)
        tables[entry.name] = entry
    dense = manifest.get("dense")
    dense_path = None
    if dense is not None:
        if not isinstance(dense, dict):
            raise ArtifactError(f"{manifest_path}: 'dense' must be an object or null")
        dense_path = _check_file(root, dense.get("file"), dense.get("bytes"), dense.get("sha256"),
                                 "dense tensors", verify)  # fmt: skip
        names = set(read_safetensors_header(dense_path)[0])
        if names != set(dense.get("tensors", [])):
            raise ArtifactError(
                f"{dense_path} holds tensors {sorted(names)}, not those the manifest lists"
            )
    model = manifest.get("model")
    if model is not None and not isinstance(model, dict):
        raise ArtifactError(f"{manifest_path}: 'model' must be an object or null")
    return Artifact(root, manifest, tables, formats, spans, dense_path)
