"""Check that `embq data prepare` under torchrun writes the same bytes as one process.

Used by the tests and by `scripts/bench_scale.py --quick` (`prepare_identical_across_ranks`). The
inputs are small synthetic Criteo-format files of uneven sizes: one gzip-compressed, one empty,
one with malformed lines (refused and counted), so file splitting, count merging over several
rounds and refusal bookkeeping are all exercised.
"""

from __future__ import annotations

import contextlib
import filecmp
import gzip
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from embq.data.prepared import DENSE_FILE, LABELS_FILE, SPARSE_FILE, SUMMARY_FILE
from embq.data.synth import SynthConfig, write_synthetic

COMPARED_FILES = (DENSE_FILE, SPARSE_FILE, LABELS_FILE, SUMMARY_FILE)
BAD_LINES = b"2\t1\n1\tx\n\n0" + b"\t" * 45 + b"\n"


def write_check_inputs(workdir: Path, seed: int = 5) -> list[Path]:
    """Four raw files of uneven sizes in `workdir`: plain, gzip, empty, plain with bad lines."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = SynthConfig(cardinalities=[40, 7, 900, 3, *[25] * 22], strip_fraction=0.3)
    rows = {"part_a.tsv": 1700, "part_b.tsv": 260, "part_d.tsv": 900}
    paths = {name: write_synthetic(workdir / name, rows=n, seed=seed + i, config=config,
                                   progress=False)  # fmt: skip
             for i, (name, n) in enumerate(rows.items())}
    gz = workdir / "part_b.tsv.gz"
    gz.write_bytes(gzip.compress(paths["part_b.tsv"].read_bytes()))
    paths["part_b.tsv"].unlink()
    empty = workdir / "part_c.tsv"
    empty.write_bytes(b"")
    with open(paths["part_d.tsv"], "ab") as f:
        f.write(BAD_LINES)
    return [paths["part_a.tsv"], gz, empty, paths["part_d.tsv"]]


def prepare_args(inputs: list[Path], output: Path, mode: str) -> list[str]:
    """`embq data prepare` arguments shared by both runs (small tables, several merge rounds)."""
    return ["data", "prepare", "--quiet", "--mode", mode, "--table-size", "97",
            "--min-frequency", "2", "--merge-values", "7", "--output", str(output),
            "--input", *map(str, inputs)]


def run_torchrun(args: list[str], nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m embq ARGS` (a free port, gloo on CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "embq", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def same_bytes(a: Path, b: Path) -> bool:
    """Whether two prepared dataset directories hold byte-identical arrays and summaries."""
    return all(filecmp.cmp(a / f, b / f, shallow=False) for f in COMPARED_FILES)


def prepare_identical_across_ranks(workdir: Path, nproc: int = 2) -> bool:
    """Prepare the check inputs (hash and frequency modes) with `nproc` torchrun ranks and with
    one process; True when every output file is byte-identical. Raises RuntimeError with the
    ranks' output when the torchrun job fails."""
    from embq.cli import main as embq_main

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # A fresh directory per call (a rerun in the same workdir must not meet its old outputs),
    # removed afterwards: it holds only this check's small files.
    run = Path(tempfile.mkdtemp(prefix="prepare-check-", dir=workdir))
    try:
        inputs = write_check_inputs(run / "raw")
        for mode in ("hash", "frequency"):
            single, ranks = run / f"single-{mode}", run / f"ranks-{mode}"
            with contextlib.redirect_stdout(io.StringIO()):  # the CLI's JSON line is not ours
                failed = embq_main(prepare_args(inputs, single, mode)) != 0
            if failed:
                raise RuntimeError(f"one-process prepare failed ({mode} mode)")
            done = run_torchrun(prepare_args(inputs, ranks, mode), nproc)
            if done.returncode != 0:
                raise RuntimeError(f"torchrun prepare failed ({mode} mode):\n{done.stderr[-4000:]}")
            if not same_bytes(single, ranks):
                return False
        return True
    finally:
        shutil.rmtree(run, ignore_errors=True)
