"""`embq quantize`: a trained DLRM -> an artifact that `embq.runtime` serves.

Examples:
    embq quantize --model runs/demo/model --plan int4-greedy --output runs/demo/int4g.embq
    embq quantize --model runs/demo/model --plan plan.json --output runs/demo/mixed.embq
    embq quantize --model runs/demo/model --plan int4-greedy --dense brecq:w4a8 \
        --data runs/demo/prepared --output runs/demo/int4g-brecq.embq

A plan (`embq.Plan`) is a format name for every table, a JSON string or file (plan.json) holding
{table: format} (a "*" entry is the default for the tables it does not name), or
{"tables": {table: format}, "dense": "brecq:w4a8"}.

The artifact holds one table per DLRM table (`t_<feature>`, serving [feature]), the DLRM's fp32
dense towers in dense.safetensors (meta {"kind": "fp32"}), and in the manifest's "model" the
DLRM config and each table's pooling: {"type": "dlrm", "config": ..., "pooling": {table: mode}}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from embq.errors import ConfigError
from embq.plan import Plan

DENSE_CALIB_BATCH = 1024  # rows per calibration batch; the dense methods use 4096 rows by default


def read_plan(text: str) -> Plan:
    """A plan from the command line: a .json file (plan.json), else a plan string."""
    return Plan.load(text) if text.endswith(".json") else Plan.parse(text)


def quantize_model_dir(
    model_dir: str | os.PathLike,
    plan: Any,
    output: str | os.PathLike,
    *,
    sample_rows: int | None = None,
    seed: int = 0,
    dense: str | None = None,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[Path, list]:
    """Load a saved DLRM, quantize it as `plan` says (`embq.quantize`), write the artifact.

    `dense` ("METHOD:wXaY", e.g. "brecq:w4a8") sets the plan's dense towers; they are calibrated
    on the training rows of the prepared dataset `data_dir`, shuffled with `seed`. `sample_rows`
    and a non-zero `seed` set the row sample of codebook formats.

    Returns:
        (artifact path, the encoded tables with their stats).
    """
    from embq.api import quantize, save
    from embq.models.dlrm import load_model

    if Path(output).exists():
        raise ConfigError(f"{output} already exists; choose a new --output or remove it first")
    plan = Plan.parse(plan).with_sampling(sample_rows, seed or None)
    if dense is not None:
        plan = plan.with_dense(dense)
    model, _ = load_model(model_dir)
    calib = None
    if plan.dense is not None:
        if data_dir is None:
            raise ConfigError("quantizing the dense towers needs calibration data: give --data DIR")
        from embq.data.prepared import PreparedData

        data = PreparedData(data_dir)
        (start, stop), _ = data.split(0.1)
        calib = data.batches(start, stop, batch_size=DENSE_CALIB_BATCH, shuffle=True, seed=seed)
        if seed:
            plan = plan.with_dense(replace(plan.dense, options=(*plan.dense.options, ("seed", seed))))
    qmodel = quantize(model, plan, calib=calib, progress=progress)
    return save(qmodel, output), qmodel.tables


def run(args: argparse.Namespace) -> None:
    """Handler: quantize, then print one JSON line summarising the artifact."""
    start = time.perf_counter()
    out, tables = quantize_model_dir(
        args.model, read_plan(args.plan), args.output, sample_rows=args.sample_rows,
        seed=args.seed, dense=args.dense, data_dir=args.data,
    )  # fmt: skip
    nbytes = sum(t.stats["bytes"] for t in tables)
    fp32 = sum(t.stats["fp32_bytes"] for t in tables)
    formats: dict[str, int] = {}
    for t in tables:
        formats[t.format] = formats.get(t.format, 0) + 1
    print(
        json.dumps(
            {
                "output": str(out),
                "tables": len(tables),
                "formats": formats,
                "table_bytes": nbytes,
                "fp32_bytes": fp32,
                "size_ratio": round(nbytes / fp32, 5),
                "seconds": round(time.perf_counter() - start, 2),
            }
        )
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the `quantize` subcommand (handler in `args.func`)."""
    parser = subparsers.add_parser(
        "quantize",
        help="quantize a trained DLRM's embedding tables into an artifact",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="model directory written by `embq train`")
    parser.add_argument(
        "--plan",
        required=True,
        help="a format name (int4-greedy, int8, cb4-shared, pq8x8, ...) or a plan.json",
    )
    parser.add_argument("--output", required=True, help="artifact directory to create (X.embq)")
    parser.add_argument(
        "--sample-rows",
        type=int,
        default=None,
        help="rows sampled per table to fit codebook formats (default 65536)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--dense", help="also quantize the MLP towers: METHOD:wXaY, e.g. brecq:w4a8 "
                        "(methods: rtn, lapq, brecq, multipoint, sparq)")
    parser.add_argument("--data", help="prepared dataset for dense calibration (with --dense)")
    parser.set_defaults(func=run)
