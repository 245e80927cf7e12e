"""Micro-benchmark: what the input check (`embq.runtime.validate.SparseCheck`) costs at batch 512,
against the int4 lookups it guards.

    python scripts/bench_validate.py            # 26 tables x 200,000 rows x 64, batch 512
    python scripts/bench_validate.py --rows 50000 --calls 100

Times, as medians of `--calls` calls after a warm-up (wall clock, `--threads` torch threads,
OMP_WAIT_POLICY=PASSIVE unless set, on whatever else the machine runs), for 26 features x 512
rows:

- the check alone, scripted (as the exported module and the kernels run it) and eager (as the
  Python `DLRMCore.forward` runs it), with 20 ids per bag (266,240 ids) and 1 id per bag;
  "uniform" tables all of one size (one min / max over the ids suffices) and "mixed" tables of
  sizes from 1,000 to 200,000 (a max per feature whose table is smaller than the largest id);
- its parts: the offsets comparison and one torch.aminmax over the ids (what the old
  per-kernel TBE check cost in the common case);
- the int4 lookups it guards (`QuantEmbeddingBags`, kernel "auto": fbgemm's TBE), with the
  check, with what the TBE's own check cost before (one min / max over the ids) and without
  any (`_lookup_checked_input`), timed in alternating rounds: the check runs before lookups
  that then find the ids in cache, so its cost in place differs from its cost alone.

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

# Set before torch loads (as the embq CLI and embq-serve do): with OpenMP's default policy, on a
# machine whose cores are all busy, one parallel reduction can wait a whole scheduler slice
# (8-16 ms measured here on a shared 2-core machine) for a spinning thread to get a core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FEATURES, BATCH, DIM = 26, 512, 64


def median_us(fn, calls: int) -> float:
    for _ in range(max(5, calls // 10)):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e6)


def interleaved_medians(fns: dict, calls: int, rounds: int = 5) -> dict[str, float]:
    """Median microseconds of each function, timed in alternating rounds so that load from
    other processes falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(5):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(max(1, calls // rounds)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t) * 1e6) for name, t in times.items()}


def inputs(rows: list[int], pooling: int, seed: int = 0):
    import torch

    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.integers(0, r, BATCH * pooling) for r in rows])
    offsets = np.arange(0, len(values) + 1, pooling, dtype=np.int64)
    return torch.from_numpy(values), torch.from_numpy(offsets)


def int4_bags(rows: int):
    """QuantEmbeddingBags over 26 int4 tables of random rows (the lookup cost does not depend on
    the values), kernel "auto"."""
    from embq.artifact.schema import QuantizedTable
    from embq.runtime.bags import build_embedding_bags

    rng = np.random.default_rng(1)
    tables = []
    for i in range(FEATURES):
        codes = rng.integers(0, 256, (rows, DIM // 2 + 4), dtype=np.uint8)
        codes[:, -4:] = np.frombuffer(np.float16([0.01, -0.05]).tobytes(), np.uint8)
        tables.append(QuantizedTable(f"t_f{i}", rows, DIM, [f"f{i}"], "SUM", "int4", codes, {}, {}))
    return build_embedding_bags(tables, kernel="auto")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="rows of the largest table")
    parser.add_argument("--calls", type=int, default=300, help="timed calls per figure")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1, as scripts/bench_serving.py)")  # fmt: skip
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    from embq.runtime.validate import SparseCheck

    names = [f"f{i}" for i in range(FEATURES)]
    sizes = {
        "uniform": [args.rows] * FEATURES,
        "mixed": [int(r) for r in np.geomspace(1000, args.rows, FEATURES).round()],
    }
    results: dict[str, float] = {}
    lines = []
    for kind, rows in sizes.items():
        check = SparseCheck(names, [f"t_{n}" for n in names], rows)
        scripted = torch.jit.script(check)
        for pooling in (20, 1):
            values, offsets = inputs(rows, pooling)
            tag = f"{kind}_p{pooling}"
            results[f"check_scripted_{tag}_us"] = median_us(
                lambda v=values, o=offsets, f=scripted: f(v, o), args.calls
            )
            results[f"check_eager_{tag}_us"] = median_us(
                lambda v=values, o=offsets, f=check: f(v, o), args.calls
            )
            lines.append((tag, values.numel(), results[f"check_scripted_{tag}_us"],
                          results[f"check_eager_{tag}_us"]))  # fmt: skip
    values, offsets = inputs(sizes["uniform"], 20)
    results["offsets_compare_us"] = median_us(
        lambda: bool((offsets[1:] < offsets[:-1]).any()), args.calls
    )
    results["aminmax_ids_us"] = median_us(lambda: torch.aminmax(values), args.calls)
    bags = int4_bags(args.rows)
    def old_check() -> None:
        """What the TBE's own check cost before (`CheckedTBE._check`, every id below the
        smallest table): one min / max over the ids, read back."""
        low, high = torch.aminmax(values)
        int(low), int(high)

    with torch.inference_mode():
        timed = interleaved_medians({
            "unchecked": lambda: bags._lookup_checked_input(values, offsets, BATCH),
            "old": lambda: (old_check(), bags._lookup_checked_input(values, offsets, BATCH)),
            "checked": lambda: bags(values, offsets),
        }, max(60, args.calls), rounds=10)  # fmt: skip
    checked, unchecked = timed["checked"], timed["unchecked"]
    results["int4_lookup_checked_us"] = checked
    results["int4_lookup_old_check_us"] = timed["old"]
    results["int4_lookup_unchecked_us"] = unchecked
    results["check_share_of_int4_lookup"] = round((checked - unchecked) / checked, 4)
    results["check_added_vs_old_check_us"] = checked - timed["old"]

    print(f"input check at batch {BATCH}, {FEATURES} features; medians of {args.calls} calls, "
          f"{torch.get_num_threads()} torch threads, wall clock (shared machine: noisy)")  # fmt: skip
    print(f"{'tables / ids per bag':<22} {'ids':>8} {'scripted us':>12} {'eager us':>10}")
    for tag, n, s, e in lines:
        print(f"{tag:<22} {n:>8,} {s:>12.1f} {e:>10.1f}")
    print(f"offsets comparison alone: {results['offsets_compare_us']:.1f} us; one aminmax over "
          f"the ids: {results['aminmax_ids_us']:.1f} us")  # fmt: skip
    print(f"int4 lookups (TBE, {args.rows:,} rows x {DIM}, uniform p20): {checked:,.0f} us with "
          f"the check, {timed['old']:,.0f} us with the old one-min/max check, {unchecked:,.0f} us "
          "without any")  # fmt: skip
    results = {k: round(v, 1) if k.endswith("_us") else v for k, v in results.items()}
    print(json.dumps({"batch": BATCH, "features": FEATURES, "rows": args.rows,
                      "threads": torch.get_num_threads(), "calls": args.calls, **results}))  # fmt: skip


if __name__ == "__main__":
    main()
