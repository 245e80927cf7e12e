"""Preprocessing against an independent line-by-line reference written in plain Python."""

import gzip
import json
import math
from collections import Counter

import numpy as np
import pytest

from embq.data.prepared import PreparedData
from embq.data.preprocess import prepare_criteo
from embq.data.synth import SynthConfig, write_synthetic
from embq.errors import ConfigError, DataError


def reference_rows(path):
    """Plain-Python parse of a raw file: per valid line (label, [13 ints|None], [26 hashes|None])."""
    rows = []
    for line in open(path, encoding="ascii").read().splitlines():
        fields = line.split("\t")
        fields += [""] * (40 - len(fields))
        ints = [int(x) if x else None for x in fields[1:14]]
        cats = [int(x, 16) if x else None for x in fields[14:40]]
        rows.append((int(fields[0]), ints, cats))
    return rows


@pytest.fixture(scope="module")
def raw_file(tmp_path_factory):
    config = SynthConfig(cardinalities=[50, 7, 3000, *[20] * 23], strip_fraction=0.5)
    return write_synthetic(tmp_path_factory.mktemp("raw") / "raw.tsv", rows=3000, seed=11,
                           config=config, progress=False)


def test_hash_mode_equals_reference(raw_file, tmp_path):
    size = 997
    summary = prepare_criteo([raw_file], tmp_path / "out", table_size=size, progress=False)
    data = PreparedData(tmp_path / "out")
    ref = reference_rows(raw_file)
    assert summary["rows_read"] == len(ref) == data.rows and summary["rows_refused"] == 0
    exp_dense = np.array([[math.log1p(max(v, 0)) if v is not None else 0.0 for v in r[1]] for r in ref])
    exp_sparse = np.array([[(v or 0) % size for v in r[2]] for r in ref])
    np.testing.assert_allclose(data.dense, exp_dense, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(data.sparse, exp_sparse)
    np.testing.assert_array_equal(data.labels[:, 0], [r[0] for r in ref])
    assert data.dense.dtype == np.float32 and data.sparse.dtype == np.int64 and data.labels.dtype == np.int32
    for f in range(26):
        assert summary["cardinalities"][f"cat_{f}"] == len(set(exp_sparse[:, f]))
        missing = sum(r[2][f] is None for r in ref) / len(ref)
        assert summary["missing_rates"][f"cat_{f}"] == pytest.approx(missing)
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["rows_read"] == summary["rows_read"]


def test_frequency_mode_equals_reference(raw_file, tmp_path):
    prepare_criteo([raw_file], tmp_path / "out", mode="frequency", min_frequency=3, progress=False)
    data = PreparedData(tmp_path / "out")
    ref = reference_rows(raw_file)
    for f in (0, 2, 5):
        counts = Counter(r[2][f] for r in ref if r[2][f] is not None)
        kept = sorted(v for v, c in counts.items() if c >= 3)
        index = {v: i + 1 for i, v in enumerate(kept)}
        expected = [index.get(r[2][f], 0) for r in ref]
        np.testing.assert_array_equal(data.sparse[:, f], expected)
        assert data.num_embeddings[f] == len(kept) + 1


def test_refused_lines_are_reported_in_summary(tmp_path):
    good = "\t".join(["1", *["1"] * 13, *["0000000a"] * 26])
    p = tmp_path / "raw.tsv"
    p.write_text(good + "\nnot a row\n" + good + "\n")
    summary = prepare_criteo([p], tmp_path / "out", table_size=10, progress=False)
    assert summary["rows_read"] == 2 and summary["rows_refused"] == 1
    assert summary["refused_examples"][0].endswith(":2: label must be 0 or 1")
    with pytest.raises(DataError, match="raw.tsv:2"):
        prepare_criteo([p], tmp_path / "strict", strict=True, progress=False)
    assert not (tmp_path / "strict").exists() and not (tmp_path / "strict.partial").exists()


def test_nothing_is_overwritten_and_empty_input_is_refused(raw_file, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        prepare_criteo([raw_file], tmp_path / "taken", progress=False)
    empty = tmp_path / "empty.tsv"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="No valid Criteo rows"):
        prepare_criteo([empty], tmp_path / "out", progress=False)


def test_batches_are_keyed_jagged_tensors(raw_file, tmp_path):
    prepare_criteo([raw_file], tmp_path / "out", table_size=100, progress=False)
    data = PreparedData(tmp_path / "out")
    batch = next(data.batches(0, 10, batch_size=4))
    assert batch.dense.shape == (4, 13) and batch.labels.shape == (4,)
    assert batch.sparse.keys() == [f"cat_{i}" for i in range(26)]
    np.testing.assert_array_equal(batch.sparse["cat_3"].values().numpy(), data.sparse[:4, 3])


def test_output_loads_in_torchrecs_criteo_pipe(raw_file, tmp_path):
    """Our .npy layout is TorchRec's: its in-memory Criteo datapipe batches our files as they are."""
    from torchrec.datasets.criteo import InMemoryBinaryCriteoIterDataPipe

    prepare_criteo([raw_file], tmp_path / "out", table_size=1000, progress=False)
    out = tmp_path / "out"
    pipe = InMemoryBinaryCriteoIterDataPipe(
        stage="train", dense_paths=[str(out / "dense.npy")], sparse_paths=[str(out / "sparse.npy")],
        labels_paths=[str(out / "labels.npy")], batch_size=64, rank=0, world_size=1,
        hashes=[1000] * 26)
    batch = next(iter(pipe))
    data = PreparedData(out)
    np.testing.assert_array_equal(batch.dense_features.numpy(), data.dense[:64])
    np.testing.assert_array_equal(batch.sparse_features["cat_0"].values().numpy(), data.sparse[:64, 0])
    np.testing.assert_array_equal(batch.labels.numpy().reshape(-1), data.labels[:64, 0])


def test_cli_refuses_binary_lines_and_reads_gzip(raw_file, tmp_path, capsys):
    """`embq data prepare` on Terabyte-style `day_N.gz` input holding a binary line: the line is
    refused and reported, the rows equal those prepared from the plain file."""
    from embq.cli import main

    lines = raw_file.read_bytes().split(b"\n")
    lines.insert(100, b"1\t\xff\xd8\xff\xe0 JFIF \x00\x01")
    dirty = b"\n".join(lines)
    day = tmp_path / "day_0.gz"
    day.write_bytes(gzip.compress(dirty))
    common = ["--table-size", "997", "--quiet"]
    assert main(["data", "prepare", "--input", str(day), "--output", str(tmp_path / "gz"), *common]) == 0
    assert main(["data", "prepare", "--input", str(raw_file), "--output", str(tmp_path / "plain"),
                 *common]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "gz" / "summary.json").read_text())
    assert summary["rows_refused"] == 1
    assert summary["refused_examples"] == [f"{day}:101: byte 0xff is not printable ASCII (binary data?)"]
    got, want = PreparedData(tmp_path / "gz"), PreparedData(tmp_path / "plain")
    assert got.rows == want.rows == 3000
    for k in ("dense", "sparse", "labels"):
        np.testing.assert_array_equal(getattr(got, k), getattr(want, k))
    capsys.readouterr()

    assert main(["data", "prepare", "--input", str(day), "--output", str(tmp_path / "s"), "--strict",
                 *common]) == 2  # fmt: skip
    assert f"{day}:101: byte 0xff" in capsys.readouterr().err
    day.write_bytes(day.read_bytes()[: day.stat().st_size // 2])  # an interrupted download
    assert main(["data", "prepare", "--input", str(day), "--output", str(tmp_path / "t"), *common]) == 2
    assert "day_0.gz: the gzip stream is truncated or corrupt" in capsys.readouterr().err
    assert not (tmp_path / "t").exists() and not (tmp_path / "t.partial").exists()
