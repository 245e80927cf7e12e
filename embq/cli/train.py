"""`embq train`: train the baseline DLRM on a prepared dataset (or MovieLens-100k).

Examples:
    embq train --data datasets/prepared/synth --output runs/demo/model
    embq train --dataset movielens-100k --output runs/movielens/model
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from embq.cli.data import MOVIELENS
from embq.errors import EmbqError

PREPARED_ROOT = Path("datasets/prepared")


def _train_settings(args: argparse.Namespace):
    from embq.models.train import TrainSettings

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


def run(args: argparse.Namespace) -> None:
    from embq.data.prepared import PreparedData
    from embq.models.dlrm import save_model
    from embq.models.train import train_dlrm

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


def add_parser(verbs: argparse._SubParsersAction) -> None:
    """Register `train`."""
    train = verbs.add_parser("train", help="train the baseline DLRM", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
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
    train.set_defaults(func=run)
