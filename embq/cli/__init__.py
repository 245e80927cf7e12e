"""The `embq` command line: one module per verb, each a thin layer over library calls.

Verbs: data (synth, prepare), train, evaluate, quantize, quantize-table, quantize-dense, export,
hardware (list, show, probe), plan, report, compare, seal.
Run `embq VERB --help` for a verb's options and examples.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from embq.errors import EmbqError

# Each module registers its verb with `add_parser(verbs)`; imported only when the CLI is built.
VERB_MODULES = [
    "embq.cli.data",
    "embq.cli.train",
    "embq.cli.evaluate",
    "embq.cli.quantize",
    "embq.cli.quantize_table",
    "embq.cli.quantize_dense",
    "embq.cli.export",
    "embq.cli.hardware",
    "embq.cli.plan",
    "embq.cli.report",
    "embq.cli.compare",
    "embq.cli.seal",
]


def build_parser() -> argparse.ArgumentParser:
    """The `embq` parser with every verb registered."""
    parser = argparse.ArgumentParser(prog="embq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    for name in VERB_MODULES:
        importlib.import_module(name).add_parser(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `embq ARGS`; an EmbqError prints one line and returns 2."""
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
