"""Writing artifacts: table files filled in row ranges, then one atomic publish.

Writing goes to a hidden sibling directory that `ArtifactWriter.publish` renames into place, so a
crash never leaves something at the output path that looks whole, and an existing path is never
replaced. Nothing is ever pickled.

Tables are written through `TableFileWriter`, which lays out the safetensors header itself so
that rows can be filled in row ranges, in any order, from several processes, without holding the
table in memory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embq.artifact.digest import DIGEST_FIELD, manifest_digest
from embq.artifact.safetensors_io import (
    ST_TO_NUMPY,
    read_safetensors_header,
    read_span,
    safetensors_header,
    sha256_file,
    st_code,
)
from embq.artifact.schema import (
    ARTIFACT_FORMAT,
    ARTIFACT_VERSION,
    DENSE_FILE,
    MANIFEST_FILE,
    NAME_RE,
    ROWS_TENSOR,
    TABLES_DIR,
    check_table_name,
    json_text,
    table_file_name,
)
from embq.embedding.registry import get_format
from embq.errors import ArtifactError, FormatError
from embq.files import fsync_dir, publish_directory

if TYPE_CHECKING:
    import torch


def refuse_published(directory: Path, what: str) -> None:
    """ArtifactError if `directory` is a published (or finished) artifact: one holding a
    manifest. embq never writes into one (readers may have its files memory-mapped)."""
    if (directory / MANIFEST_FILE).exists():
        raise ArtifactError(
            f"{what}: {directory} is a finished artifact (it has a {MANIFEST_FILE}); embq never "
            "writes into one. Write a new artifact and swap it in."
        )


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
        refuse_published(Path(path).parent.parent, f"writing {Path(path).name}")
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
            if pname == ROWS_TENSOR or not NAME_RE.match(pname):
                raise ArtifactError(f"table param name {pname!r} is reserved or not a valid name")
            code = st_code(value.dtype)
            if code is None:
                raise ArtifactError(
                    f"table param {pname!r} has dtype {value.dtype}, which safetensors cannot store"
                )
            layout.append((pname, code, value.shape))
        layout.append((ROWS_TENSOR, "U8", (num_rows, bytes_per_row)))
        header, spans = safetensors_header(layout)
        refuse_published(path.parent.parent, f"writing {path.name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(header)
            for value in params.values():
                f.write(value.astype(ST_TO_NUMPY[st_code(value.dtype)], copy=False).tobytes())
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
        params = {k: read_span(path, s) for k, s in spans.items() if k != ROWS_TENSOR}
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
            refuse_published(self.staging, "staging an artifact")
            self.staging.mkdir(parents=True, exist_ok=True)
            self._owns_staging = False
        self._tables: dict[str, _PendingTable] = {}
        self._dense: dict[str, Any] | None = None
        self._model: dict[str, Any] | None = None
        self._published = False
        self.digest: str | None = None  # set by publish

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._published:
            self.abort()

    def begin_table(self, name: str, format_name: str, num_rows: int, dim: int, *,
                    params: dict[str, np.ndarray] | None = None,
                    feature_names: list[str] | tuple[str, ...] = (),
                    stats: dict[str, Any] | None = None,
                    reuse: bool = False,
                    kernel_choice: str | None = None) -> TableFileWriter:  # fmt: skip
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
            kernel_choice: the runtime kernel choice to serve it with by default ("auto",
                "compact", "tbe"), as a plan chose; None records nothing.

        Returns:
            A TableFileWriter; call `write_rows(start, codes)` until every row is written.
        """
        check_table_name(name)
        if name in self._tables:
            raise ArtifactError(f"table {name!r} was already added to this artifact")
        fmt = get_format(format_name)
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
        if kernel_choice is not None:
            from embq.runtime.kernel_choice import check_kernel_choice

            entry["kernel_choice"] = check_kernel_choice(kernel_choice)
        json_text(entry, f"table {name!r} entry")
        self._tables[name] = _PendingTable(entry, writer)
        return writer

    def add_table(self, name: str, format_name: str, rows: np.ndarray, dim: int, *,
                  params: dict[str, np.ndarray] | None = None,
                  feature_names: list[str] | tuple[str, ...] = (),
                  stats: dict[str, Any] | None = None,
                  kernel_choice: str | None = None) -> None:  # fmt: skip
        """Add a table whose encoded rows are in memory: uint8 [rows, bytes_per_row].

        See `begin_table` for the arguments; large tables should stream through it instead.
        """
        rows = np.asarray(rows)
        if rows.ndim != 2:
            raise ArtifactError(
                f"table {name!r}: expected 2-D uint8 rows, got shape {list(rows.shape)}"
            )
        writer = self.begin_table(name, format_name, rows.shape[0], dim, params=params,
                                  feature_names=feature_names, stats=stats,
                                  kernel_choice=kernel_choice)  # fmt: skip
        writer.write_rows(0, rows)
        writer.close()

    def set_table_stats(self, name: str, stats: dict[str, Any]) -> None:
        """Replace a table's stats (e.g. once a streamed table is complete)."""
        self._tables[name].entry["stats"] = dict(stats)
        json_text(stats, f"table {name!r} stats")

    def add_dense(self, tensors: dict[str, torch.Tensor],
                  meta: dict[str, Any] | None = None) -> None:  # fmt: skip
        """Store the dense tensors in dense.safetensors and `meta` (JSON) in the manifest."""
        from safetensors.torch import save_file

        if self._dense is not None:
            raise ArtifactError("dense tensors were already added to this artifact")
        meta = dict(meta or {})
        json_text(meta, "dense meta")
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
        json_text(model, "model description")
        self._model = dict(model)

    def publish(self) -> Path:
        """Hash every file, write manifest.json with its digest (`embq.artifact.digest`; also
        `self.digest` afterwards), and rename the staging directory to `path`.

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
        manifest[DIGEST_FIELD] = manifest_digest(manifest)
        self.digest = manifest[DIGEST_FIELD]
        text = json_text(manifest, "manifest")
        manifest_path = self.staging / MANIFEST_FILE
        with open(manifest_path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.staging / TABLES_DIR)
        fsync_dir(self.staging)
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



DENSE_KIND_FP32 = "fp32"  # dense meta "kind" of a model's float towers, stored as they are


def write_model_artifact(
    output: str | os.PathLike | ArtifactWriter,
    tables: list,
    config: Any,
    dense: dict[str, torch.Tensor],
    dense_meta: dict[str, Any] | None = None,
    kernels: dict[str, str] | None = None,
) -> Path:
    """Write a DLRM's encoded tables (`QuantizedTable`s, in the model's feature order), its dense
    tensors (the fp32 state dict unless `dense_meta` names another kind) and its config (an
    `embq.models.dlrm.DLRMConfig`) as an artifact, atomically.

    The manifest's "model" section is {"type": "dlrm", "config": ..., "pooling": {table: mode}};
    `kernels` ({table: runtime kernel choice}, e.g. a plan's) are recorded per table.
    `output` is the artifact path, or an open `ArtifactWriter` to fill (the caller publishes).
    Returns the artifact path.
    """
    kernels = kernels or {}
    if not isinstance(output, ArtifactWriter):
        with ArtifactWriter(output) as writer:
            write_model_artifact(writer, tables, config, dense, dense_meta, kernels)
            return writer.publish()
    writer = output
    for t in tables:
        writer.add_table(t.name, t.format, t.codes, t.dim, params=t.params,
                         feature_names=t.feature_names, stats=t.stats,
                         kernel_choice=kernels.get(t.name))  # fmt: skip
    writer.add_dense(dense, meta=dense_meta or {"kind": DENSE_KIND_FP32})
    writer.set_model({"type": "dlrm", "config": config.to_json(),
                      "pooling": {t.name: t.pooling for t in tables}})  # fmt: skip
    return writer.path
