"""`embq plan`: the smallest model that keeps the log loss, on the hardware it is served on.

Measures each table's sensitivity to each candidate format on calibration rows, chooses one
format (and kernel) per table that minimises the predicted log-loss increase within the byte
budget (and latency budget) on the target, quantizes that plan and measures it on held-out rows
the calibration never saw. Writes plan.json (`embq quantize --plan plan.json`, `embq.Plan.load`)
and a report beside it (plan.report.json: per-table choices, predicted and measured bytes, log
loss and latency, and the sweep).

Examples:
    embq plan --model runs/demo/model --data runs/demo/prepared --hardware x86-fbgemm \\
        --max-bytes 0.15 --output plan.json
    embq plan ... --max-bytes 0.15 --max-latency-ms 0.6          # a latency budget too
    embq plan ... --hardware nvidia-fbgemm --max-bytes 0.27 --sweep 0.25,0.3,0.4
    embq plan ... --solver greedy                                # HAGO's greedy search
    embq plan ... --hardware accelerator --max-bytes 0.55 --dense  # and a kernel per dense layer
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _budget(text: str) -> float:
    value = float(text)
    return value if value <= 1 else int(value)


def report_path(output: Path) -> Path:
    return output.with_name(output.stem + ".report.json")


def run(args: argparse.Namespace) -> None:
    import torch

    from embq.data.prepared import PreparedData
    from embq.hardware.planner import Planner
    from embq.hardware.spec import load_spec
    from embq.hardware.sweep import dominance, exact_le_greedy, markdown, measure, run_sweep
    from embq.models.dlrm import load_model

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    output = Path(args.output)
    spec = load_spec(args.hardware)
    model, _ = load_model(args.model)
    formats = args.formats.split(",") if args.formats else None
    planner = Planner(model, PreparedData(args.data), spec, formats=formats,
                      calib_rows=args.calib_rows, calibration=args.calibration,
                      sensitivity=args.sensitivity, batch=args.batch, quick=args.quick,
                      cache_dir=args.cache or output.parent / ".embq-cache",
                      progress=not args.quiet, dense=args.dense)  # fmt: skip
    max_seconds = None if args.max_latency_ms is None else args.max_latency_ms / 1e3
    began = time.perf_counter()
    sens = planner.sensitivity()
    planned = planner.plan(_budget(args.max_bytes), args.solver, max_seconds)
    search_seconds = time.perf_counter() - began - sens.seconds
    planned.plan.save(output)
    report: dict = {"hardware": spec.name, "spec": spec.path, "model": args.model,
                    "budget": args.max_bytes, "max_latency_ms": args.max_latency_ms,
                    "solver": args.solver, "calibration_rows": list(planner.calib_range),
                    "heldout_rows": list(planner.heldout_range), "formats": planner.formats,
                    "sensitivity": {"method": sens.method, "seconds": sens.seconds,
                                    "cached": sens.cached, "base_loss": sens.base_loss,
                                    "proxy_rank_correlation": sens.rank_correlation()}}  # fmt: skip
    plans = [planned]
    sweep = None
    if args.sweep:
        sweep = run_sweep(planner, [_budget(b) for b in args.sweep.split(",")],
                          max_seconds=max_seconds)  # fmt: skip
    if not args.no_verify:
        planner.measure_loss(plans)
        runnable = all(c.runtime is not None for c in planned.choices)
        if runnable:
            planner.measure_latency(plans)
        if sweep is not None:
            measure(planner, sweep, latency=runnable)
    ids = planner.ids()
    report["tables"] = [
        {"name": t.name, "rows": t.rows, "dim": t.dim, "format": c.format, "kernel": c.kernel,
         "runtime_kernel": c.runtime, "tier": c.tier, "row_bytes": c.row_bytes, "bytes": c.bytes,
         "predicted_loss": sens.predicted(t.name, c.format),
         "measured_sensitivity": sens.measured(t.name, c.format), "ids_per_batch": n}
        for t, c, n in zip(planner.tables, planned.choices, ids)
    ]  # fmt: skip
    report["dense"] = {n: {"kernel": k.name, "w_bits": k.w_bits, "a_bits": k.a_bits,
                           "predicted_loss": planner.dense_sensitivity()[n][k.name]}
                       for n, k in planned.dense.items()}  # fmt: skip
    report["plan"] = planned.row()
    report["fp32_bytes"] = planner.total_fp32
    report["search_seconds"] = round(search_seconds, 3)
    if sweep is not None:
        report["sweep"] = [p.row() for p in sweep.plans()]
        report["dominance"] = dominance(sweep)
        report["exact_le_greedy"] = exact_le_greedy(sweep)
        report["infeasible"] = sweep.infeasible
        print(markdown(planner, sweep))
    from embq.files import staged_file

    with staged_file(report_path(output)) as tmp:
        tmp.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    summary = {"output": str(output), "report": str(report_path(output)), "hardware": spec.name,
               **{k: (round(v, 6) if isinstance(v, float) else v)
                  for k, v in planned.row().items() if k != "choices"},
               "formats": planned.row()["choices"],
               "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    print(json.dumps(summary))


def add_parser(verbs: argparse._SubParsersAction) -> None:
    """Register `plan`."""
    p = verbs.add_parser("plan", help="choose each table's format and kernel for a hardware target",
                         description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", required=True, help="model directory written by `embq train`")
    p.add_argument("--data", required=True, help="the prepared dataset it was trained on")
    p.add_argument("--hardware", default="x86-fbgemm",
                   help="a shipped spec (embq hardware list) or a spec YAML file")
    p.add_argument("--max-bytes", required=True,
                   help="byte budget of the tables: a fraction of fp32 (0.15) or bytes (1200000)")
    p.add_argument("--max-latency-ms", type=float,
                   help="latency budget of a batch's lookups (the spec's cost model, at --batch)")
    p.add_argument("--output", required=True, help="plan.json to write (the report goes beside it)")
    p.add_argument("--solver", choices=["exact", "greedy"], default="exact",
                   help="exact (integer program) or HAGO's greedy search")
    p.add_argument("--formats", help="comma-separated candidate formats (default: fp32, fp16, "
                   "int8, int4-opt, int2-opt and two PQs)")
    p.add_argument("--sensitivity", choices=["exact", "proxy"], default="exact",
                   help="exact: the log loss measured one table at a time; proxy: Fisher-"
                   "weighted reconstruction error (for models too big for that)")
    p.add_argument("--calib-rows", type=int, default=50_000, help="calibration rows")
    p.add_argument("--calibration", choices=["train", "holdout"], default="train",
                   help="calibration rows: the last training rows (default) or the first half "
                   "of the held-out rows (then verified on the other half)")
    p.add_argument("--batch", type=int, help="batch of the latency model (default: the spec's)")
    p.add_argument("--sweep", help="also plan, measure and tabulate these budgets, e.g. 0.1,0.125,0.15")
    p.add_argument("--no-verify", action="store_true", help="skip measuring on held-out rows")
    p.add_argument("--cache", help="sensitivity cache directory (default: .embq-cache beside "
                   "--output)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (latency is measured "
                   "on these)")
    p.add_argument("--dense", action="store_true", help="also choose a dense kernel per layer of "
                   "the towers among the spec's (their loss and cost join the search; the byte "
                   "budget stays the tables')")
    p.add_argument("--quick", action="store_true", help="fewer candidate formats (one PQ)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)
