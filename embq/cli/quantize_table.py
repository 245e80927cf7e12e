"""`embq quantize-table`: quantize one table file larger than RAM into an artifact.

Examples:
    embq quantize-table --input emb.npy --format int4 --output emb.embq
    embq quantize-table --input model.safetensors --tensor t_cat_0.weight --format int8 \\
        --output t_cat_0.embq --chunk-rows 131072
    torchrun --nproc_per_node 4 -m embq quantize-table --distributed --input emb.npy --format int4 \\
        --output emb.embq

An interrupted run resumes when rerun with the same arguments; --no-resume starts over.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from embq.embedding.configs import DEFAULT_SAMPLE_ROWS
from embq.embedding.stream import DEFAULT_CHUNK_ROWS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The quantize-table options."""
    parser.add_argument("--input", required=True,
                        help="table file: .npy, .safetensors or torch.save (.pt/.pth/.bin)")
    parser.add_argument("--tensor", help="tensor name, for files holding several")
    parser.add_argument("--format", required=True, help="embq format name, e.g. int4, int8")
    parser.add_argument("--output", required=True, help="artifact directory to create (X.embq)")
    parser.add_argument("--name",
                        help="table name in the artifact (default: tensor name or file stem)")
    parser.add_argument("--feature-name", action="append", dest="feature_names", default=None,
                        help="a sparse feature the table serves (repeatable)")
    parser.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS,
                        help="rows per chunk; memory is about chunk-rows x dim x 12 bytes")
    parser.add_argument("--sample-rows", type=int, default=None,
                        help=f"rows sampled to fit codebook formats (default {DEFAULT_SAMPLE_ROWS})")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default 0)")
    parser.add_argument("--no-resume", action="store_true",
                        help="discard an interrupted run's partial output and start over")
    parser.add_argument("--distributed", action="store_true",
                        help="split rows over the ranks of a torchrun job (gloo)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")  # fmt: skip


def run(args: argparse.Namespace) -> None:
    """Handler: quantize, then print one JSON line describing the artifact."""
    from embq.embedding.stream import quantize_table, quantize_table_distributed

    kwargs = dict(tensor=args.tensor, name=args.name, feature_names=args.feature_names,
                  chunk_rows=args.chunk_rows, resume=not args.no_resume,
                  sample_rows=args.sample_rows, seed=args.seed,
                  progress=not args.quiet)  # fmt: skip
    start = time.perf_counter()
    if args.distributed:
        out = quantize_table_distributed(args.input, args.format, args.output, **kwargs)
        if int(os.environ.get("RANK", "0")) != 0:  # one summary line per job, from rank 0
            return
    else:
        out = quantize_table(args.input, args.format, args.output, **kwargs)
    from embq.artifact.reader import load_artifact

    artifact = load_artifact(out, verify=False)
    entry = next(iter(artifact.tables.values()))
    print(json.dumps({"output": str(out), "table": entry.name, "rows": entry.rows, "dim": entry.dim,
                      "format": entry.format, "bytes": entry.bytes,
                      "seconds": round(time.perf_counter() - start, 3)}))  # fmt: skip


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the `quantize-table` subcommand (handler in `args.func`)."""
    parser = subparsers.add_parser(
        "quantize-table", help="quantize one table file larger than RAM, resumably",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
