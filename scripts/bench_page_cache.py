"""Serving from the page cache: resident anonymous vs file-backed memory of a process that serves
random ids from an int4 artifact larger than its memory budget, with kernel="compact".

    python scripts/bench_page_cache.py --quick            # 0.3 GiB artifact, ~1 min
    python scripts/bench_page_cache.py                    # 2 GiB artifact, budget 1 GiB

1. Writes one int4 table of `--rows` x `--dim` with embq's artifact writer: 65536 seeded rows
   encoded by the format, tiled over the table (resident memory does not depend on the values).
2. Serves it in a subprocess (`embq.runtime.bags.load_embedding_bags(kernel=...)`, pooled bags of
   `--pooling` uniform random ids per sample, batch `--batch`) while this process polls
   /proc/<pid>/status every 20 ms: RssAnon (private memory: Python, torch, kernels' copies),
   RssFile (pages of the mapped artifact resident in the page cache: clean, shared, and dropped
   by the kernel under memory pressure), VmData. Phases: after imports, after load, after serving.
3. The same with kernel="auto" (fbgemm TBE: the rows are copied into anonymous memory) when
   `--compare-auto`, and the serving process under RLIMIT_DATA / RLIMIT_AS (set after its imports
   to what it holds then plus the budget), to show which limit a memory-mapped artifact survives.

Prints a table, then one JSON line. Timings on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MIB = 1 << 20
TILE_ROWS = 65536
STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmData", "VmSize")


def read_status(pid: int | str = "self") -> dict[str, int]:
    """The memory lines of /proc/<pid>/status, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in STATUS_KEYS:
                out[key] = int(value.split()[0]) * 1024
    return out


# ----------------------------------------------------------------------------- the artifact


def write_artifact(path: Path, rows: int, dim: int, fmt: str) -> float:
    """One `fmt` table of rows x dim: 65536 seeded normal rows encoded by embq's format, tiled
    over the table (what is measured, resident memory, does not depend on the values; encoding
    every row of a GiB-sized table costs many minutes on this machine). Returns seconds."""
    from embq.artifact.writer import ArtifactWriter
    from embq.embedding.registry import get_format

    started = time.perf_counter()
    block = np.random.default_rng(0).standard_normal((TILE_ROWS, dim), dtype=np.float32) * 0.05
    codes = get_format(fmt).encode(block, {})
    writer = ArtifactWriter(path)
    table = writer.begin_table("big", fmt, rows, dim, feature_names=["f0"])
    for start in range(0, rows, TILE_ROWS):
        table.write_rows(start, codes[: min(TILE_ROWS, rows - start)])
    table.close()
    writer.publish()
    return time.perf_counter() - started


# ----------------------------------------------------------------------------- the server


def serve(artifact: str, kernel: str, batches: int, batch: int, pooling: int, seed: int,
          limit: str | None = None) -> None:
    """Child process: load, then serve `batches` batches of uniform random ids; prints JSON.
    `limit` "RLIMIT_X=BYTES" is set after the imports (it would otherwise refuse the imports)."""
    phases = {"start": read_status()}
    import torch

    from embq.runtime.bags import load_embedding_bags

    torch.set_num_threads(1)
    phases["imported"] = read_status()
    if limit:
        name, value = limit.split("=")
        resource.setrlimit(getattr(resource, name), (int(value), int(value)))
    t0 = time.perf_counter()
    bags = load_embedding_bags(artifact, kernel=kernel)
    load_s = time.perf_counter() - t0
    phases["loaded"] = read_status()
    rows = int(json.loads((Path(artifact) / "manifest.json").read_text())["tables"][0]["rows"])
    rng = np.random.default_rng(seed)
    offsets = torch.arange(0, batch * pooling + 1, pooling, dtype=torch.int64)
    times = []
    with torch.no_grad():
        for i in range(batches):
            ids = torch.from_numpy(rng.integers(0, rows, batch * pooling, dtype=np.int64))
            t = time.perf_counter()
            out = bags(ids, offsets)
            times.append(time.perf_counter() - t)
            if i == batches // 2:
                phases["half_served"] = read_status()
    if tuple(out.shape) != (batch, 64) and out.shape[0] != batch:
        raise RuntimeError(f"unexpected output shape {tuple(out.shape)}")
    phases["served"] = read_status()
    print(json.dumps({"phases": phases, "load_seconds": load_s,
                      "batch_ms_median": 1e3 * float(np.median(times)),
                      "batch_ms_p99": 1e3 * float(np.quantile(times, 0.99)),
                      "ids_looked_up": batches * batch * pooling, "rows": rows}))


def run_server(args: argparse.Namespace, artifact: Path, kernel: str,
               limit: tuple[str, int] | None = None) -> dict:
    """Serve in a subprocess (optionally under an rlimit) and poll its /proc status for peaks."""
    cmd = [sys.executable, __file__, "--serve", str(artifact), "--kernel", kernel,
           "--batches", str(args.batches), "--batch", str(args.batch),
           "--pooling", str(args.pooling)]
    if limit is not None:
        cmd += ["--limit", f"{limit[0]}={limit[1]}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip
    peak: dict[str, int] = {}
    while proc.poll() is None:
        try:
            for k, v in read_status(proc.pid).items():
                peak[k] = max(peak.get(k, 0), v)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode != 0:
        return {"ok": False, "returncode": proc.returncode,
                "error": (err.strip().splitlines() or ["(no stderr)"])[-1][:300], "peak": peak}
    return {"ok": True, **json.loads(out.strip().splitlines()[-1]), "peak": peak}


# ----------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="0.3 GiB artifact, budget 256 MiB")
    p.add_argument("--rows", type=int, help="table rows (default: 2 GiB of int4 dim 64)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--format", default="int4")
    p.add_argument("--budget-mib", type=int, help="memory a server may use (default 1024; quick 256)")
    p.add_argument("--batches", type=int, default=400)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--pooling", type=int, default=20, help="ids per sample")
    p.add_argument("--compare-auto", action="store_true", help="also serve with kernel=auto (TBE)")
    p.add_argument("--workdir", default="runs/bench_page_cache")
    p.add_argument("--keep", action="store_true", help="keep the artifact afterwards")
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--kernel", default="compact", help=argparse.SUPPRESS)
    p.add_argument("--limit", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.kernel, args.batches, args.batch, args.pooling, 0, args.limit)
        return 0

    row_bytes = args.dim // 2 + 4 if args.format == "int4" else None
    target = (300 if args.quick else 2048) * MIB
    rows = args.rows or target // (row_bytes or (args.dim + 4))
    budget = (args.budget_mib or (256 if args.quick else 1024)) * MIB
    work = Path(args.workdir)
    artifact = work / "big.embq"
    if artifact.exists():
        shutil.rmtree(artifact)
    work.mkdir(parents=True, exist_ok=True)
    print(f"writing a {args.format} table of {rows} x {args.dim} ...", file=sys.stderr)
    write_s = write_artifact(artifact, rows, args.dim, args.format)
    art_bytes = sum(f.stat().st_size for f in artifact.rglob("*") if f.is_file())
    try:
        runs = {"compact": run_server(args, artifact, "compact")}
        if args.compare_auto:
            runs["auto"] = run_server(args, artifact, "auto")
        # Limits set after the imports: `budget` more bytes than the process holds by then.
        imported = runs["compact"]["phases"]["imported"] if runs["compact"]["ok"] else {}
        for name in ("RLIMIT_DATA", "RLIMIT_AS"):
            base = imported.get("VmData" if name == "RLIMIT_DATA" else "VmSize", 0)
            runs[f"compact, {name}=+budget"] = run_server(args, artifact, "compact",
                                                          (name, base + budget))
    finally:
        if not args.keep:
            shutil.rmtree(artifact, ignore_errors=True)

    print(f"artifact {art_bytes / MIB:.0f} MiB ({rows} rows x {args.dim}, {args.format}), "
          f"budget {budget / MIB:.0f} MiB; {args.batches} batches of {args.batch} x {args.pooling} "
          "uniform random ids")
    print(f"{'run':<30} {'ok':<4} {'RssAnon MiB':>12} {'RssFile MiB':>12} {'VmData MiB':>11} "
          f"{'anon served-imported':>21} {'batch ms (median)':>18}")
    result = {"artifact_bytes": art_bytes, "rows": rows, "dim": args.dim, "format": args.format,
              "budget_bytes": budget, "write_seconds": round(write_s, 1)}
    for name, r in runs.items():
        peak = r["peak"]
        if r["ok"]:
            grown = r["phases"]["served"]["RssAnon"] - r["phases"]["imported"]["RssAnon"]
            print(f"{name:<30} {'yes':<4} {peak.get('RssAnon', 0) / MIB:>12.0f} "
                  f"{peak.get('RssFile', 0) / MIB:>12.0f} {peak.get('VmData', 0) / MIB:>11.0f} "
                  f"{grown / MIB:>21.0f} {r['batch_ms_median']:>18.2f}")
            result[name] = {"peak_rss_anon": peak.get("RssAnon"), "peak_rss_file": peak.get("RssFile"),
                            "peak_vm_data": peak.get("VmData"), "anon_growth_after_imports": grown,
                            "phases": r["phases"], "load_seconds": round(r["load_seconds"], 2),
                            "batch_ms_median": round(r["batch_ms_median"], 3),
                            "batch_ms_p99": round(r["batch_ms_p99"], 3)}  # fmt: skip
        else:
            print(f"{name:<30} {'no':<4} {'':>12} {'':>12} {'':>11} {'':>21} {'':>18}  "
                  f"{r['error'][:120]}")
            result[name] = {"ok": False, "error": r["error"]}
    compact = result["compact"]
    result["anon_within_budget"] = bool(compact["peak_rss_anon"] <= budget)
    result["artifact_over_budget"] = bool(art_bytes > budget)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
