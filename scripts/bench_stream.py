"""Benchmark: quantize a table far larger than the chunk, and measure the quantizer's peak RSS.

Writes a 4 GiB fp32 table (16,777,216 x 64, N(0, 0.05)) as .npy in chunks (never in RAM), runs
`embq quantize-table --format int4` on it as a subprocess under `/usr/bin/time -v`, checks a
random sample of output rows against a one-shot encode, prints a table and, last, one JSON line:

    {"rows", "dim", "format", "input_bytes", "output_bytes", "peak_rss_mib", "seconds"}

Target: peak RSS <= 1 GiB. Needs ~5 GB free disk in --workdir (default: a temp dir under /tmp);
the files are deleted afterwards unless --keep. Note the input was just written, so it is largely
in the page cache: `seconds` measures quantization, not a cold disk read.

    python scripts/bench_stream.py [--rows N] [--dim D] [--format int4] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GEN_CHUNK_ROWS = 1 << 18


def write_table(path: Path, rows: int, dim: int, seed: int = 0) -> int:
    """Write float32 [rows, dim] N(0, 0.05) as .npy, chunk by chunk. Returns the file's bytes."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (rows, dim)}
        )
        for start in range(0, rows, GEN_CHUNK_ROWS):
            n = min(GEN_CHUNK_ROWS, rows - start)
            chunk = rng.standard_normal((n, dim), dtype=np.float32)
            chunk *= 0.05
            f.write(chunk.tobytes())
    return path.stat().st_size


def quantize_command() -> list[str]:
    """`embq quantize-table`, run as `python -m embq` so that no console script is needed."""
    return [sys.executable, "-m", "embq", "quantize-table"]


def run_measured(cmd: list[str]) -> tuple[float, float, str]:
    """Run `cmd`; return (peak RSS in MiB, wall seconds, its stdout)."""
    extra = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), extra]))}
    timer = Path("/usr/bin/time").exists()
    start = time.perf_counter()
    if timer:
        cmd = ["/usr/bin/time", "-v", *cmd]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"quantize-table failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    if timer:
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        peak_kib = int(m.group(1))
    else:  # ru_maxrss of waited-for children, KiB on Linux
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return peak_kib / 1024, seconds, proc.stdout


def check_sample(table: Path, artifact: Path, format_name: str, n: int = 4096) -> None:
    """Compare n random output rows with the format's one-shot encode of the same input rows."""
    from embq.artifact.reader import load_artifact
    from embq.embedding.registry import get_format

    src = np.load(table, mmap_mode="r")
    art = load_artifact(artifact, verify=True)
    t = art.table(art.table_names()[0])
    idx = np.sort(np.random.default_rng(1).choice(src.shape[0], min(n, src.shape[0]), replace=False))
    want = get_format(format_name).encode(np.asarray(src[idx]), t.params)
    if not np.array_equal(np.asarray(t.rows[idx]), want):
        sys.exit("output rows differ from a one-shot encode of the same input rows")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", type=int, default=16_777_216)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--format", default="int4")
    p.add_argument("--chunk-rows", type=int, default=65_536)
    p.add_argument("--workdir", type=Path, help="where big files go (default: a temp dir in /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the input and output files")
    args = p.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="embq-bench-", dir=args.workdir))
    need = args.rows * args.dim * 4 * 1.3
    free = shutil.disk_usage(workdir).free
    if free < need:
        shutil.rmtree(workdir)
        sys.exit(f"need ~{need / 2**30:.1f} GiB free in {workdir.parent}, have {free / 2**30:.1f}")
    table, out = workdir / "table.npy", workdir / "table.embq"
    try:
        t0 = time.perf_counter()
        input_bytes = write_table(table, args.rows, args.dim)
        print(f"wrote {table} ({input_bytes / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)  # fmt: skip
        cmd = [*quantize_command(), "--input", str(table), "--format", args.format,
               "--output", str(out), "--chunk-rows", str(args.chunk_rows), "--quiet"]  # fmt: skip
        peak_mib, seconds, _ = run_measured(cmd)
        output_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        check_sample(table, out, args.format)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"{'rows':>12} {'dim':>4} {'format':>7} {'input GiB':>10} {'output MiB':>11} "
          f"{'peak RSS MiB':>13} {'seconds':>8} {'rows/s':>11}")  # fmt: skip
    print(f"{args.rows:>12,} {args.dim:>4} {args.format:>7} {input_bytes / 2**30:>10.2f} "
          f"{output_bytes / 2**20:>11.1f} {peak_mib:>13.0f} {seconds:>8.1f} "
          f"{args.rows / seconds:>11,.0f}")  # fmt: skip
    print(f"peak RSS {'within' if peak_mib <= 1024 else 'ABOVE'} the 1 GiB target", file=sys.stderr)
    print(json.dumps({"rows": args.rows, "dim": args.dim, "format": args.format,
                      "input_bytes": input_bytes, "output_bytes": output_bytes,
                      "peak_rss_mib": round(peak_mib, 1),
                      "seconds": round(seconds, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
