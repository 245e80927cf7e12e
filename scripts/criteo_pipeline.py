"""Criteo batch pipeline: prepare -> train -> plan -> quantize -> evaluate -> report.

    python scripts/criteo_pipeline.py --raw train.txt --workdir runs/kaggle
    python scripts/criteo_pipeline.py --raw day_0.gz day_1.gz --workdir runs/tb --config pipeline.json

Run it again and complete stages are skipped; a stage whose inputs or options changed (or that
was interrupted) is redone, and so is everything after it. The config file is described in
`embq.pipeline.criteo` (and the README). Prints a table of stages, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys

from embq.errors import EmbqError
from embq.pipeline.criteo import run_pipeline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", nargs="+", required=True, help="raw Criteo-format files, in order")
    parser.add_argument("--workdir", required=True, help="directory for every stage's output")
    parser.add_argument("--config", help="pipeline.json (sections prepare, train, plan, quantize, "
                        "evaluate, report)")
    args = parser.parse_args()
    try:
        results = run_pipeline(args.raw, args.workdir, args.config)
    except EmbqError as e:
        print(f"criteo_pipeline: error: {e}", file=sys.stderr)
        return 2
    print(f"{'stage':<10} {'status':<8} {'seconds':>9}  notes")
    for r in results:
        notes = r.record.get("notes", {})
        shown = notes.get("skipped") or ", ".join(f"{k}={v}" for k, v in notes.items()
                                                  if isinstance(v, (int, float, str)))[:90]
        print(f"{r.name:<10} {r.status:<8} {r.seconds:>9.1f}  {shown}")
    print(json.dumps({"workdir": args.workdir,
                      "stages": {r.name: {"status": r.status, "seconds": round(r.seconds, 2),
                                          "recorded_seconds": r.record.get("seconds")}
                                 for r in results}}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
