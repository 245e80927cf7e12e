"""Size / quality reports: what each table format costs in bytes and in click-model quality.

`quality_table` quantizes a trained DLRM's tables with each format (every table the same
format), evaluates the quantized model on the held-out split, and returns one row per format
next to the fp32 baseline; `format_markdown` prints those rows as a Markdown table.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

# Columns of a quality row, in the order they are printed.
COLUMNS = (
    "format",
    "bytes",
    "size_ratio",
    "relative_mse",
    "auc",
    "logloss",
    "logloss_delta_pct",
    "ne",
    "ne_delta_pct",
    "quantize_seconds",
)


def _energy(weight: torch.Tensor) -> float:
    """sum(W^2) of a table in float64, chunked so no full float64 copy is made."""
    total = 0.0
    for start in range(0, weight.shape[0], 65_536):
        chunk = weight[start : start + 65_536].detach().to(torch.float64)
        total += float((chunk * chunk).sum())
    return total


def quality_table(
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    formats: Iterable[str],
    *,
    valid_fraction: float = 0.1,
    batch_size: int = 4096,
    seed: int = 0,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Bytes and held-out quality of a DLRM with all its tables in each of `formats`.

    Args:
        model_dir: a model saved by `embq train` (embq.model.save_model).
        data_dir: the prepared dataset it was trained on; the held-out split is
            `PreparedData.split(valid_fraction)[1]`, the last rows.
        formats: embq format names, e.g. ["int8", "int4-greedy", "cb4-shared", "pq8x8"].
        batch_size: evaluation batch size (rows).
        seed: codebook sampling seed.
        on_row: called with each row as soon as it is measured (progress for long runs).

    Returns:
        One dict per format, the fp32 model first:
        {"format", "bytes" (all tables, incl. codebooks; bytes), "size_ratio" (vs fp32 tables),
         "relative_mse" (sum of squared errors / sum of squares over every table value),
         "auc", "logloss", "ne", "ne_delta_pct" (100 * (NE / NE_fp32 - 1); lower is better),
         "quantize_seconds"}.
    """
    from embq.data.prepared import PreparedData
    from embq.models.dlrm import load_model
    from embq.models.metrics import evaluate
    from embq.models.quantized import quantize_model
    from embq.models.tables import find_tables

    model, _ = load_model(model_dir)
    data = PreparedData(data_dir)
    _, (start, stop) = data.split(valid_fraction)

    def score(m: torch.nn.Module) -> dict[str, float]:
        return evaluate(m, data.batches(start, stop, batch_size=batch_size))

    tables = find_tables(model)
    fp32_bytes = sum(t.rows * t.dim * 4 for t in tables)
    energy = {t.name: _energy(t.weight) for t in tables}
    base = score(model)

    def row(name: str, nbytes: int, sse: float, metrics: dict, seconds: float) -> dict[str, Any]:
        out = {
            "format": name,
            "bytes": nbytes,
            "size_ratio": nbytes / fp32_bytes,
            "relative_mse": sse / max(sum(energy.values()), 1e-300),
            "auc": metrics["auc"],
            "logloss": metrics["logloss"],
            "ne": metrics["ne"],
            "ne_delta_pct": 100.0 * (metrics["ne"] / base["ne"] - 1.0),
            "logloss_delta_pct": 100.0 * (metrics["logloss"] / base["logloss"] - 1.0),
            "quantize_seconds": round(seconds, 2),
        }
        if on_row is not None:
            on_row(out)
        return out

    rows = [row("fp32", fp32_bytes, 0.0, base, 0.0)]
    for name in formats:
        began = time.perf_counter()
        result = quantize_model(model, name, seed=seed)
        seconds = time.perf_counter() - began
        stats = result.stats
        nbytes = sum(s["bytes"] for s in stats.values())
        sse = sum(s["relative_mse"] * energy[t] for t, s in stats.items())
        rows.append(row(name, nbytes, sse, score(result.model), seconds))
        del result  # one quantized copy of the tables at a time
    return rows


def format_markdown(rows: list[dict[str, Any]]) -> str:
    """A quality table (`quality_table` rows) as Markdown, one line per format."""
    digits = {
        "size_ratio": 4,
        "relative_mse": 6,
        "auc": 5,
        "logloss": 5,
        "ne": 5,
        "ne_delta_pct": 3,
        "logloss_delta_pct": 3,
    }
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = []
        for col in COLUMNS:
            value = row.get(col, "")
            if col in digits and isinstance(value, float):
                value = (
                    f"{value:.{digits[col]}g}"
                    if col == "relative_mse"
                    else f"{value:.{digits[col]}f}"
                )
            elif col == "bytes":
                value = f"{value:,}"
            cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
