"""The synthetic Criteo-format generator: deterministic, as configured, readable as real data."""

import hashlib

import numpy as np
import pytest

from embq.data.criteo import ReadReport, read_criteo
from embq.data.synth import BLOCK_ROWS, SynthConfig, write_synthetic
from embq.errors import ConfigError


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_deterministic_by_seed(tmp_path):
    a = write_synthetic(tmp_path / "a", rows=5000, seed=7, progress=False)
    b = write_synthetic(tmp_path / "b", rows=5000, seed=7, progress=False)
    c = write_synthetic(tmp_path / "c", rows=5000, seed=8, progress=False)
    assert digest(a) == digest(b) != digest(c)
    # A longer file starts with the same rows: blocks do not depend on the total.
    d = write_synthetic(tmp_path / "d", rows=BLOCK_ROWS + 10, seed=7, progress=False)
    assert d.read_bytes().startswith(a.read_bytes())


def test_layout_cardinalities_and_missing_rates(tmp_path):
    cards = [3, 10, 200, *[5] * 23]
    int_missing = [0.0, 0.5, *[0.1] * 11]
    cat_missing = [0.3, *[0.0] * 24, 0.9]
    config = SynthConfig(cardinalities=cards, int_missing=int_missing, cat_missing=cat_missing,
                         strip_fraction=1.0)
    path = write_synthetic(tmp_path / "s", rows=40_000, seed=1, config=config, progress=False)
    report = ReadReport()
    chunks = list(read_criteo(path, report, strict=True))
    assert report.rows_read == 40_000 and report.rows_refused == 0
    cats = np.concatenate([c.cats for c in chunks])
    cat_missing_seen = np.concatenate([c.cat_missing for c in chunks])
    int_missing_seen = np.concatenate([c.int_missing for c in chunks])
    for f in (0, 1, 2):
        assert len(np.unique(cats[~cat_missing_seen[:, f], f])) == cards[f]
    np.testing.assert_allclose(int_missing_seen.mean(0), int_missing, atol=0.01)
    np.testing.assert_allclose(cat_missing_seen.mean(0), cat_missing, atol=0.01)
    ints = np.concatenate([c.ints for c in chunks])
    assert (ints[:, 1] == -1).any() and (ints >= -1).all()
    # strip_fraction=1: rows whose last field is empty have no trailing tabs.
    lines = path.read_text().splitlines()
    assert all(not line.endswith("\t") for line in lines)
    assert any(line.count("\t") < 39 for line in lines)
    labels = np.concatenate([c.labels for c in chunks])
    assert 0.1 < labels.mean() < 0.4


def test_zipf_frequent_values_dominate(tmp_path):
    path = write_synthetic(tmp_path / "s", rows=20_000, seed=2, progress=False)
    cats = np.concatenate([c.cats for c in read_criteo(path)])
    _, counts = np.unique(cats[:, 0], return_counts=True)
    counts = np.sort(counts)[::-1]
    assert counts[:100].sum() > 0.3 * counts.sum()  # a head of frequent ids
    assert (counts == 1).sum() > 1000  # and a long tail of rare ones


def test_bad_config_and_overwrite(tmp_path):
    with pytest.raises(ConfigError):
        SynthConfig(cardinalities=[10] * 25)
    with pytest.raises(ConfigError):
        SynthConfig(int_missing=[1.5] * 13)
    (tmp_path / "x").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        write_synthetic(tmp_path / "x", rows=10, progress=False)
    assert (tmp_path / "x").read_text() == "mine"


def test_shipped_sample_matches_the_generator(tmp_path):
    from tests.conftest import ROOT

    fresh = write_synthetic(tmp_path / "sample.tsv", rows=1000, seed=0, progress=False)
    assert fresh.read_bytes() == (ROOT / "datasets" / "synthetic-criteo-sample.tsv").read_bytes()
