"""Bytes on a target: how long a row really is once a kernel pads it, how many bytes a table
takes (per-table alignment and codebook / PQ params included), and the choices a table has.

On `x86-fbgemm` these equal what embq's runtime holds (`embq.runtime.kernel_choice.
table_memory_bytes`, the metadata's "memory_bytes"); tests check it table by table.
"""

from __future__ import annotations

from dataclasses import dataclass

from embq.embedding.configs import FormatConfig, parse_format
from embq.embedding.registry import get_format
from embq.errors import FormatError
from embq.hardware.spec import ROW_ALIGN_POW2_LINE, HardwareSpec, LookupKernel, format_key

FP16_QPARAMS = 4  # embq's row-wise rows end in an fp16 scale and an fp16 bias


def round_up(value: int, multiple: int) -> int:
    return -(-int(value) // int(multiple)) * int(multiple)


def params_bytes(fmt: str | FormatConfig, dim: int) -> int:
    """Bytes of a table's table-level params, known before fitting: cb4-shared's float32
    codebook [16] and moments [2] (72 B), PQ's float32 centroids [M, 2^bits, dim / M]."""
    config = parse_format(fmt)
    if config.kind == "shared-codebook":
        return (16 + 2) * 4
    if config.kind == "pq":
        return (1 << config.bits) * int(dim) * 4  # type: ignore[attr-defined]
    return 0


def unpadded_row_bytes(spec: HardwareSpec, fmt: str | FormatConfig, dim: int) -> int:
    """Bytes of one encoded row before padding: embq's row with the target's qparams size."""
    config = parse_format(fmt)
    nbytes = get_format(config).bytes_per_row(dim)  # FormatError for a dim that does not pack
    if config.kind == "rowwise":
        nbytes += spec.qparams_bytes - FP16_QPARAMS
    return int(nbytes)


def row_alignment(spec: HardwareSpec, kernel: LookupKernel, row_bytes: int) -> int:
    """What `kernel` rounds a row of `row_bytes` up to (pow2-line: the smallest power of two
    holding a row of at most one cache line, else 1)."""
    if kernel.row_alignment != ROW_ALIGN_POW2_LINE:
        return int(kernel.row_alignment)
    if row_bytes > spec.cache_line:
        return 1
    return 1 << (int(row_bytes) - 1).bit_length()


def padded_row_bytes(spec: HardwareSpec, kernel: LookupKernel, fmt: str | FormatConfig,
                     dim: int) -> int:  # fmt: skip
    """Bytes one row takes in `kernel`'s memory."""
    row = unpadded_row_bytes(spec, fmt, dim)
    return round_up(row, row_alignment(spec, kernel, row))


def table_bytes(spec: HardwareSpec, kernel: LookupKernel, fmt: str | FormatConfig, rows: int,
                dim: int) -> int:  # fmt: skip
    """Bytes a table of `rows` x `dim` takes on the target under `kernel`: padded rows, the
    whole rounded up to the kernel's table alignment, plus codebook / PQ params."""
    rows_bytes = int(rows) * padded_row_bytes(spec, kernel, fmt, dim)
    return round_up(rows_bytes, kernel.table_alignment) + params_bytes(fmt, dim)


@dataclass(frozen=True)
class TableChoice:
    """One way to store and serve one table.

    Attributes:
        format: the format name (`embq.embedding.configs`).
        kernel: the spec's lookup kernel.
        runtime: embq's runtime kernel choice for it (None where embq cannot run the target).
        tier: the memory tier it lives in.
        row_bytes: a row's bytes after padding.
        bytes: the table's bytes on the target.
        group: the lookup call it joins: tables of kernels that serve the same way with the same
            row alignment share one call (one fbgemm TBE).
    """

    format: str
    kernel: str
    runtime: str | None
    tier: str
    row_bytes: int
    bytes: int
    group: str

    @property
    def label(self) -> str:
        return f"{self.format}@{self.kernel}"


def table_choices(spec: HardwareSpec, rows: int, dim: int,
                  formats: list[str | FormatConfig]) -> list[TableChoice]:  # fmt: skip
    """Every (format, kernel) a table of `rows` x `dim` can take on the target, among `formats`:
    formats the spec serves, that store rows of `dim`, that can be fitted on `rows` rows (PQ
    needs a row per centroid) and whose padded row the kernel accepts (`max_row_bytes`)."""
    out = []
    for fmt in formats:
        config = parse_format(fmt)
        codec = get_format(config)
        try:
            codec.check_dim(dim)
        except FormatError:
            continue
        if rows < codec.min_fit_rows():
            continue
        for kernel in spec.kernels_for(config):
            row = unpadded_row_bytes(spec, config, dim)
            align = row_alignment(spec, kernel, row)
            padded = round_up(row, align)
            limit = kernel.max_row_bytes.get(format_key(config))
            if limit is not None and padded > limit:
                continue
            out.append(TableChoice(
                format=str(config), kernel=kernel.name, runtime=kernel.runtime,
                tier=kernel.memory, row_bytes=padded,
                bytes=table_bytes(spec, kernel, config, rows, dim),
                group=f"{kernel.serves}/{align}",
            ))  # fmt: skip
    return out


def fp32_bytes(rows: int, dim: int) -> int:
    """A table's fp32 bytes: what every bytes ratio is relative to."""
    return int(rows) * int(dim) * 4
