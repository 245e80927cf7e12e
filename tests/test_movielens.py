"""MovieLens-100k from the recbole wheel, checked against the raw bundled file."""

import numpy as np
import pandas as pd

from embq.data.movielens import load_movielens, movielens_dir, prepare_movielens
from embq.data.prepared import PreparedData


def test_clicks_match_the_raw_ratings(tmp_path):
    raw = pd.read_csv(movielens_dir() / "ml-100k.inter", sep="\t")
    assert len(raw) == 100_000
    dense, sparse, labels = load_movielens(seed=0)
    assert dense.shape == (100_000, 3) and sparse.shape == (100_000, 8)
    assert labels.mean() == (raw["rating:float"] >= 4).mean()
    assert len(np.unique(sparse[:, 0])) == raw["user_id:token"].nunique() == 943
    assert len(np.unique(sparse[:, 1])) == raw["item_id:token"].nunique() == 1682
    assert sparse.min() >= 0 and np.isfinite(dense).all()


def test_prepared_directory(tmp_path):
    summary = prepare_movielens(tmp_path / "ml")
    data = PreparedData(tmp_path / "ml")
    assert data.rows == summary["rows_read"] == 100_000
    assert (data.sparse.max(0) < np.array(data.num_embeddings)).all()
    batch = next(data.batches(0, 8, batch_size=8))
    assert batch.sparse.keys()[:2] == ["user_id", "item_id"]
