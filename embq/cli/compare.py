"""`embq compare`: two artifacts side by side on the same held-out rows.

Example:
    embq compare runs/demo/model.embq runs/demo/mixed.embq --data runs/demo/prepared \\
        --model runs/demo/model --output runs/demo/compare

B's change over A (log loss, AUC) with paired bootstrap intervals, and per table which one is
smaller and which is closer to fp32 (with --model, measured on the rows the data looks up).
Writes compare.json / .md / .html into --output and prints the headline as JSON.
"""

from __future__ import annotations

import argparse
import json


def run(args: argparse.Namespace) -> None:
    """Handler: compare, write, print B's change over A."""
    from embq.reports.api import compare

    result = compare(args.a, args.b, args.data, output=args.output, model_dir=args.model,
                     kernel=args.kernel, resamples=args.resamples)  # fmt: skip
    print(json.dumps({"a": result["a"]["name"], "b": result["b"]["name"], **result["b_vs_a"],
                      "output": args.output}))  # fmt: skip


def add_parser(verbs: argparse._SubParsersAction) -> None:
    """Register `compare`."""
    from embq.runtime.kernel_choice import add_kernel_argument

    p = verbs.add_parser("compare", help="compare two artifacts on held-out rows",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("a", help="the first artifact (the baseline)")
    p.add_argument("b", help="the second artifact")
    p.add_argument("--data", required=True, help="the prepared dataset (held-out = last 10%%)")
    p.add_argument("--model", help="the fp32 model, for per-table errors on looked-up rows")
    p.add_argument("--output", required=True, help="directory for compare.json / .md / .html")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    add_kernel_argument(p)
    p.set_defaults(func=run)
