"""Loading artifacts: every path, size, checksum and header checked before anything is used.

Loading checks the manifest's digest (`digest`: nothing in it changed since it was written),
that every path stays inside the directory, every file has the size and sha256 the manifest
records, every safetensors header agrees with the manifest, every table's format reads its
params, and the model section agrees with the tables (`model_check`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embq.artifact.digest import DIGEST_FIELD, check_digest
from embq.artifact.model_check import check_model_section
from embq.artifact.safetensors_io import TensorSpan, read_safetensors_header, read_span, sha256_file
from embq.artifact.schema import (
    ARTIFACT_FORMAT,
    ARTIFACT_VERSION,
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    ROWS_TENSOR,
    TableEntry,
    check_table_name,
    parse_table_entry,
)
from embq.artifact.watch import FileState, FileStates
from embq.embedding.registry import get_format
from embq.errors import ArtifactError, EmbqError

if TYPE_CHECKING:
    import torch

    from embq.embedding.formats import TableFormat


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



def _safe_file(root: Path, rel: Any, what: str) -> Path:
    """Resolve a manifest file path, refusing anything that could leave the artifact directory."""
    if not isinstance(rel, str) or not rel:
        raise ArtifactError(f"{what}: file must be a non-empty relative path, got {rel!r}")
    if any(ord(c) < 32 or c == "\x7f" for c in rel):
        raise ArtifactError(f"{what}: file path {rel!r} holds control characters; refusing it")
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


def _check_file(root: Path, rel: Any, size: Any, digest: Any, what: str, verify: bool,
                states: dict[Path, FileState | None]) -> Path:  # fmt: skip
    """Check a manifest file's path, size (bytes) and, when `verify`, its sha256; record its
    state (`embq.artifact.watch`) before reading it in `states`."""
    path = _safe_file(root, rel, what)
    states[root / rel] = FileState.of(root / rel)
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



class Artifact:
    """A loaded artifact directory (returned by `load_artifact`).

    Attributes:
        path: the artifact directory.
        manifest: the parsed manifest.json.
        tables: {name: TableEntry}, in manifest order (for a DLRM: its config's feature order).
        model: the stored model description, or None.
        digest: the artifact's identity, "sha256:..." (`embq.artifact.digest`); None only when
            loaded with check_seal=False and the manifest holds none.
        file_states: every file's state (`embq.artifact.watch`) taken just before it was
            checked: `file_states.changes()` names what changed on disk since.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], tables: dict[str, TableEntry],
                 formats: dict[str, TableFormat], table_spans: dict[str, dict[str, TensorSpan]],
                 dense_path: Path | None) -> None:  # fmt: skip
        self.path = path
        self.manifest = manifest
        self.digest: str | None = manifest.get(DIGEST_FIELD)
        # each file's state just before it was checked (`load_artifact` sets it)
        self.file_states = FileStates({})
        self.tables = tables
        self.model: dict[str, Any] | None = manifest.get("model")
        self._formats = formats
        self._spans = table_spans
        self._dense_path = dense_path

    def files(self) -> list[Path]:
        """Every file the artifact is made of: the manifest, the table files, dense.safetensors."""
        out = [self.path / MANIFEST_FILE]
        out += [self.path / e.file for e in self.tables.values()]
        if self._dense_path is not None:
            out.append(self._dense_path)
        return out

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
        params = {k: read_span(path, spans[k]) for k in entry.params}
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



def _check_table(
    root: Path, entry: TableEntry, verify: bool, states: dict[Path, FileState | None]
) -> tuple[TableFormat, dict[str, TensorSpan]]:
    """Check one table's file against its entry; return its format and tensor spans."""
    what = f"table {entry.name!r}"
    try:
        check_table_name(entry.name)
    except ArtifactError as e:
        raise ArtifactError(f"{what}: {e}") from e
    path = _check_file(root, entry.file, entry.bytes, entry.sha256, what, verify, states)
    try:
        fmt = get_format(entry.format)
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
    # the format must read these params: decode the first row with them (a table edited to
    # another format of the same row size, e.g. int4 -> cb4-shared, lacks its codebook)
    params = {k: read_span(path, spans[k]) for k in entry.params}
    first = np.fromfile(path, dtype=np.uint8, count=bpr, offset=rows.start).reshape(1, bpr)
    try:
        fmt.decode(first, params, entry.dim)
    except (EmbqError, ValueError, TypeError, KeyError, IndexError) as e:
        raise ArtifactError(
            f"{what}: format {entry.format} cannot read this table with params "
            f"{sorted(params)} ({e}); the manifest or the file was changed, re-create the artifact"
        ) from None
    return fmt, spans


def load_artifact(path: str | os.PathLike, verify: bool = True, check_seal: bool = True) -> Artifact:
    """Open an artifact directory, checking it before anything is used.

    Args:
        path: the artifact directory (X.embq).
        verify: also check every file's sha256 (reads every byte once, in bounded memory). With
            False only sizes, paths and headers are checked, which is instant at any size.
        check_seal: check the manifest's digest (`embq.artifact.digest`). Only `embq seal`,
            which records the digest of an edited manifest, passes False.

    Raises:
        ArtifactError: missing or invalid manifest, unknown format tag or version, a manifest
            without its digest or changed since it was written, a path that is absolute or
            leaves the directory (also through symlinks), a truncated or modified file, a
            safetensors header that disagrees with the manifest, or a model section that
            disagrees with the tables (`embq.artifact.model_check`).
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
    states: dict[Path, FileState | None] = {root / MANIFEST_FILE: FileState.of(manifest_path)}
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{manifest_path} is over {MAX_MANIFEST_BYTES} bytes; refusing it")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{manifest_path} is not valid JSON: {e}") from e
    except RecursionError:
        raise ArtifactError(f"{manifest_path} nests deeper than any manifest; refusing it") from None
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
    if check_seal:
        check_digest(manifest, str(root))
    raw_tables = manifest.get("tables", [])
    if not isinstance(raw_tables, list):
        raise ArtifactError(f"{manifest_path}: 'tables' must be a list")
    tables: dict[str, TableEntry] = {}
    formats: dict[str, TableFormat] = {}
    spans: dict[str, dict[str, TensorSpan]] = {}
    for i, raw in enumerate(raw_tables):
        entry = parse_table_entry(i, raw)
        if entry.name in tables:
            raise ArtifactError(f"{manifest_path}: table {entry.name!r} appears twice")
        formats[entry.name], spans[entry.name] = _check_table(root, entry, verify, states)
        tables[entry.name] = entry
    dense = manifest.get("dense")
    dense_path = None
    if dense is not None:
        if not isinstance(dense, dict):
            raise ArtifactError(f"{manifest_path}: 'dense' must be an object or null")
        tensors, meta = dense.get("tensors"), dense.get("meta")
        if not isinstance(tensors, list) or not all(isinstance(t, str) for t in tensors):
            raise ArtifactError(f"{manifest_path}: dense 'tensors' must be a list of names")
        if not isinstance(meta, dict) or not isinstance(meta.get("kind", ""), str):
            raise ArtifactError(f"{manifest_path}: dense 'meta' must be an object (its 'kind' a "
                                "string)")  # fmt: skip
        dense_path = _check_file(root, dense.get("file"), dense.get("bytes"), dense.get("sha256"),
                                 "dense tensors", verify, states)  # fmt: skip
        names = set(read_safetensors_header(dense_path)[0])
        if names != set(tensors):
            raise ArtifactError(
                f"{dense_path} holds tensors {sorted(names)}, not those the manifest lists"
            )
    check_model_section(manifest.get("model"), tables, str(root))
    artifact = Artifact(root, manifest, tables, formats, spans, dense_path)
    artifact.file_states = FileStates(states, root)
    return artifact

