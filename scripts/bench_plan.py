#!/usr/bin/env python
"""Benchmark: the plan search on a trained DLRM, per hardware target, verified on held-out rows.

    python scripts/bench_plan.py --quick              # the demo model (make demo), a few minutes
    python scripts/bench_plan.py --model runs/movielens/model \
        --data datasets/prepared/movielens-100k       # any model trained by `embq train`

1. x86-fbgemm: re-probe this machine (`embq hardware probe`, so that the latency model and the
   measurements see the same machine state; `--no-probe` uses the shipped spec), sensitivities on
   calibration rows (the last `--calib-rows` training rows), then at every budget of the sweep
   the exact plan and HAGO's greedy plan, and every uniform format on its smallest kernel. Each
   is quantized and measured on the held-out rows `embq train` held out (disjoint from the
   calibration rows): log loss, the bytes embq's runtime holds (metadata memory_bytes), and the
   lookup latency at batch 512 on one thread (the runtime's embedding module, interleaved
   rounds, medians of the calling thread's CPU time, which the probe measures too: the latency
   of an idle machine without the time other processes took; wall-clock medians beside them)
   against the spec's prediction.
2. nvidia-fbgemm: padded row bytes, the smallest feasible budget, a plan at 0.27 of fp32.
3. accelerator: a plan; every format it picks must be one the spec lists.

Prints the sweep table, then (last line) one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch + faiss OpenMP pools on 2 cores

import torch  # noqa: E402

from embq.data.prepared import PreparedData  # noqa: E402
from embq.hardware.accounting import padded_row_bytes  # noqa: E402
from embq.hardware.cost import lookup_seconds  # noqa: E402
from embq.hardware.planner import Planner  # noqa: E402
from embq.hardware.spec import format_key, load_spec  # noqa: E402
from embq.hardware.sweep import (  # noqa: E402
    dominance,
    exact_le_greedy,
    latency_error,
    markdown,
    measure,
    run_sweep,
)
from embq.models.dlrm import load_model  # noqa: E402

QUICK_BUDGETS = [0.11, 0.125, 0.13, 0.15, 0.1875, 0.25]
FULL_BUDGETS = [0.10, 0.11, 0.12, 0.125, 0.13, 0.14, 0.15, 0.17, 0.1875, 0.22, 0.25, 0.3125]


def key(budget: float) -> str:
    return f"{budget:g}".replace(".", "p")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/demo/model")
    parser.add_argument("--data", default="runs/demo/prepared")
    parser.add_argument("--workdir", default="runs/bench_plan")
    parser.add_argument("--quick", action="store_true", help="fewer budgets and formats")
    parser.add_argument("--budgets", help="comma-separated fractions of fp32 (overrides)")
    parser.add_argument("--calib-rows", type=int, default=50_000)
    parser.add_argument("--sensitivity", choices=["exact", "proxy"], default="exact")
    parser.add_argument("--no-probe", action="store_true", help="use the shipped x86-fbgemm spec")
    parser.add_argument("--cache", help="sensitivity cache directory (default: none, so the "
                        "reported sensitivity_seconds is a fresh computation)")
    parser.add_argument("--rounds", type=int, default=5, help="latency rounds")
    parser.add_argument("--no-latency", action="store_true")
    args = parser.parse_args()

    started = time.perf_counter()
    torch.set_num_threads(1)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    shipped = load_spec("x86-fbgemm")
    probe_seconds = 0.0
    if args.no_probe:
        x86 = shipped
    else:
        from embq.hardware.probe import run_probe, write_spec

        print("[1/4] probing this machine (embq hardware probe)", flush=True)
        t0 = time.perf_counter()
        x86 = load_spec(write_spec(run_probe("x86-fbgemm", threads=1, progress=False),
                                   work / "x86-fbgemm.yaml"))  # fmt: skip
        probe_seconds = time.perf_counter() - t0

    model, _ = load_model(args.model)
    data = PreparedData(args.data)
    budgets = ([float(b) for b in args.budgets.split(",")] if args.budgets
               else QUICK_BUDGETS if args.quick else FULL_BUDGETS)  # fmt: skip
    planner = Planner(model, data, x86, calib_rows=args.calib_rows, sensitivity=args.sensitivity,
                      cache_dir=args.cache, quick=args.quick, progress=True)  # fmt: skip
    print(f"[2/4] sensitivity: {len(planner.tables)} tables x {len(planner.formats)} formats on "
          f"rows {planner.calib_range} ({args.sensitivity})", flush=True)
    sens = planner.sensitivity()
    print(f"[3/4] sweep {budgets} on {x86.name}; measuring on held-out rows {planner.heldout_range}",
          flush=True)  # fmt: skip
    sweep = run_sweep(planner, budgets)
    measure(planner, sweep, latency=not args.no_latency, rounds=args.rounds)
    exact_plans = [p for p in sweep.exact.values() if p is not None]
    ids = planner.ids()
    for p in exact_plans:  # the same plans priced by the shipped spec's coefficients
        p.predicted["seconds_shipped_spec"] = lookup_seconds(shipped, p.choices, ids,
                                                             planner.outs())["seconds"]
    shipped_errors = sorted(abs(p.predicted["seconds_shipped_spec"] - p.measured["seconds"])
                            / p.measured["seconds"] for p in exact_plans if "seconds" in p.measured)  # fmt: skip

    print("[4/4] nvidia-fbgemm and accelerator", flush=True)
    nvidia = Planner(model, data, load_spec("nvidia-fbgemm"), calib_rows=args.calib_rows,
                     sensitivity=args.sensitivity, quick=args.quick, progress=False)  # fmt: skip
    nvidia.reuse(planner)  # the same model, rows and formats: one sensitivity
    nv_min = nvidia.min_bytes()
    nv_plan = nvidia.plan(0.27)
    accel = Planner(model, data, load_spec("accelerator"), calib_rows=args.calib_rows,
                    sensitivity=args.sensitivity, quick=args.quick, progress=False)  # fmt: skip
    accel.reuse(planner)
    accel_min = accel.min_bytes()
    accel_plan = accel.plan(round(accel_min / accel.total_fp32 + 0.05, 4))
    planner.measure_loss([nv_plan, accel_plan])

    print()
    print(markdown(planner, sweep))
    print()
    for target, p in (("nvidia-fbgemm", nv_plan), ("accelerator", accel_plan)):
        print(f"{target} {p.name}: bytes "
              f"{p.predicted['bytes_ratio']:.4f} of fp32, predicted {p.predicted['loss_pct']:+.3f}%, "
              f"measured {p.measured['loss_pct']:+.3f}%, {p.row()['choices']}")  # fmt: skip
    dom, le = dominance(sweep), exact_le_greedy(sweep)
    uniform = {u.name.split(" ", 1)[1]: u for u in sweep.uniform}
    spec_nv = load_spec("nvidia-fbgemm")
    result = {
        "model": args.model, "rows_calibration": list(planner.calib_range),
        "rows_heldout": list(planner.heldout_range), "formats": planner.formats,
        "budgets": budgets, "threads": 1, "machine": x86.machine.get("cpu"),
    }  # fmt: skip
    for b, p in sweep.exact.items():
        if p is not None:
            result[f"cpu_plan_bytes_ratio_{key(b)}"] = round(p.measured.get(
                "bytes_ratio", p.predicted["bytes_ratio"]), 5)  # fmt: skip
            result[f"cpu_plan_logloss_delta_pct_{key(b)}"] = round(p.measured["loss_pct"], 4)
            if "seconds" in p.measured:
                result[f"cpu_plan_lookup_ms_{key(b)}"] = round(p.measured["seconds"] * 1e3, 4)
                result[f"cpu_plan_lookup_wall_ms_{key(b)}"] = round(p.measured["wall_seconds"] * 1e3, 4)
    for b, p in sweep.greedy.items():
        if p is not None:
            result[f"greedy_plan_logloss_delta_pct_{key(b)}"] = round(p.measured["loss_pct"], 4)
    if "int2-opt" in uniform:
        result["uniform_int2_opt_logloss_delta_pct"] = round(uniform["int2-opt"].measured["loss_pct"], 4)
    if "int4-opt" in uniform:
        result["uniform_int4_opt_logloss_delta_pct"] = round(uniform["int4-opt"].measured["loss_pct"], 4)
    result.update({
        "plan_dominates_uniform": dom["ok"],
        "plan_dominates_uniform_budgets": len(dom["checks"]),
        "exact_objective_le_greedy": le["ok"],
        "exact_objective_le_greedy_budgets": len(le["pairs"]),
        "nvidia_row_bytes_int2_dim16": padded_row_bytes(spec_nv, spec_nv.lookup_kernels["tbe-hbm"], "int2", 16),
        "nvidia_row_bytes_int4_dim16": padded_row_bytes(spec_nv, spec_nv.lookup_kernels["tbe-hbm"], "int4", 16),
        "nvidia_min_bytes_ratio": round(nv_min / nvidia.total_fp32, 5),
        "cpu_min_bytes_ratio": round(planner.min_bytes() / planner.total_fp32, 5),
        "nvidia_plan_bytes_ratio_0p27": round(nv_plan.predicted["bytes_ratio"], 5),
        "nvidia_plan_int2_tables": sum(format_key(c.format) == "int2" for c in nv_plan.choices),
        "nvidia_plan_logloss_delta_pct_0p27": round(nv_plan.measured["loss_pct"], 4),
        "accelerator_plan_bytes_ratio": round(accel_plan.predicted["bytes_ratio"], 5),
        "accelerator_plan_formats_ok": all(format_key(c.format) in load_spec("accelerator").formats
                                           for c in accel_plan.choices),
        "latency_model_median_rel_error": (None if args.no_latency
                                           else round(latency_error(exact_plans), 4)),
        "latency_model_median_rel_error_shipped_spec": (round(shipped_errors[len(shipped_errors) // 2], 4)
                                                        if shipped_errors else None),
        "latency_batch": planner.batch,
        "search_seconds": round(sum(sweep.search_seconds), 3),
        "search_seconds_per_plan_median": round(sorted(sweep.search_seconds)[len(sweep.search_seconds) // 2], 4),
        "sensitivity_seconds": sens.seconds,
        "sensitivity_method": sens.method,
        "proxy_rank_correlation": None if sens.rank_correlation() is None else round(sens.rank_correlation(), 4),
        "probe_seconds": round(probe_seconds, 1),
        "infeasible": sweep.infeasible,
        "seconds": round(time.perf_counter() - started, 1),
    })  # fmt: skip
    (work / "report.json").write_text(json.dumps({
        "summary": result, "dominance": dom, "exact_le_greedy": le,
        "plans": [p.row() for p in sweep.plans() + [nv_plan, accel_plan]],
    }, indent=1))  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
