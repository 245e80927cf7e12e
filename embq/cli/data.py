"""`embq data`: synthesize Criteo-format rows, or prepare raw files (or MovieLens) as arrays.

Examples:
    embq data synth --rows 500000 --seed 0 --output runs/synth.tsv
    embq data prepare --input runs/synth.tsv --output datasets/prepared/synth
    embq data prepare --dataset movielens-100k --output datasets/prepared/movielens-100k
    torchrun --nproc-per-node 4 -m embq data prepare --mode frequency \\
        --input day_0.gz day_1.gz day_2.gz --output datasets/prepared/terabyte

Under torchrun (WORLD_SIZE > 1) the ranks split the input files, merge frequency counts over gloo
and write their rows of the same output, byte-identical to one process; all ranks must see the
inputs and the output's directory (a shared filesystem).
"""

from __future__ import annotations

import argparse
import json
import os

from embq.errors import EmbqError
from embq.ranks import launched_by_torchrun

MOVIELENS = "movielens-100k"


def run_synth(args: argparse.Namespace) -> None:
    from embq.data.synth import write_synthetic

    path = write_synthetic(args.output, rows=args.rows, seed=args.seed, progress=not args.quiet)
    print(json.dumps({"output": str(path), "rows": args.rows, "seed": args.seed}))


def run_prepare(args: argparse.Namespace) -> None:
    if args.dataset is not None and launched_by_torchrun():
        raise EmbqError(f"--dataset {args.dataset} is small: prepare it in one process, not under torchrun.")
    if args.dataset == MOVIELENS:
        from embq.data.movielens import prepare_movielens

        summary = prepare_movielens(args.output, seed=args.seed)
    elif args.dataset is not None:
        raise EmbqError(f"Unknown --dataset {args.dataset!r}; known: {MOVIELENS}.")
    elif not args.input:
        raise EmbqError("Give raw Criteo-format files with --input, or --dataset movielens-100k.")
    elif launched_by_torchrun():
        from embq.data.prepare_ranks import prepare_criteo_ranks

        summary = prepare_criteo_ranks(args.input, args.output, table_size=args.table_size,
                                       mode=args.mode, min_frequency=args.min_frequency,
                                       strict=args.strict, progress=not args.quiet,
                                       dataset_name=args.name, merge_values=args.merge_values)
        if int(os.environ.get("RANK", "0")) != 0:
            return
    else:
        from embq.data.preprocess import prepare_criteo

        summary = prepare_criteo(args.input, args.output, table_size=args.table_size,
                                 mode=args.mode, min_frequency=args.min_frequency,
                                 strict=args.strict, progress=not args.quiet,
                                 dataset_name=args.name)
    shown = {k: summary[k] for k in ("dataset", "rows_read", "rows_refused", "click_rate")}
    print(json.dumps({"output": str(args.output), **shown}))


def add_parser(verbs: argparse._SubParsersAction) -> None:
    """Register `data synth` and `data prepare`."""
    data = verbs.add_parser("data", help="synthesize or prepare datasets", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            ).add_subparsers(dest="data_verb", required=True)  # fmt: skip
    synth = data.add_parser("synth", help="write synthetic rows in Criteo's raw TSV layout")
    synth.add_argument("--rows", type=int, required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--output", required=True)
    synth.add_argument("--quiet", action="store_true")
    synth.set_defaults(func=run_synth)

    prep = data.add_parser("prepare", help="raw Criteo-format files (or MovieLens) -> arrays")
    prep.add_argument("--input", nargs="+", help="raw files, e.g. train.txt or day_0 day_1 ...")
    prep.add_argument("--dataset", choices=[MOVIELENS], help="prepare a bundled real dataset")
    prep.add_argument("--output", required=True)
    prep.add_argument("--mode", choices=["hash", "frequency"], default="hash")
    prep.add_argument("--table-size", type=int, default=100_000,
                      help="rows per table in hash mode (hash modulo this)")
    prep.add_argument("--min-frequency", type=int, default=2, help="frequency mode threshold")
    prep.add_argument("--strict", action="store_true", help="refuse the input at its first malformed line")
    prep.add_argument("--name", default="criteo", help="dataset name recorded in summary.json")
    prep.add_argument("--seed", type=int, default=0, help="MovieLens shuffle seed")
    prep.add_argument("--merge-values", type=int, default=1 << 22,
                      help="under torchrun: values per rank per round when merging frequency "
                           "counts (bounds message size and memory)")
    prep.add_argument("--quiet", action="store_true")
    prep.set_defaults(func=run_prepare)
