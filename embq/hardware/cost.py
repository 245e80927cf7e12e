"""The latency model: what a batch of lookups (and a dense layer) costs on a target, from the
spec's coefficients (`embq hardware probe` fits them on the machine it runs on).

A batch's lookups are a few calls, one per group of tables served alike (`TableChoice.group`:
one fbgemm TBE per row alignment, one ATen n-bit collection, one codebook collection)::

    seconds = sum over calls   [call_us + (permute_us + permute_ns * ids in the batch)]
            + sum over tables  [table_us + ids * (id_ns + byte_ns * row bytes
                                                 + line_ns * cache lines per row * miss)
                                + out_ns * pooled values written (bags x dim)]
            + reorder_ns * output values        (more than one call)

The permute term is paid by each call that picks its features out of the batch (not by
`whole_input` kernels, nor by a call that serves every table); with more than one call the
pooled outputs are also put back in feature order (the reorder term, B x sum of dims values). `miss` is the share of a table's
rows that cannot stay in its share of the last-level cache (uniform ids:
1 - (cache_bytes / tables) / table bytes, at least 0); `cache lines per row` is 1 for rows
padded to a power of two within a line, else the expected lines an unaligned row touches.
"""

from __future__ import annotations

from collections.abc import Sequence

from embq.hardware.accounting import TableChoice
from embq.hardware.spec import ROW_ALIGN_POW2_LINE, DenseKernel, HardwareSpec, format_key


def lines_per_row(spec: HardwareSpec, choice: TableChoice) -> float:
    """Cache lines one row read touches (expected, rows at random offsets unless aligned)."""
    kernel = spec.lookup_kernels[choice.kernel]
    line = spec.cache_line
    if kernel.row_alignment == ROW_ALIGN_POW2_LINE and choice.row_bytes <= line:
        return 1.0
    return 1.0 + (choice.row_bytes - 1) / line


def miss_fraction(spec: HardwareSpec, table_bytes: int, tables: int) -> float:
    """Share of a table's row reads that go to memory: the rows beyond its cache share."""
    if table_bytes <= 0:
        return 0.0
    share = spec.cache_bytes / max(1, tables)
    return max(0.0, 1.0 - share / table_bytes)


def table_seconds(spec: HardwareSpec, choice: TableChoice, ids: float, tables: int,
                  out_values: float = 0.0) -> float:  # fmt: skip
    """The per-table part of a lookup call for `ids` ids of one table (of `tables` in all),
    writing `out_values` pooled floats."""
    kernel = spec.lookup_kernels[choice.kernel]
    c = kernel.costs[format_key(choice.format)]
    per_id = c.id_ns + c.byte_ns * choice.row_bytes
    per_id += kernel.line_ns * lines_per_row(spec, choice) * miss_fraction(spec, choice.bytes, tables)
    return (c.table_us * 1e3 + ids * per_id + kernel.out_ns * out_values) * 1e-9


def group_seconds(spec: HardwareSpec, choice: TableChoice, batch_ids: float, alone: bool) -> float:
    """One call of the group `choice` belongs to: its call overhead, plus the permute of the
    batch's `batch_ids` ids unless the kernel takes the whole input or the call is `alone`."""
    kernel = spec.lookup_kernels[choice.kernel]
    seconds = kernel.call_us * 1e-6
    if not alone and not kernel.whole_input:
        seconds += spec.permute_us * 1e-6 + spec.permute_ns * batch_ids * 1e-9
    return seconds


def reorder_seconds(spec: HardwareSpec, out_values: float) -> float:
    """Putting the calls' pooled outputs back in feature order: `out_values` floats."""
    return spec.reorder_ns * out_values * 1e-9


def lookup_seconds(spec: HardwareSpec, choices: Sequence[TableChoice], ids: Sequence[float],
                   outs: Sequence[float] | None = None) -> dict:  # fmt: skip
    """Predicted seconds of one batch's lookups: `choices[i]` serves table i, which looks up
    `ids[i]` ids in the batch and writes `outs[i]` pooled floats (bags x dim).

    Returns:
        {"seconds": total, "calls": {group: seconds of its call}, "tables": [seconds per table],
         "reorder": seconds}
    """
    tables = len(choices)
    batch_ids = float(sum(ids))
    first: dict[str, TableChoice] = {}
    for c in choices:
        first.setdefault(c.group, c)
    alone = len(first) == 1
    calls = {g: group_seconds(spec, c, batch_ids, alone) for g, c in first.items()}
    outs = list(outs) if outs is not None else [0.0] * len(choices)
    per_table = [table_seconds(spec, c, n, tables, o) for c, n, o in zip(choices, ids, outs)]
    reorder = 0.0 if alone else reorder_seconds(spec, sum(outs))
    return {"seconds": sum(calls.values()) + sum(per_table) + reorder, "calls": calls,
            "tables": per_table, "reorder": reorder}  # fmt: skip


def dense_seconds(kernel: DenseKernel, batch: int, in_features: int, out_features: int) -> float:
    """One dense layer of `in_features` -> `out_features` on a batch."""
    return kernel.layer_us * 1e-6 + kernel.mac_ns * 1e-9 * batch * in_features * out_features
