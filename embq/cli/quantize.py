"""`embq quantize`: a trained DLRM -> an artifact that `embq.runtime` serves.

Examples:
    embq quantize --model runs/demo/model --plan int4-greedy --output runs/demo/int4g.embq
    embq quantize --model runs/demo/model --plan plan.json --output runs/demo/mixed.embq
    embq quantize --model runs/demo/model --plan int4-greedy --dense brecq:w4a8 \
        --data runs/demo/prepared --output runs/demo/int4g-brecq.embq

From a sharded torch.distributed.checkpoint (DCP) directory, e.g. one a DistributedModelParallel
wrote, in bounded memory, on one process or split over torchrun ranks (gloo; a filesystem all
ranks see; a killed job resumes when rerun):
    embq quantize --checkpoint ckpt/ --config config.json --plan int4 --output model.embq
    torchrun --nproc-per-node 2 -m embq quantize --checkpoint ckpt/ --config config.json \
        --plan int4 --output model.embq

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


def _run_checkpoint(args: argparse.Namespace) -> None:
    """--checkpoint: quantize a DCP checkpoint (under torchrun: split over the ranks)."""
    from embq.artifact.reader import load_artifact
    from embq.checkpoint.quantize import quantize_checkpoint

    if args.config is None:
        raise ConfigError("--checkpoint needs --config config.json (the model's DLRMConfig)")
    if args.dense or args.data:
        raise ConfigError("with --checkpoint the dense towers stay fp32 (--dense/--data do not "
                          "apply); run `embq quantize-dense` on the artifact afterwards")
    plan = read_plan(args.plan).with_sampling(args.sample_rows, args.seed or None)
    start = time.perf_counter()
    out = quantize_checkpoint(args.checkpoint, args.config, plan, args.output,
                              chunk_rows=args.chunk_rows, resume=not args.no_resume,
                              progress=not args.quiet)  # fmt: skip
    if int(os.environ.get("RANK", "0")) != 0:  # one summary line per job, from rank 0
        return
    artifact = load_artifact(out, verify=False)
    formats: dict[str, int] = {}
    for entry in artifact.tables.values():
        formats[entry.format] = formats.get(entry.format, 0) + 1
    print(json.dumps({"output": str(out), "tables": len(artifact.tables), "formats": formats,
                      "table_bytes": sum(e.bytes for e in artifact.tables.values()),
                      "ranks": int(os.environ.get("WORLD_SIZE", "1")),
                      "seconds": round(time.perf_counter() - start, 2)}))  # fmt: skip


def run(args: argparse.Namespace) -> None:
    """Handler: quantize, then print one JSON line summarising the artifact."""
    if args.checkpoint is not None:
        if args.model is not None:
            raise ConfigError("give --model (an embq model directory) or --checkpoint, not both")
        _run_checkpoint(args)
        return
    if args.model is None or args.config is not None:
        raise ConfigError("give --model DIR, or --checkpoint DCP_DIR with --config config.json")
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
    parser.add_argument("--model", help="model directory written by `embq train`")
    parser.add_argument("--checkpoint", help="a torch.distributed.checkpoint directory (DCP) "
                        "holding a TorchRec DLRM, e.g. saved from DistributedModelParallel")
    parser.add_argument("--config", help="with --checkpoint: the model's DLRMConfig JSON")
    parser.add_argument("--chunk-rows", type=int, default=65_536,
                        help="with --checkpoint: rows per chunk (memory ~ chunk-rows x dim x 12 B)")
    parser.add_argument("--no-resume", action="store_true",
                        help="with --checkpoint: discard an interrupted run and start over")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
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
