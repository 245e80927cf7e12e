"""The runtime's lookup-kernel choices and what each means for a table: which kernel serves it,
how its rows are padded, how many bytes it holds in memory.

Torch-free, so that command-line parsers and the hardware planner can use it without loading
torch.

Choices ("auto" is the default):
    auto      every row-wise table in fbgemm's TBE, rows of at most a cache line padded to a power
              of two (fastest lookups)
    compact   4-bit / 2-bit row-wise tables read in place from the memory-mapped artifact by
              ATen's n-bit ops (least memory), the others in the TBE unpadded
    tbe       every row-wise table in the TBE with unpadded rows (fbgemm's CPU default)

Codebook and PQ tables are served by `embq.runtime.codebook_bag` under every choice.

A choice can also be made per table (`resolve_kernels`): a plan from `embq plan` names one for
each table, and an artifact written from such a plan records them (manifest `kernel_choice`),
so that loading it without a `kernel` argument serves each table as the plan chose.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

from embq.embedding.registry import get_format
from embq.errors import ConfigError

KERNEL_CHOICES = ("auto", "compact", "tbe")


def add_kernel_argument(parser: argparse.ArgumentParser) -> None:
    """Add --kernel {auto,compact,tbe} to a command-line parser (default None: the choices the
    artifact records, else auto)."""
    parser.add_argument(
        "--kernel",
        choices=KERNEL_CHOICES,
        default=None,
        help="lookup kernels: auto (fastest; rows of at most 64 bytes padded to a power of two), "
        "compact (least memory: 4-/2-bit rows read in place from the memory-mapped artifact) or "
        "tbe (fbgemm's TBE, unpadded rows); default: the choices the artifact records (an "
        "artifact quantized from an `embq plan` plan), else auto",
    )


# Lookup kernels, as named in `inference_metadata` ("kernel" of each table).
KERNEL_TBE = "fbgemm-tbe"  # fbgemm IntNBitTableBatchedEmbeddingBagsCodegen
KERNEL_NBIT = "aten-nbit"  # ATen quantized::embedding_bag_{4,2}bit_rowwise_offsets
KERNEL_CODEBOOK = "codebook-bag"  # embq.runtime.codebook_bag
CACHE_LINE = 64  # bytes: x86-64 and most ARM server cores
TBE_ROW_ALIGNMENT = 1  # fbgemm's default for the CPU TBE: rows unpadded


def check_kernel_choice(kernel: str) -> str:
    """`kernel` if it is one of KERNEL_CHOICES, else ConfigError."""
    if kernel not in KERNEL_CHOICES:
        raise ConfigError(f"kernel must be one of {KERNEL_CHOICES}, got {kernel!r}")
    return kernel


def resolve_kernels(
    table_names: Sequence[str],
    kernel: str | Mapping[str, str] | None = None,
    recorded: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The kernel choice of each table.

    Args:
        table_names: the tables, in order.
        kernel: one choice for every table; or {table or "*": choice} (a table it does not name
            takes "*", else its recorded choice, else "auto"); or None: each table's recorded
            choice, else "auto".
        recorded: {table: choice} an artifact records (manifest `kernel_choice`).

    Raises:
        ConfigError: an unknown choice, or a mapping naming a table that is not there.
    """
    recorded = dict(recorded or {})
    if isinstance(kernel, str):
        return {name: check_kernel_choice(kernel) for name in table_names}
    if kernel is not None and not isinstance(kernel, Mapping):
        raise ConfigError(f"kernel must be one of {KERNEL_CHOICES}, a {{table: choice}} mapping "
                          f"or None, got {kernel!r}")  # fmt: skip
    chosen = dict(kernel or {})
    unknown = sorted(set(chosen) - set(table_names) - {"*"})
    if unknown:
        raise ConfigError(f"kernel choices name tables {unknown} that are not among "
                          f"{list(table_names)}")  # fmt: skip
    out = {}
    for name in table_names:
        choice = chosen.get(name, chosen.get("*", recorded.get(name, "auto")))
        out[name] = check_kernel_choice(choice)
    return out


def table_kernel(format_name: str, kernel: str = "auto") -> str:
    """The lookup kernel (KERNEL_NBIT, KERNEL_TBE or KERNEL_CODEBOOK) that serves a table of
    `format_name` under the `kernel` choice."""
    check_kernel_choice(kernel)
    fmt = get_format(format_name)
    if fmt.sparse_type is None:
        return KERNEL_CODEBOOK
    if kernel == "compact" and fmt.sparse_type in ("INT4", "INT2") and fmt.bits in (4, 2):
        return KERNEL_NBIT
    return KERNEL_TBE


def tbe_row_alignment(row_bytes: int, kernel: str = "auto") -> int:
    """The TBE `row_alignment` for rows of `row_bytes` (codes + qparams) under `kernel`: with
    "auto", the smallest power of two holding a row of at most one cache line, so that every
    row lies inside one line (the TBE's rows start at multiples of their padded size, in a
    64-byte aligned buffer); otherwise, and for rows longer than a line, fbgemm's CPU default
    (unpadded rows)."""
    check_kernel_choice(kernel)
    if kernel != "auto" or row_bytes > CACHE_LINE:
        return TBE_ROW_ALIGNMENT
    alignment = 1
    while alignment < row_bytes:
        alignment *= 2
    return alignment


def table_memory_bytes(
    format_name: str, rows: int, file_bytes: int, bytes_per_row: int, kernel: str = "auto"
) -> int:
    """Bytes a loaded table holds in memory: the TBE's padded rows (TBE tables are copied), or
    the table file's size for kernels that read the memory-mapped file in place."""
    if table_kernel(format_name, kernel) != KERNEL_TBE:
        return int(file_bytes)
    alignment = tbe_row_alignment(bytes_per_row, kernel)
    return int(rows) * (-(-int(bytes_per_row) // alignment) * alignment)

