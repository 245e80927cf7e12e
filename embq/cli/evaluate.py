"""`embq evaluate`: AUC, log loss, NE and calibration of a trained model on held-out rows.

Example:
    embq evaluate --model runs/movielens/model --data datasets/prepared/movielens-100k
"""

from __future__ import annotations

import argparse
import json


def run(args: argparse.Namespace) -> None:
    from embq.data.prepared import PreparedData
    from embq.models.dlrm import load_model
    from embq.models.metrics import evaluate

    model, _ = load_model(args.model)
    data = PreparedData(args.data)
    _, (start, stop) = data.split(args.valid_fraction)
    print(json.dumps({"dataset": data.name, **evaluate(model, data.batches(start, stop, 4096))}))


def add_parser(verbs: argparse._SubParsersAction) -> None:
    """Register `evaluate`."""
    ev = verbs.add_parser("evaluate", help="AUC, log loss, NE and calibration on held-out rows")
    ev.add_argument("--model", required=True)
    ev.add_argument("--data", required=True)
    ev.add_argument("--valid-fraction", type=float, default=0.1)
    ev.set_defaults(func=run)
