"""Encoding a model's tables in memory: each table in the format the plan gives it, in row
chunks, with its size and error measured over every row.

`encode_tables(find_tables(model), plan)` returns `QuantizedTable`s, what the artifact stores and
the runtime loads. Tables larger than RAM go through `embq.embedding.stream` instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from embq.artifact.schema import QuantizedTable
from embq.embedding.configs import DEFAULT_SAMPLE_ROWS, FormatConfig, parse_format
from embq.embedding.registry import get_format
from embq.errors import ConfigError, FormatError
from embq.models.tables import TableInfo
from embq.plan import DEFAULT_KEY, Plan

CHUNK_ROWS = 65_536  # rows encoded / measured at a time: bounds the float32 copies we make
SMALL_TABLE_FALLBACK = "fp16"


def resolve_plan(tables: list[TableInfo], plan: Any) -> dict[str, FormatConfig]:
    """{table name: format config} for every table, checked.

    Args:
        tables: the model's tables (`embq.models.tables.find_tables`).
        plan: a `Plan` or anything `Plan.parse` reads (a format name, {table: format} with "*"
            as the default, ...). A plan without table entries keeps every table fp32. A table
            given the default whose format needs more rows to fit than the table has
            (`TableFormat.min_fit_rows`) is kept as fp16 (SMALL_TABLE_FALLBACK); a table named
            explicitly gets its format or an error.

    Raises:
        ConfigError: a table the model does not have, a table the plan leaves out (with no "*"),
            or a format name embq does not know; the message lists the valid choices.
        FormatError: a format that cannot store a table of that dim (e.g. int4 at dim 6).
    """
    formats = Plan.parse(plan).table_formats or {DEFAULT_KEY: Plan.uniform("fp32").tables[0][1]}
    names = [t.name for t in tables]
    unknown = sorted(k for k in formats if k != DEFAULT_KEY and k not in names)
    if unknown:
        raise ConfigError(
            f"the plan names tables {unknown} that the model does not have; its tables are {names}"
        )
    missing = [n for n in names if n not in formats and DEFAULT_KEY not in formats]
    if missing:
        raise ConfigError(
            f"the plan gives no format for tables {missing}; name them or add a "
            f"{DEFAULT_KEY!r} default"
        )
    resolved = {t.name: formats.get(t.name, formats.get(DEFAULT_KEY)) for t in tables}
    for table in tables:
        fmt = get_format(resolved[table.name])
        if table.rows < fmt.min_fit_rows() and table.name not in formats:
            # A default format that must learn more centroids than the table has rows (PQ with
            # 256 centroids on a 4-row table): such a table is a few KB, so it stays fp16.
            resolved[table.name] = Plan.uniform(SMALL_TABLE_FALLBACK).tables[0][1]
            continue
        try:
            fmt.check_dim(table.dim)
        except FormatError as e:
            raise FormatError(f"table {table.name!r} (dim {table.dim}): {e}") from e
    return resolved


def _chunks(rows: int, chunk_rows: int = CHUNK_ROWS):
    for start in range(0, rows, chunk_rows):
        yield start, min(start + chunk_rows, rows)


def _float_rows(weight: torch.Tensor, start: int, stop: int) -> np.ndarray:
    """Rows start..stop-1 of a table as a float32 numpy array [stop - start, dim]."""
    return weight[start:stop].detach().to(torch.float32).cpu().numpy()


def table_stats(
    weight: torch.Tensor, format_name: str, codes: np.ndarray, params: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Size and error of an encoded table, measured over every row.

    Returns:
        {"bytes": encoded rows + table-level params (bytes, no alignment padding),
         "fp32_bytes": rows * dim * 4, "size_ratio": bytes / fp32_bytes,
         "relative_mse": sum((W - decode(codes))^2) / sum(W^2) (float64),
         "rmse": root mean squared error per value, in table units}
    """
    fmt = get_format(format_name)
    rows, dim = int(weight.shape[0]), int(weight.shape[1])
    sse = energy = 0.0
    for start, stop in _chunks(rows):
        w = _float_rows(weight, start, stop).astype(np.float64)
        err = fmt.decode(codes[start:stop], params, dim).astype(np.float64) - w
        sse += float(np.sum(err * err))
        energy += float(np.sum(w * w))
    nbytes = int(codes.nbytes) + int(fmt.params_bytes(dim, params))
    fp32 = rows * dim * 4
    return {
        "bytes": nbytes,
        "fp32_bytes": fp32,
        "size_ratio": nbytes / fp32,
        "relative_mse": sse / energy if energy > 0 else 0.0,
        "rmse": float(np.sqrt(sse / (rows * dim))),
    }


def fit_params(
    table: TableInfo, fmt: Any, *, sample_rows: int | None = None, seed: int | None = None
) -> dict[str, np.ndarray]:
    """The table-level params of `fmt` for `table` (codebooks, PQ centroids; {} for row-wise
    formats), fitted on a seeded row sample exactly as `encode_table` fits them.

    Args: see `encode_table`.
    """
    config = parse_format(fmt)
    if sample_rows is None:
        sample_rows = getattr(config, "sample_rows", DEFAULT_SAMPLE_ROWS)
    if seed is None:
        seed = getattr(config, "seed", 0)
    codec = get_format(config)
    try:
        codec.check_dim(table.dim)
        n = min(int(sample_rows), table.rows)
        idx = np.sort(np.random.default_rng(seed).choice(table.rows, size=n, replace=False))
        sample = table.weight[torch.from_numpy(idx)].detach().to(torch.float32).numpy()
        return codec.fit(sample)
    except FormatError as e:
        raise FormatError(f"table {table.name!r} as {config}: {e}") from e


def encode_table(
    table: TableInfo,
    fmt: Any,
    *,
    sample_rows: int | None = None,
    seed: int | None = None,
    params: dict[str, np.ndarray] | None = None,
) -> QuantizedTable:
    """Encode one table: fit table-level params on a seeded row sample, encode in row chunks.

    Args:
        table: the float table.
        fmt: a format name or config (`embq.embedding.configs`).
        sample_rows: rows drawn (without replacement, seeded) to fit codebooks (default: the
            config's, 65536); row-wise formats fit nothing.
        seed: the sampling seed (default: the config's, 0).
        params: params `fit_params` already fitted for this table and format (skips fitting).
    """
    config = parse_format(fmt)
    name = str(config)
    codec = get_format(config)
    if params is None:
        params = fit_params(table, config, sample_rows=sample_rows, seed=seed)
    try:
        codes = np.empty((table.rows, codec.bytes_per_row(table.dim)), dtype=np.uint8)
        for start, stop in _chunks(table.rows):
            codes[start:stop] = codec.encode(_float_rows(table.weight, start, stop), params)
    except FormatError as e:
        raise FormatError(f"table {table.name!r} as {name}: {e}") from e
    return QuantizedTable(
        name=table.name,
        rows=table.rows,
        dim=table.dim,
        feature_names=list(table.feature_names),
        pooling=table.pooling,
        format=name,
        codes=codes,
        params=params,
        stats=table_stats(table.weight, name, codes, params),
    )


def encode_tables(
    tables: list[TableInfo],
    plan: Any,
    *,
    sample_rows: int | None = None,
    seed: int | None = None,
    progress: bool = False,
) -> list[QuantizedTable]:
    """Encode every table as the plan says (see `resolve_plan`), in table order; `progress`
    shows a bar over the tables (on a terminal)."""
    from embq.progress import progress_bar

    resolved = resolve_plan(tables, plan)
    bar = progress_bar(tables, enabled=progress and len(tables) > 1, desc="tables", unit="table")
    return [encode_table(t, resolved[t.name], sample_rows=sample_rows, seed=seed) for t in bar]
