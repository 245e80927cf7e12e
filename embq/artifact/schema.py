"""The artifact's schema: names, layout constants, the manifest's table entry, and the encoded
table type that the writer stores and the runtime loads.

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

and, optionally, "kernel_choice": "compact" (the runtime kernel choice a plan chose for it).

docs/artifact.md documents every field; docs/artifact.schema.json is its JSON Schema.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embq.errors import ArtifactError

ARTIFACT_FORMAT = "embq"
ARTIFACT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TABLES_DIR = "tables"
DENSE_FILE = "dense.safetensors"
ROWS_TENSOR = "rows"
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")
POOLINGS = ("SUM", "MEAN")


def json_text(obj: Any, what: str) -> str:
    """Serialise to JSON, refusing NaN/Inf and non-JSON types with a clear message."""
    try:
        return json.dumps(obj, indent=1, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{what} cannot be stored as JSON: {e}") from e


def check_table_name(name: str) -> None:
    """Table names become file names: letters, digits, '_', '.', '-', not starting with '.'/'-'."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ArtifactError(
            f"table name {name!r} cannot be a file name; use letters, digits, '_', '.', '-' "
            "(at most 200, not starting with '.' or '-')"
        )


def table_file_name(name: str) -> str:
    """A table's file, relative to the artifact directory: tables/NAME.safetensors."""
    return f"{TABLES_DIR}/{name}.safetensors"



@dataclass
class QuantizedTable:
    """One table encoded with an embq format: what an artifact stores and a kernel loads.

    Attributes:
        name, rows, dim: the table's name and shape [rows, dim].
        feature_names: the sparse features looked up in it.
        pooling: "SUM" or "MEAN".
        format: the embq format name (`embq.embedding.configs`).
        codes: uint8 [rows, bytes_per_row] encoded rows (in memory, or memory-mapped).
        params: {name: array} table-level params (codebooks), {} for row-wise formats.
        stats: {"bytes", "fp32_bytes", "size_ratio", "relative_mse", "rmse"}; see
            `embq.embedding.encode.table_stats`.
    """

    name: str
    rows: int
    dim: int
    feature_names: list[str]
    pooling: str
    format: str
    codes: np.ndarray = field(repr=False)
    params: dict[str, np.ndarray] = field(repr=False)
    stats: dict[str, Any]


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
    kernel_choice: str | None = None  # the runtime kernel choice recorded by a plan



_ENTRY_TYPES: dict[str, type | tuple[type, ...]] = {
    "name": str, "rows": int, "dim": int, "format": str, "bytes_per_row": int,
    "feature_names": list, "file": str, "sha256": str, "bytes": int, "params": list,
}  # fmt: skip


def parse_table_entry(index: int, raw: Any) -> TableEntry:
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
    kernel_choice = raw.get("kernel_choice")
    if kernel_choice is not None:
        from embq.runtime.kernel_choice import KERNEL_CHOICES

        if kernel_choice not in KERNEL_CHOICES:
            raise ArtifactError(f"{label}: 'kernel_choice' must be one of {KERNEL_CHOICES}, got "
                                f"{kernel_choice!r}")  # fmt: skip
    return TableEntry(
        name=raw["name"], rows=raw["rows"], dim=raw["dim"], format=raw["format"],
        bytes_per_row=raw["bytes_per_row"], feature_names=[str(f) for f in raw["feature_names"]],
        file=raw["file"], sha256=raw["sha256"], bytes=raw["bytes"],
        params=[str(p) for p in raw["params"]], stats=stats, kernel_choice=kernel_choice,
    )  # fmt: skip
