"""`embq report`: a size / quality report of artifacts against the fp32 model, on held-out rows.

Examples:
    embq report --model runs/demo/model --data runs/demo/prepared \\
        --artifact runs/demo/model.embq --output runs/demo/report
    embq report --model M --data D --artifact a.embq --artifact b.embq --plan-artifact p.embq \\
        --uniform int8,int4-opt,int2-opt --output report/

Writes report.json (numbers; keys in docs/report.md), report.md and report.html (one
self-contained page with the plots inline) into --output, and prints the path of the HTML.
"""

from __future__ import annotations

import argparse
import json


def _sensitivity(path: str | None) -> dict | None:
    if path is None:
        return None
    from embq.errors import ConfigError

    try:
        data = json.loads(open(path, encoding="utf-8").read())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read the sensitivity file {path}: {e}") from e
    tables = data.get("tables", data) if isinstance(data, dict) else None
    if not isinstance(tables, dict):
        raise ConfigError(f"{path} must hold {{table: {{format: loss increase}}}}")
    return tables


def run(args: argparse.Namespace) -> None:
    """Handler: build and write the report, then print where it is."""
    from embq.reports.api import report

    uniform = tuple(f for f in (args.uniform or "").split(",") if f)
    result = report(args.model, args.data, args.artifact or [], plans=args.plan_artifact or [],
                    output=args.output, sensitivity=_sensitivity(args.sensitivity),
                    uniform_formats=uniform, kernel=args.kernel, resamples=args.resamples,
                    progress=not args.quiet)  # fmt: skip
    print(json.dumps({"report": f"{args.output}/report.html", "artifacts": len(result["artifacts"]),
                      "seconds": result["seconds"]}))  # fmt: skip


def add_parser(verbs: argparse._SubParsersAction) -> None:
    """Register `report`."""
    from embq.runtime.kernel_choice import add_kernel_argument

    p = verbs.add_parser("report", help="size / quality report of artifacts vs fp32 (JSON, MD, HTML)",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", required=True, help="the fp32 model directory (embq train output)")
    p.add_argument("--data", required=True, help="its prepared dataset (held-out = last 10%%)")
    p.add_argument("--artifact", action="append", help="an artifact to report on (repeatable)")
    p.add_argument("--plan-artifact", action="append",
                   help="an artifact written from a plan, highlighted in the plots (repeatable)")
    p.add_argument("--sensitivity", help="JSON {table: {format: loss increase}} to show per table")
    p.add_argument("--uniform", default="int8,int4,int4-opt,int2-opt",
                   help="formats to quantize every table in, for the Pareto plot ('' for none)")
    p.add_argument("--output", required=True, help="directory for report.json / .md / .html")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    add_kernel_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
