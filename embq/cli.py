"""The `embq` command line: one small handler per verb, each a thin layer over library calls.

Examples:
    embq data synth --rows 500000 --seed 0 --output runs/synth.tsv
    embq data prepare --input runs/synth.tsv --output datasets/prepared/synth
    embq data prepare --dataset movielens-100k --output datasets/prepared/movielens-100k
    embq train --data datasets/prepared/synth --output runs/demo/model
    embq train --dataset movielens-100k --output runs/movielens/model
    embq evaluate --model runs/demo/model --data datasets/prepared/synth
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from embq.errors import EmbqError

MOVIELENS = "movielens-100k"
PREPARED_ROOT = Path("datasets/prepared")


def _cmd_synth(args: argparse.Namespace) -> None:
    from embq.data.synth import write_synthetic

    path = write_synthetic(args.output, rows=args.rows, seed=args.seed, progress=not args.quiet)
    print(json.dumps({"output": str(path), "rows": args.rows, "seed": args.seed}))


def _cmd_prepare(args: argparse.Namespace) -> None:
    if args.dataset == MOVIELENS:
        from embq.data.movielens import prepare_movielens

        summary = prepare_movielens(args.output, seed=args.seed)
    elif args.dataset is not None:
        raise EmbqError(f"Unknown --dataset {args.dataset!r}; known: {MOVIELENS}.")
    elif not args.input:
        raise EmbqError("Give raw Criteo-format files with --input, or --dataset movielens-100k.")
    else:
        from embq.data.preprocess import prepare_criteo

        summary = prepare_criteo(args.input, args.output, table_size=args.table_size,
                                 mode=args.mode, min_frequency=args.min_frequency,
                                 strict=args.strict, progress=not args.quiet,
                                 dataset_name=args.name)
    shown = {k: summary[k] for k in ("dataset", "rows_read", "rows_refused", "click_rate")}
    print(json.dumps({"output": str(args.output), **shown}))


def _train_settings(args: argparse.Namespace):
    from embq.train import TrainSettings

    defaults = TrainSettings()
    return TrainSettings(
        embedding_dim=args.embedding_dim,
        epochs=args.epochs if args.epochs is not None else (3 if args.dataset == MOVIELENS else 1),
        batch_size=args.batch_size if args.batch_size else (256 if args.dataset == MOVIELENS else 512),
        lr=args.lr or defaults.lr,
        embedding_lr=args.embedding_lr or defaults.embedding_lr,
        valid_fraction=args.valid_fraction,
        seed=args.seed,
    )


def _cmd_train(args: argparse.Namespace) -> None:
    from embq.data.prepared import PreparedData
    from embq.model import save_model
    from embq.train import train_dlrm

    data_dir = args.data
    if data_dir is None:
        if args.dataset != MOVIELENS:
            raise EmbqError("Give --data DIR (a prepared dataset) or --dataset movielens-100k.")
        data_dir = PREPARED_ROOT / MOVIELENS
        if not data_dir.exists():
            from embq.data.movielens import prepare_movielens

            prepare_movielens(data_dir)
    output = Path(args.output)
    if output.exists():
        raise EmbqError(f"{output} already exists; choose another --output or remove it first.")
    data = PreparedData(data_dir)
    model, config, metrics = train_dlrm(data, _train_settings(args), progress=not args.quiet)
    save_model(model, config, output)
    print(json.dumps({"dataset": data.name, "model": str(output), **metrics}))


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from embq.data.prepared import PreparedData
    from embq.metrics import evaluate
    from embq.model import load_model

    model, _ = load_model(args.model)
    data = PreparedData(args.data)
    _, (start, stop) = data.split(args.valid_fraction)
    print(json.dumps({"dataset": data.name, **evaluate(model, data.batches(start, stop, 4096))}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)

    data = verbs.add_parser("data", help="synthesize or prepare datasets").add_subparsers(
        dest="data_verb", required=True)
    synth = data.add_parser("synth", help="write synthetic rows in Criteo's raw TSV layout")
    synth.add_argument("--rows", type=int, required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--output", required=True)
    synth.add_argument("--quiet", action="store_true")
    synth.set_defaults(func=_cmd_synth)

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
    prep.add_argument("--quiet", action="store_true")
    prep.set_defaults(func=_cmd_prepare)

    train = verbs.add_parser("train", help="train the baseline DLRM")
    train.add_argument("--data", help="prepared dataset directory")
    train.add_argument("--dataset", choices=[MOVIELENS], help="train on a bundled real dataset")
    train.add_argument("--output", required=True, help="model directory to create")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--embedding-dim", type=int, default=16)
    train.add_argument("--lr", type=float)
    train.add_argument("--embedding-lr", type=float)
    train.add_argument("--valid-fraction", type=float, default=0.1)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--quiet", action="store_true")
    train.set_defaults(func=_cmd_train)

    ev = verbs.add_parser("evaluate", help="AUC, log loss, NE and calibration on held-out rows")
    ev.add_argument("--model", required=True)
    ev.add_argument("--data", required=True)
    ev.add_argument("--valid-fraction", type=float, default=0.1)
    ev.set_defaults(func=_cmd_evaluate)

    # Verbs whose handlers live in their own modules, imported only when the CLI is built.
    import importlib

    for name in _VERB_MODULES:
        importlib.import_module(name).add_parser(verbs)
    return parser


_VERB_MODULES = ["embq.cli_table", "embq.cli_quantize", "embq.cli_dense", "embq.cli_export"]


def main(argv: list[str] | None = None) -> int:
    # torch and faiss each bring an OpenMP runtime; busy-waiting idle threads of one starve the
    # other on small machines. Set before either library loads (the CLI is a process entry point).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except EmbqError as exc:
        print(f"embq: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
