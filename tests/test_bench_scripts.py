"""The benchmark scripts that drive embq's CLI in a subprocess still run end to end (on tiny
sizes): bench_stream lost its way to `embq quantize-table` once when the CLI became a package."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_stream_quantizes_a_table_through_the_cli(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_stream.py"), "--rows", "3000", "--dim", "16",
         "--chunk-rows", "1024", "--workdir", str(tmp_path)],  # fmt: skip
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["rows"] == 3000 and figures["format"] == "int4"
    assert figures["output_bytes"] >= 3000 * (16 // 2 + 4)  # int4 rows of dim 16: 12 bytes each
    assert figures["peak_rss_mib"] > 0
