"""Checks of the sparse input before any lookup kernel reads it (the kernels run with their own
bounds checks off): every id inside its table, with a message naming the feature, id and table.
"""

from __future__ import annotations

import torch


def first_feature_out_of_range(
    values: torch.Tensor, starts: list[int], feature_rows: list[int], min_rows: int
) -> int:
    """The first feature f whose ids values[starts[f] : starts[f + 1]] leave [0, feature_rows[f]),
    or -1: one min / max over every id when they all lie below `min_rows` (the smallest table),
    else a min / max per feature."""
    if values.numel() == 0:
        return -1
    low, high = torch.aminmax(values)
    if int(low) >= 0 and int(high) < min_rows:
        return -1
    for f in range(len(feature_rows)):
        if starts[f + 1] > starts[f]:
            low, high = torch.aminmax(values[starts[f] : starts[f + 1]])
            if int(low) < 0 or int(high) >= feature_rows[f]:
                return f
    return -1


def id_out_of_range_message(ids: torch.Tensor, rows: int, feature: str, table: str) -> str:
    """The message naming the first of one feature's `ids` outside [0, rows), or "" if none is."""
    bad = ((ids < 0) | (ids >= rows)).nonzero()
    if bad.numel() == 0:
        return ""
    message = "id {} of feature '{}' is outside its table's {} rows (table '{}')"
    return message.format(int(ids[int(bad[0, 0])]), feature, rows, table)

