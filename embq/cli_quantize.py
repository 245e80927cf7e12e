"""`embq quantize`: a trained DLRM -> an artifact that `embq.runtime` serves.

Examples:
    embq quantize --model runs/demo/model --plan int4-greedy --output runs/demo/int4g.embq
    embq quantize --model runs/demo/model --plan plan.json --output runs/demo/mixed.embq
    embq quantize --model runs/demo/model --plan int4-greedy --dense brecq:w4a8 \
        --data runs/demo/prepared --output runs/demo/int4g-brecq.embq

A plan is a format name for every table, or a JSON file holding {table: format} (a "*" entry is
the default for the tables it does not name), or {"tables": {table: format}}.

The artifact holds one table per DLRM table (`t_<feature>`, serving [feature]), the DLRM's fp32
dense towers in dense.safetensors (meta {"kind": "fp32"}), and in the manifest's "model" the
DLRM config and each table's pooling: {"type": "dlrm", "config": ..., "pooling": {table: mode}}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from embq.errors import ConfigError

DENSE_KIND_FP32 = "fp32"


def load_plan(text: str) -> str | dict[str, str]:
    """A plan from the command line: a .json file's {table: format}, else a format name."""
    if not text.endswith(".json"):
        return text
    path = Path(text)
    try:
        plan: Any = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read the plan file {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"the plan file {path} is not valid JSON: {e}") from e
    if isinstance(plan, dict) and isinstance(plan.get("tables"), dict):
        plan = plan["tables"]
    if not isinstance(plan, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in plan.items()
    ):
        raise ConfigError(f"{path} must hold a JSON object {{table name: format name}}")
    return plan


def write_artifact(output: str | os.PathLike, tables: list, config, dense: dict,
                   dense_meta: dict | None = None) -> Path:
    """Write encoded tables (`embq.torchrec.QuantizedTable`), the dense tensors (fp32 state dict
    unless `dense_meta` names another kind) and the DLRM config (`embq.model.DLRMConfig`) as an
    artifact, atomically. Returns its path."""
    from embq.artifact import ArtifactWriter

    with ArtifactWriter(output) as writer:
        for t in tables:
            writer.add_table(
                t.name,
                t.format,
                t.codes,
                t.dim,
                params=t.params,
                feature_names=t.feature_names,
                stats=t.stats,
            )
        writer.add_dense(dense, meta=dense_meta or {"kind": DENSE_KIND_FP32})
        writer.set_model(
            {
                "type": "dlrm",
                "config": config.to_json(),
                "pooling": {t.name: t.pooling for t in tables},
            }
        )
        return writer.publish()


def quantize_model_dir(
    model_dir: str | os.PathLike,
    plan: str | dict[str, str],
    output: str | os.PathLike,
    *,
    sample_rows: int | None = None,
    seed: int = 0,
    dense: str | None = None,
    data_dir: str | os.PathLike | None = None,
) -> tuple[Path, list]:
    """Load a saved DLRM, encode its tables as `plan` says, write the artifact.

    `dense` ("METHOD:wXaY", e.g. "brecq:w4a8") also quantizes the MLP towers with embq.dense,
    calibrated on the training rows of the prepared dataset `data_dir`.

    Returns:
        (artifact path, the encoded tables with their stats).
    """
    from embq.model import load_model
    from embq.torchrec import DEFAULT_SAMPLE_ROWS, dense_state_dict, find_tables, quantize_tables

    if Path(output).exists():
        raise ConfigError(f"{output} already exists; choose a new --output or remove it first")
    model, config = load_model(model_dir)
    tables = quantize_tables(
        find_tables(model),
        plan,
        seed=seed,
        sample_rows=DEFAULT_SAMPLE_ROWS if sample_rows is None else sample_rows,
    )
    if dense is None:
        return write_artifact(output, tables, config, dense_state_dict(model)), tables
    tensors, meta = quantize_dense_section(model, dense, data_dir, seed)
    return write_artifact(output, tables, config, tensors, meta), tables


def parse_dense_spec(spec: str) -> tuple[str, int, int]:
    """"brecq:w4a8" -> ("brecq", 4, 8)."""
    import re

    match = re.fullmatch(r"([a-z]+):w(\d+)a(\d+)", spec.strip().lower())
    if not match:
        raise ConfigError(f"--dense must look like METHOD:wXaY (e.g. brecq:w4a8), got {spec!r}")
    return match.group(1), int(match.group(2)), int(match.group(3))


def quantize_dense_section(model, spec: str, data_dir, seed: int) -> tuple[dict, dict]:
    """The artifact's dense section for towers quantized by `embq.dense` as `spec` says."""
    from embq.data.prepared import PreparedData
    from embq.dense import quantize
    from embq.dense.runtime_towers import dense_section

    if data_dir is None:
        raise ConfigError("quantizing the dense towers needs calibration data: give --data DIR")
    method, w_bits, a_bits = parse_dense_spec(spec)
    data = PreparedData(data_dir)
    (start, stop), _ = data.split(0.1)
    towers = quantize(model, method=method, w_bits=w_bits, a_bits=a_bits,
                      calib=data.batches(start, stop, batch_size=1024, shuffle=True, seed=seed),
                      seed=seed)
    return dense_section(towers)


def run(args: argparse.Namespace) -> None:
    """Handler: quantize, then print one JSON line summarising the artifact."""
    start = time.perf_counter()
    out, tables = quantize_model_dir(
        args.model, load_plan(args.plan), args.output, sample_rows=args.sample_rows, seed=args.seed,
        dense=args.dense, data_dir=args.data,
    )
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
