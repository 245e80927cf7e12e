#!/usr/bin/env python
"""Benchmark embq's table quantizers against torch / fbgemm in one process.

Speed: embq's GREEDY (`int4-greedy`, `int2-greedy`), better search (`int4-opt`) and min/max
encoders against ATen `embedding_bag_{4,2}bit_prepack` (optimized_qparams=True / False) and
fbgemm `FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf`, on the same rows, at several dims.
Every contender runs once untimed first (embq's numba kernels compile, or load from their cache,
on first use). Timings alternate the contenders and keep each one's best of several repeats
(the machine may be shared); rows/s are wall clock, and the cpu_* figures (CPU seconds summed
over threads) measure work, which other processes on the machine disturb less. `threads` is
the number of threads embq's searches use (torch's GREEDY op is serial).

Quality, on Gaussian (sigma 0.1) and Student-t(3) (x 0.05) rows of dim 64, squared error vs
float32 (worst of the two distributions where one figure is reported):
  - GREEDY bytes identical to ATen at 4 and 2 bits;
  - int{4,2}-opt vs GREEDY, and vs the exhaustive grid search (`exhaustive_ranges`);
  - cb4-row vs int4-greedy, and vs the exact 1-D k-means DP (`kmeans1d_exact`);
  - cb4-shared vs int4-greedy, and PQ (pq32x4, pq16x8) vs int2, with bytes per row.

Prints a table, then (last line) one JSON object with the figures.

    python scripts/bench_quantize.py --quick     # under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clean clone

import fbgemm_gpu  # noqa: E402, F401  (registers torch.ops.fbgemm)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from embq.embedding.compiled import kernel_engine  # noqa: E402
from embq.embedding.opt_search import opt_ranges  # noqa: E402
from embq.embedding.parallel import kernel_threads  # noqa: E402
from embq.embedding.registry import get_format  # noqa: E402
from embq.embedding.rowwise import row_sse  # noqa: E402
from tests.reference import exhaustive_ranges, kmeans1d_exact  # noqa: E402

F32 = np.float32


def make_rows(kind: str, n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gauss":
        x = rng.standard_normal((n, d)) * 0.1
    else:
        x = rng.standard_t(3, (n, d)) * 0.05
    return np.ascontiguousarray(x, dtype=F32)


def best_times(fns: dict[str, callable], repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """(wall, cpu) seconds per call of each function, each the best of `repeats`, the
    contenders interleaved. CPU time sums all threads: a contention-robust work measure."""
    wall = {k: np.inf for k in fns}
    cpu = {k: np.inf for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[k] = min(wall[k], time.perf_counter() - t0)
            cpu[k] = min(cpu[k], time.process_time() - c0)
    return wall, cpu


def aten(bits: int, optimized: bool):
    op = getattr(torch.ops.quantized, f"embedding_bag_{bits}bit_prepack")
    return lambda w: op(w, optimized, 200, 0.16) if optimized else op(w)


def speed_rows(n: int, d: int, repeats: int) -> dict:
    """Rows per second of each contender on n Gaussian/Student-t rows of dim d."""
    x = np.concatenate([make_rows("gauss", n // 2, d, 1), make_rows("student_t", n - n // 2, d, 2)])
    w = torch.from_numpy(x)
    g4, g2, o4 = get_format("int4-greedy"), get_format("int2-greedy"), get_format("int4-opt")
    i4 = get_format("int4")
    fns = {
        "torch_int4_greedy": lambda: aten(4, True)(w),
        "embq_int4_greedy": lambda: g4.encode(x),
        "torch_int2_greedy": lambda: aten(2, True)(w),
        "embq_int2_greedy": lambda: g2.encode(x),
        "embq_int4_opt": lambda: o4.encode(x),
        "fbgemm_int4_minmax": lambda: torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(w, 4),
        "torch_int4_minmax": lambda: aten(4, False)(w),
        "embq_int4_minmax": lambda: i4.encode(x),
    }
    for fn in fns.values():  # warm-up: numba kernels compile (or load from cache) on first use
        fn()
    t, c = best_times(fns, repeats)
    out = {f"{k}_rows_per_s": n / v for k, v in t.items()}
    out.update({f"{k}_cpu_us_per_row": v / n * 1e6 for k, v in c.items()})
    out["int4_greedy_identical"] = bool(np.array_equal(g4.encode(x), aten(4, True)(w).numpy()))
    out["int2_greedy_identical"] = bool(np.array_equal(g2.encode(x), aten(2, True)(w).numpy()))
    return out


def sse_rows(x: np.ndarray, y: np.ndarray) -> float:
    return float(((x.astype(np.float64) - y.astype(np.float64)) ** 2).sum())


def quality(n_search: int, n_table: int) -> dict:
    """Error ratios on Gaussian and Student-t rows of dim 64."""
    d = 64
    res: dict[str, dict] = {}
    for kind, seed in (("gauss", 10), ("student_t", 11)):
        r: dict[str, float] = {}
        x = make_rows(kind, n_table, d, seed)
        fit, test = x[: n_table // 2], x[n_table // 2 :]
        err = {}
        for name in ("int4", "int4-greedy", "int4-opt", "int2", "int2-greedy", "int2-opt",
                     "cb4-row", "cb4-shared", "pq32x4", "pq16x8"):
            fmt = get_format(name)
            params = fmt.fit(fit)
            err[name] = sse_rows(test, fmt.decode(fmt.encode(test, params), params, d))
        for bits in (4, 2):
            r[f"opt_vs_greedy_{bits}"] = err[f"int{bits}-opt"] / err[f"int{bits}-greedy"]
            r[f"greedy_vs_minmax_{bits}"] = err[f"int{bits}-greedy"] / err[f"int{bits}"]
        r["cb4_row_vs_greedy"] = err["cb4-row"] / err["int4-greedy"]
        r["cb4_shared_vs_greedy"] = err["cb4-shared"] / err["int4-greedy"]
        r["pq32x4_vs_int2"] = err["pq32x4"] / err["int2"]
        r["pq16x8_vs_int2"] = err["pq16x8"] / err["int2"]
        r["pq32x4_vs_int2_opt"] = err["pq32x4"] / err["int2-opt"]
        # references on a smaller sample: the exhaustive grid search and the exact DP
        s = x[:n_search]
        for bits in (4, 2):
            _, _, exh = exhaustive_ranges(s, bits)
            ours = row_sse(s, *opt_ranges(s, bits), bits)
            r[f"opt_vs_exhaustive_{bits}"] = float(ours.sum() / exh.sum())
        exact, _ = kmeans1d_exact(s)
        cb = get_format("cb4-row")
        r["cb4_row_vs_exact"] = sse_rows(s, cb.decode(cb.encode(s), None, d)) / float(exact.sum())
        res[kind] = r
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes; finishes in under a minute")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.quick:
        sizes, repeats, n_search, n_table = [(4096, 32), (4096, 64), (4096, 128)], 3, 96, 4000
    else:
        sizes, repeats, n_search, n_table = [(20000, 32), (20000, 64), (20000, 128), (50000, 64)], 3, 400, 20000
    rows_main = dict(sizes)[64] if 64 in dict(sizes) else sizes[0][0]

    print(f"embq quantize benchmark ({'quick' if args.quick else 'full'}; {os.cpu_count()} cores; "
          f"torch {torch.__version__}; embq kernels: {kernel_engine()}, "
          f"{kernel_threads()} threads); rows/s, best of {repeats}")
    hdr = (f"{'rows':>6} {'dim':>4} | {'torch g4':>9} {'embq g4':>9} {'x':>5} {'ident':>5} | "
           f"{'torch g2':>9} {'embq g2':>9} {'x':>5} {'ident':>5} | {'embq opt4':>9} {'x':>5} | "
           f"{'fbgemm mm4':>10} {'embq mm4':>9}")
    print(hdr)
    print("-" * len(hdr))
    speed = {}
    for n, d in sizes:
        s = speed_rows(n, d, repeats)
        speed[(n, d)] = s
        print(f"{n:>6} {d:>4} | {s['torch_int4_greedy_rows_per_s']:>9.0f} {s['embq_int4_greedy_rows_per_s']:>9.0f} "
              f"{s['embq_int4_greedy_rows_per_s'] / s['torch_int4_greedy_rows_per_s']:>5.1f} {str(s['int4_greedy_identical']):>5} | "
              f"{s['torch_int2_greedy_rows_per_s']:>9.0f} {s['embq_int2_greedy_rows_per_s']:>9.0f} "
              f"{s['embq_int2_greedy_rows_per_s'] / s['torch_int2_greedy_rows_per_s']:>5.1f} {str(s['int2_greedy_identical']):>5} | "
              f"{s['embq_int4_opt_rows_per_s']:>9.0f} {s['embq_int4_opt_rows_per_s'] / s['torch_int4_greedy_rows_per_s']:>5.1f} | "
              f"{s['fbgemm_int4_minmax_rows_per_s']:>10.0f} {s['embq_int4_minmax_rows_per_s']:>9.0f}")
    print("(x = embq rows/s over torch GREEDY rows/s; opt4 x is also over torch int4 GREEDY)")

    q = quality(n_search, n_table)
    print(f"\nquality, dim 64, squared error ratios ({n_table // 2} test rows; references on {n_search} rows)")
    keys = list(q["gauss"])
    print(f"{'ratio':<24} {'gauss':>8} {'student_t':>10}")
    for k in keys:
        print(f"{k:<24} {q['gauss'][k]:>8.4f} {q['student_t'][k]:>10.4f}")
    bpr = {n: get_format(n).bytes_per_row(64) for n in ("int4-greedy", "int2", "cb4-row", "cb4-shared", "pq32x4", "pq16x8")}
    print("bytes/row at dim 64: " + ", ".join(f"{k} {v}" for k, v in bpr.items()))

    worst = lambda key: max(q["gauss"][key], q["student_t"][key])  # noqa: E731
    s64 = speed[(rows_main, 64)]
    figures = {
        "dim": 64,
        "rows": rows_main,
        "threads": kernel_threads(),
        "embq_int4_greedy_rows_per_s": round(s64["embq_int4_greedy_rows_per_s"]),
        "torch_int4_greedy_rows_per_s": round(s64["torch_int4_greedy_rows_per_s"]),
        "speedup_int4_greedy": round(s64["embq_int4_greedy_rows_per_s"] / s64["torch_int4_greedy_rows_per_s"], 2),
        "speedup_int2_greedy": round(s64["embq_int2_greedy_rows_per_s"] / s64["torch_int2_greedy_rows_per_s"], 2),
        "cpu_time_ratio_int4_greedy": round(s64["torch_int4_greedy_cpu_us_per_row"] / s64["embq_int4_greedy_cpu_us_per_row"], 2),
        "embq_int4_greedy_cpu_us_per_row": round(s64["embq_int4_greedy_cpu_us_per_row"], 2),
        "torch_int4_greedy_cpu_us_per_row": round(s64["torch_int4_greedy_cpu_us_per_row"], 2),
        "int4_greedy_identical": all(v["int4_greedy_identical"] for v in speed.values()),
        "int2_greedy_identical": all(v["int2_greedy_identical"] for v in speed.values()),
        "embq_int4_opt_rows_per_s": round(s64["embq_int4_opt_rows_per_s"]),
        "speedup_int4_opt_vs_torch_greedy": round(s64["embq_int4_opt_rows_per_s"] / s64["torch_int4_greedy_rows_per_s"], 2),
        "cpu_time_ratio_int4_opt_vs_torch_greedy": round(s64["torch_int4_greedy_cpu_us_per_row"] / s64["embq_int4_opt_cpu_us_per_row"], 2),
        "fbgemm_int4_minmax_rows_per_s": round(s64["fbgemm_int4_minmax_rows_per_s"]),
        "embq_int4_minmax_rows_per_s": round(s64["embq_int4_minmax_rows_per_s"]),
        "better_search_mse_ratio_4bit": round(worst("opt_vs_greedy_4"), 4),
        "better_search_mse_ratio_2bit": round(worst("opt_vs_greedy_2"), 4),
        "better_search_excess_over_exhaustive": round(max(worst("opt_vs_exhaustive_4"), worst("opt_vs_exhaustive_2")) - 1, 4),
        "cb4_row_mse_ratio": round(worst("cb4_row_vs_greedy"), 4),
        "cb4_row_mse_ratio_gauss": round(q["gauss"]["cb4_row_vs_greedy"], 4),
        "cb4_row_excess_over_exact": round(worst("cb4_row_vs_exact") - 1, 5),
        "cb4_shared_mse_ratio": round(worst("cb4_shared_vs_greedy"), 4),
        "pq32x4_mse_ratio_vs_int2": round(worst("pq32x4_vs_int2"), 4),
        "pq16x8_mse_ratio_vs_int2": round(worst("pq16x8_vs_int2"), 4),
        "bytes_per_row": bpr,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
