#!/usr/bin/env python
"""Benchmark embq's table quantizers against torch / fbgemm in one process.

Speed: embq's GREEDY (`int4-greedy`, `int2-greedy`), better search (`int4-opt`) and min/max
(`int4`) encoders against ATen `embedding_bag_{4,2}bit_prepack` (optimized_qparams=True / False)
and fbgemm `FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf`, on the same float32 rows, at several
dims. Every contender runs once untimed first (embq's numba kernels compile, or load from their
cache, on first use). Then rounds: in each round every contender is timed in turn (interleaved)
over enough calls to last ~20 ms; the figures are the MEDIAN over the rounds, never the best.
Both wall-clock and CPU time (summed over threads) are reported, and speedups are given as both
ratios. Threads: embq's searches (greedy, opt) use `threads` (one per usable core); torch's
prepack ops, fbgemm's packer and embq's min/max encode (its compiled kernel: the NaN / Inf /
fp16-range check and the packing in one go) run on one thread. `int4_minmax_vs_fbgemm` is embq's
whole `int4` encode (`get_format("int4").encode`, checks included) in rows/s over fbgemm's bare
op on the same rows; `int4_minmax_identical` says the bytes are the same.

cb4-shared's encoder on Gaussian rows of dim 64 (65,536 rows, 8,192 with --quick) with a
codebook fitted on 4,096 (1,024) of them: the compiled kernel (`shared_encode`, on `threads`)
against its numpy reference (`shared_encode_numpy`, one thread), same timing;
`cb4_shared_kernel_vs_numpy` is the wall-clock speed ratio (`..._cpu` the CPU-time one),
`cb4_shared_encode_rows_per_s` the whole `get_format("cb4-shared").encode` (checks and packing
included) with the kernel, `cb4_shared_identical` that kernel and reference give the same bits.

Quality, on Gaussian (sigma 0.1) and Student-t(3) (x 0.05) rows of dim 64, squared error vs
float32 (worst of the two distributions where one figure is reported):
  - GREEDY bytes identical to ATen at 4 and 2 bits;
  - int{4,2}-opt vs GREEDY, and vs the exhaustive grid search (`exhaustive_ranges`);
  - cb4-row vs int4-greedy, and vs the exact 1-D k-means DP (`kmeans1d_exact`);
  - cb4-shared vs int4-greedy, and PQ (pq32x4, pq16x8) vs int2, with bytes per row.
With a trained model (`--model DIR`, default `runs/demo/model` when `make demo` made it), the
same ratios on its trained tables: sum of squared errors over every table value / the same for
int4-greedy (cb4-shared's shared codebook suits Gaussian rows better than trained ones).

Prints a table, then (last line) one JSON object with the figures.

    python scripts/bench_quantize.py --quick     # about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clean clone
# As embq's CLI does: idle OpenMP threads sleep instead of spinning on the core the next
# contender runs on (torch's prepack ops would otherwise slow whatever is timed after them).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import fbgemm_gpu  # noqa: E402, F401  (registers torch.ops.fbgemm)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from embq.embedding.codebook import shared_encode, shared_encode_numpy  # noqa: E402
from embq.embedding.compiled import kernel_engine  # noqa: E402
from embq.embedding.opt_search import opt_ranges  # noqa: E402
from embq.embedding.parallel import kernel_threads  # noqa: E402
from embq.embedding.registry import get_format  # noqa: E402
from embq.embedding.rowwise import row_sse  # noqa: E402
from tests.reference import exhaustive_ranges, kmeans1d_exact  # noqa: E402

F32 = np.float32
ROOT = Path(__file__).resolve().parents[1]
TRAINED_FORMATS = ("int4", "int4-greedy", "int4-opt", "cb4-shared")


def make_rows(kind: str, n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gauss":
        x = rng.standard_normal((n, d)) * 0.1
    else:
        x = rng.standard_t(3, (n, d)) * 0.05
    return np.ascontiguousarray(x, dtype=F32)


def median_times(fns: dict[str, Callable[[], object]], rounds: int,
                 round_seconds: float = 0.02) -> tuple[dict[str, float], dict[str, float]]:
    """(wall, cpu) seconds per call of each function: the median over `rounds` interleaved
    rounds (the order rotated every round), each timing a batch of calls that lasts about
    `round_seconds`. CPU time sums all
    threads of the process (a measure of work that other jobs on the machine disturb less)."""
    calls = {}
    for k, fn in fns.items():  # calibrate the batch size on one call (after the warm-up)
        t0 = time.perf_counter()
        fn()
        calls[k] = max(1, int(round_seconds / max(time.perf_counter() - t0, 1e-7)))
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:  # each round starts elsewhere
            fn = fns[k]
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(calls[k]):
                fn()
            wall[k].append((time.perf_counter() - t0) / calls[k])
            cpu[k].append((time.process_time() - c0) / calls[k])
    return ({k: float(np.median(v)) for k, v in wall.items()},
            {k: float(np.median(v)) for k, v in cpu.items()})


def aten(bits: int, optimized: bool):
    op = getattr(torch.ops.quantized, f"embedding_bag_{bits}bit_prepack")
    return lambda w: op(w, optimized, 200, 0.16) if optimized else op(w)


def speed_rows(n: int, d: int, rounds: int) -> dict:
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
    t, c = median_times(fns, rounds)
    out = {f"{k}_rows_per_s": n / v for k, v in t.items()}
    out.update({f"{k}_cpu_us_per_row": v / n * 1e6 for k, v in c.items()})
    out["int4_greedy_identical"] = bool(np.array_equal(g4.encode(x), aten(4, True)(w).numpy()))
    out["int2_greedy_identical"] = bool(np.array_equal(g2.encode(x), aten(2, True)(w).numpy()))
    fb = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(w, 4).numpy()
    out["int4_minmax_identical"] = bool(np.array_equal(i4.encode(x), fb))
    return out


def cb4_shared_speed(n: int, n_fit: int, rounds: int) -> dict:
    """cb4-shared's encoder on n Gaussian rows of dim 64, codebook fitted on n_fit of them:
    the kernel (`shared_encode`) and the numpy reference side by side, and the whole encode."""
    x = make_rows("gauss", n, 64, 3)
    fmt = get_format("cb4-shared")
    params = fmt.fit(x[:n_fit])
    cb, mom = params["codebook"], params["moments"]
    fns = {
        "numpy": lambda: shared_encode_numpy(x, cb, mom),
        "kernel": lambda: shared_encode(x, cb, mom),
        "encode": lambda: fmt.encode(x, params),
    }
    for fn in fns.values():
        fn()
    t, c = median_times(fns, rounds)
    same = all(np.array_equal(a.view(np.uint8), b.view(np.uint8))
               for a, b in zip(shared_encode(x, cb, mom), shared_encode_numpy(x, cb, mom)))  # fmt: skip
    return {"rows": n, "fit_rows": n_fit, "identical": same,
            **{f"{k}_rows_per_s": n / v for k, v in t.items()},
            **{f"{k}_cpu_us_per_row": v / n * 1e6 for k, v in c.items()}}  # fmt: skip


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


def trained_quality(model_dir: Path) -> dict:
    """Squared error over every value of a trained model's tables, per format, pooled over its
    tables (each table encoded as `embq.quantize` encodes it), and ratios to int4-greedy."""
    import embq
    from embq.embedding.encode import encode_table
    from embq.models.tables import find_tables

    model, _ = embq.load_model(model_dir)
    tables = find_tables(model)
    energy = sum(float((t.weight.detach().double() ** 2).sum()) for t in tables)
    sse: dict[str, float] = {}
    for name in TRAINED_FORMATS:
        total = 0.0
        for t in tables:
            q = encode_table(t, name)
            total += q.stats["relative_mse"] * float((t.weight.detach().double() ** 2).sum())
        sse[name] = total
    return {
        "model": str(model_dir),
        "tables": len(tables),
        "dims": sorted({t.dim for t in tables}),
        "rows": sum(t.rows for t in tables),
        "relative_mse": {k: v / energy for k, v in sse.items()},
        "mse_vs_int4_greedy": {k: v / sse["int4-greedy"] for k, v in sse.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes; about a minute")
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds (default 9 quick, 15 full)")
    ap.add_argument("--model", type=Path, default=None,
                    help="a trained model for the trained-table errors (default runs/demo/model "
                         "if it exists; 'none' to skip)")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.quick:
        sizes, rounds, n_search, n_table = [(4096, 32), (4096, 64), (4096, 128)], 9, 96, 4000
        cb4_rows, cb4_fit = 8192, 1024
    else:
        sizes, rounds, n_search, n_table = [(20000, 32), (20000, 64), (20000, 128), (50000, 64)], 15, 400, 20000
        cb4_rows, cb4_fit = 65536, 4096
    rounds = args.rounds or rounds
    rows_main = dict(sizes)[64] if 64 in dict(sizes) else sizes[0][0]
    model_dir = args.model if args.model is not None else ROOT / "runs" / "demo" / "model"

    print(f"embq quantize benchmark ({'quick' if args.quick else 'full'}; {os.cpu_count()} cores; "
          f"torch {torch.__version__}; embq kernels: {kernel_engine()}, searches on "
          f"{kernel_threads()} threads, min/max and torch/fbgemm ops on 1); rows/s wall clock, "
          f"median of {rounds} interleaved rounds; x = wall ratio (CPU-time ratio)")
    hdr = (f"{'rows':>6} {'dim':>4} | {'torch g4':>9} {'embq g4':>9} {'x (cpu)':>12} {'ident':>5} | "
           f"{'torch g2':>9} {'embq g2':>9} {'x (cpu)':>12} {'ident':>5} | {'embq opt4':>9} {'x':>5} | "
           f"{'fbgemm mm4':>10} {'embq mm4':>9} {'x (cpu)':>11}")
    print(hdr)
    print("-" * len(hdr))
    speed = {}

    def ratio(s: dict, ours: str, base: str) -> tuple[float, float]:
        """(wall, cpu) speed ratio of `ours` over `base`: rows/s over rows/s, cpu/row over cpu/row."""
        return (s[f"{ours}_rows_per_s"] / s[f"{base}_rows_per_s"],
                s[f"{base}_cpu_us_per_row"] / s[f"{ours}_cpu_us_per_row"])

    for n, d in sizes:
        s = speed_rows(n, d, rounds)
        speed[(n, d)] = s
        g4, g2 = ratio(s, "embq_int4_greedy", "torch_int4_greedy"), ratio(s, "embq_int2_greedy", "torch_int2_greedy")
        mm = ratio(s, "embq_int4_minmax", "fbgemm_int4_minmax")
        print(f"{n:>6} {d:>4} | {s['torch_int4_greedy_rows_per_s']:>9.0f} {s['embq_int4_greedy_rows_per_s']:>9.0f} "
              f"{g4[0]:>5.1f} ({g4[1]:>4.1f}) {str(s['int4_greedy_identical']):>5} | "
              f"{s['torch_int2_greedy_rows_per_s']:>9.0f} {s['embq_int2_greedy_rows_per_s']:>9.0f} "
              f"{g2[0]:>5.1f} ({g2[1]:>4.1f}) {str(s['int2_greedy_identical']):>5} | "
              f"{s['embq_int4_opt_rows_per_s']:>9.0f} {s['embq_int4_opt_rows_per_s'] / s['torch_int4_greedy_rows_per_s']:>5.1f} | "
              f"{s['fbgemm_int4_minmax_rows_per_s']:>10.0f} {s['embq_int4_minmax_rows_per_s']:>9.0f} "
              f"{mm[0]:>4.2f} ({mm[1]:.2f})")
    print("(g4/g2/opt4 x: embq over torch GREEDY; mm4 x: embq's whole int4 encode, checks "
          "included, over fbgemm's bare packer)")

    cb = cb4_shared_speed(cb4_rows, cb4_fit, rounds)
    cbx = (cb["kernel_rows_per_s"] / cb["numpy_rows_per_s"], cb["numpy_cpu_us_per_row"] / cb["kernel_cpu_us_per_row"])
    print(f"\ncb4-shared encoder, dim 64, {cb4_rows} Gaussian rows (codebook fitted on {cb4_fit}): "
          f"numpy (1 thread) {cb['numpy_rows_per_s']:.0f} rows/s, {cb['numpy_cpu_us_per_row']:.2f} CPU us/row; "
          f"kernel ({kernel_threads()} threads) {cb['kernel_rows_per_s']:.0f} rows/s, "
          f"{cb['kernel_cpu_us_per_row']:.2f} CPU us/row: x {cbx[0]:.1f} wall ({cbx[1]:.1f} CPU), identical "
          f"{cb['identical']}; whole encode {cb['encode_rows_per_s']:.0f} rows/s")

    q = quality(n_search, n_table)
    print(f"\nquality, dim 64, squared error ratios ({n_table // 2} test rows; references on {n_search} rows)")
    keys = list(q["gauss"])
    print(f"{'ratio':<24} {'gauss':>8} {'student_t':>10}")
    for k in keys:
        print(f"{k:<24} {q['gauss'][k]:>8.4f} {q['student_t'][k]:>10.4f}")
    bpr = {n: get_format(n).bytes_per_row(64) for n in ("int4-greedy", "int2", "cb4-row", "cb4-shared", "pq32x4", "pq16x8")}
    print("bytes/row at dim 64: " + ", ".join(f"{k} {v}" for k, v in bpr.items()))

    trained = None
    skip_model = args.model is not None and str(args.model).lower() == "none"
    if not skip_model and (model_dir / "config.json").exists():
        trained = trained_quality(model_dir)
        print(f"\ntrained tables ({model_dir}: {trained['tables']} tables, dims {trained['dims']}, "
              f"{trained['rows']:,} rows): relative MSE, and MSE / int4-greedy's")
        for k, v in trained["relative_mse"].items():
            print(f"{k:<12} {v:>12.6g} {trained['mse_vs_int4_greedy'][k]:>8.4f}")
    elif args.model is not None and not skip_model:
        raise SystemExit(f"--model {args.model}: no config.json there (a model saved by embq train)")
    else:
        print(f"\n(no trained model at {model_dir}: run `make demo`, or pass --model DIR)")

    worst = lambda key: max(q["gauss"][key], q["student_t"][key])  # noqa: E731
    s64 = speed[(rows_main, 64)]
    g4, g2 = ratio(s64, "embq_int4_greedy", "torch_int4_greedy"), ratio(s64, "embq_int2_greedy", "torch_int2_greedy")
    o4, mm = ratio(s64, "embq_int4_opt", "torch_int4_greedy"), ratio(s64, "embq_int4_minmax", "fbgemm_int4_minmax")
    figures = {
        "dim": 64,
        "rows": rows_main,
        "threads": kernel_threads(),
        "timing": f"median of {rounds} interleaved rounds; wall-clock and CPU time (all threads)",
        "embq_int4_greedy_rows_per_s": round(s64["embq_int4_greedy_rows_per_s"]),
        "torch_int4_greedy_rows_per_s": round(s64["torch_int4_greedy_rows_per_s"]),
        "speedup_int4_greedy": round(g4[0], 2),
        "speedup_int2_greedy": round(g2[0], 2),
        "cpu_time_ratio_int4_greedy": round(g4[1], 2),
        "cpu_time_ratio_int2_greedy": round(g2[1], 2),
        "embq_int4_greedy_cpu_us_per_row": round(s64["embq_int4_greedy_cpu_us_per_row"], 2),
        "torch_int4_greedy_cpu_us_per_row": round(s64["torch_int4_greedy_cpu_us_per_row"], 2),
        "int4_greedy_identical": all(v["int4_greedy_identical"] for v in speed.values()),
        "int2_greedy_identical": all(v["int2_greedy_identical"] for v in speed.values()),
        "embq_int4_opt_rows_per_s": round(s64["embq_int4_opt_rows_per_s"]),
        "speedup_int4_opt_vs_torch_greedy": round(o4[0], 2),
        "cpu_time_ratio_int4_opt_vs_torch_greedy": round(o4[1], 2),
        "fbgemm_int4_minmax_rows_per_s": round(s64["fbgemm_int4_minmax_rows_per_s"]),
        "embq_int4_minmax_rows_per_s": round(s64["embq_int4_minmax_rows_per_s"]),
        "int4_minmax_vs_fbgemm": round(mm[0], 3),
        "int4_minmax_vs_fbgemm_cpu": round(mm[1], 3),
        "int4_minmax_vs_fbgemm_by_dim": {d: round(ratio(v, "embq_int4_minmax", "fbgemm_int4_minmax")[0], 3)
                                         for (_, d), v in speed.items()},
        "int4_minmax_identical": all(v["int4_minmax_identical"] for v in speed.values()),
        "cb4_shared_rows": cb4_rows,
        "cb4_shared_encode_rows_per_s": round(cb["encode_rows_per_s"]),
        "cb4_shared_kernel_rows_per_s": round(cb["kernel_rows_per_s"]),
        "cb4_shared_numpy_rows_per_s": round(cb["numpy_rows_per_s"]),
        "cb4_shared_kernel_vs_numpy": round(cbx[0], 2),
        "cb4_shared_kernel_vs_numpy_cpu": round(cbx[1], 2),
        "cb4_shared_identical": cb["identical"],
        "better_search_mse_ratio_4bit": round(worst("opt_vs_greedy_4"), 4),
        "better_search_mse_ratio_2bit": round(worst("opt_vs_greedy_2"), 4),
        "better_search_excess_over_exhaustive": round(max(worst("opt_vs_exhaustive_4"), worst("opt_vs_exhaustive_2")) - 1, 4),
        "cb4_row_mse_ratio": round(worst("cb4_row_vs_greedy"), 4),
        "cb4_row_mse_ratio_gauss": round(q["gauss"]["cb4_row_vs_greedy"], 4),
        "cb4_row_excess_over_exact": round(worst("cb4_row_vs_exact") - 1, 5),
        "cb4_shared_mse_ratio": round(worst("cb4_shared_vs_greedy"), 4),
        "cb4_shared_mse_ratio_gauss": round(q["gauss"]["cb4_shared_vs_greedy"], 4),
        "pq32x4_mse_ratio_vs_int2": round(worst("pq32x4_vs_int2"), 4),
        "pq16x8_mse_ratio_vs_int2": round(worst("pq16x8_vs_int2"), 4),
        "bytes_per_row": bpr,
    }
    if trained is not None:
        figures["cb4_shared_mse_ratio_trained"] = round(trained["mse_vs_int4_greedy"]["cb4-shared"], 4)
        figures["trained"] = {"model": trained["model"], "tables": trained["tables"],
                              "mse_vs_int4_greedy": {k: round(v, 4) for k, v in trained["mse_vs_int4_greedy"].items()}}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
