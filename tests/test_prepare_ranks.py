"""`embq data prepare` under torchrun: file splitting, and outputs byte-identical to one process
(the one-process preparation is itself tested against a plain-Python reference in
test_preprocess.py)."""

import json

import numpy as np
import pytest

from embq.data.distributed_check import (
    prepare_args,
    prepare_identical_across_ranks,
    run_torchrun,
    same_bytes,
    write_check_inputs,
)
from embq.data.prepare_ranks import split_files
from embq.data.prepared import PreparedData
from embq.data.preprocess import prepare_criteo


@pytest.mark.parametrize("sizes,world", [
    ([10, 1, 0, 7], 2), ([5], 3), ([1, 1, 1, 1, 1], 2), ([0, 0, 0], 2), ([100, 1, 1, 1], 4),
    ([3, 9, 27, 81, 1, 2], 3), ([], 2),
])
def test_split_files_covers_every_file_once_in_order(sizes, world):
    ranges = split_files(sizes, world)
    assert len(ranges) == world
    covered = [i for lo, hi in ranges for i in range(lo, hi)]
    assert covered == list(range(len(sizes)))  # every file once, ranks in file order


def test_split_files_balances_bytes():
    ranges = split_files([10] * 8, 4)
    assert ranges == [(0, 2), (2, 4), (4, 6), (6, 8)]
    # A huge first file takes rank 0 alone; the small rest goes to the others.
    assert split_files([1000, 10, 10, 10], 2) == [(0, 1), (1, 4)]


@pytest.fixture(scope="module")
def check_inputs(tmp_path_factory):
    return write_check_inputs(tmp_path_factory.mktemp("raw"))


def test_torchrun_frequency_mode_is_byte_identical(check_inputs, tmp_path):
    single, ranks = tmp_path / "single", tmp_path / "ranks"
    prepare_criteo(check_inputs, single, mode="frequency", min_frequency=2, table_size=97,
                   progress=False)
    done = run_torchrun(prepare_args(check_inputs, ranks, "frequency"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert same_bytes(single, ranks)
    summary = json.loads((ranks / "summary.json").read_text())
    # Both ranks had rows (rank 0 the first file, rank 1 the rest), refused lines were counted,
    # and counts had to be merged: some value is frequent only over both ranks' files together.
    assert summary["rows_read"] == 1700 + 260 + 900 and summary["rows_refused"] == 4
    data = PreparedData(ranks)
    assert data.rows == 2860 and data.sparse.max() > 0
    assert not list(tmp_path.glob("*.partial"))


def test_frequency_merge_needs_both_ranks(check_inputs, tmp_path):
    """The merged vocabulary differs from either rank's own: a wrong merge could not pass."""
    a = tmp_path / "a"
    b = tmp_path / "b"
    full = tmp_path / "full"
    prepare_criteo(check_inputs[:1], a, mode="frequency", progress=False)
    prepare_criteo(check_inputs[1:], b, mode="frequency", progress=False)
    prepare_criteo(check_inputs, full, mode="frequency", progress=False)
    sizes = [json.loads((d / "summary.json").read_text())["num_embeddings"] for d in (a, b, full)]
    assert sizes[2] != sizes[0] and sizes[2] != sizes[1]
    assert np.all(np.array(sizes[2]) >= np.array(sizes[0]))


def test_failed_rank_fails_the_job_and_leaves_no_output(check_inputs, tmp_path):
    out = tmp_path / "out"
    args = prepare_args(check_inputs, out, "hash") + ["--strict"]  # rank 1's file has bad lines
    done = run_torchrun(args)
    assert done.returncode != 0
    assert "Malformed Criteo line" in done.stderr and "part_d.tsv:90" in done.stderr
    assert "another rank failed" in done.stderr  # rank 0 says why it stopped
    assert not out.exists() and not list(tmp_path.glob("out*"))


def test_existing_output_is_refused_untouched(check_inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    done = run_torchrun(prepare_args(check_inputs, out, "hash"))
    assert done.returncode != 0 and "already exists" in done.stderr
    assert (out / "mine.txt").read_text() == "keep" and sorted(p.name for p in out.iterdir()) == ["mine.txt"]


@pytest.mark.slow
def test_prepare_identical_across_ranks_both_modes(tmp_path):
    assert prepare_identical_across_ranks(tmp_path)
    assert prepare_identical_across_ranks(tmp_path)  # again in the same workdir
    assert list(tmp_path.iterdir()) == []  # it cleans up after itself
