"""`embq seal`: record the digest of an artifact whose manifest was edited on purpose.

Examples:
    embq seal runs/demo/model.embq

Loading refuses an artifact whose manifest changed after it was written, and one written before
embq recorded digests. After checking the edit is what you want, `embq seal` checks the artifact
as loading does (every file against its sha256, the model built), then replaces manifest.json
atomically with the same content and its new digest. It prints one JSON line: the artifact, its
digest (pin it with `embq-serve --expect-digest`), the previous one and whether it changed.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def build_check(artifact: Any) -> None:
    """Build what `embq.load` would serve from the artifact (refusing what cannot load)."""
    from embq.runtime.bags import artifact_tables, build_embedding_bags, model_pooling
    from embq.runtime.load import built_from, load_inference_model

    if (artifact.model or {}).get("type") == "dlrm":
        load_inference_model(artifact)
    else:
        tables = artifact_tables(artifact, model_pooling(artifact))
        built_from(artifact, "the table lookups", build_embedding_bags, tables)


def run(args: argparse.Namespace) -> None:
    """Handler: seal, then print one JSON line."""
    from embq.artifact.seal import seal_artifact

    print(json.dumps(seal_artifact(args.artifact, check=build_check)))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the `seal` subcommand (handler in `args.func`)."""
    parser = subparsers.add_parser(
        "seal", help="record the digest of an artifact whose manifest was edited on purpose",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("artifact", help="artifact directory (X.embq)")
    parser.set_defaults(func=run)
