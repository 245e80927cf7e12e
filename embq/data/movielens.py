"""MovieLens-100k (real data) as a click task, from the files the `recbole` wheel bundles.

The task: does a user rate a movie 4 or 5 (a "click")? Each rating becomes one row with

- dense: user age, movie release year and rating time, scaled to about [0, 1];
- sparse (one id per feature): user, movie, gender, occupation, zip-code prefix, age bucket,
  release year, genre set; ids are contiguous per feature, with 0 kept for "unknown".

Rows are shuffled with a fixed seed, so the prepared dataset's last rows are a random held-out
split. GroupLens' terms allow research use only and forbid redistribution: the data is read from
the installed recbole package, never copied into this repository.
"""

from __future__ import annotations

import json
import os
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from embq.data.prepared import DENSE_FILE, LABELS_FILE, SPARSE_FILE, SUMMARY_FILE
from embq.errors import ConfigError, DataError

DENSE_NAMES = ["age", "release_year", "timestamp"]
SPARSE_NAMES = ["user_id", "item_id", "gender", "occupation", "zip3", "age_bucket",
                "release_year_id", "genres"]


def movielens_dir() -> Path:
    """The ml-100k folder inside the installed recbole wheel."""
    try:
        root = resources.files("recbole") / "dataset_example" / "ml-100k"
    except ModuleNotFoundError as exc:
        raise DataError("MovieLens-100k is read from the recbole wheel: "
                        "`pip install --no-deps recbole==1.2.1` (make setup does).") from exc
    path = Path(str(root))
    if not (path / "ml-100k.inter").is_file():
        raise DataError(f"recbole is installed but {path} has no ml-100k.inter.")
    return path


def _read_atomic(path: Path) -> pd.DataFrame:
    """A recbole atomic file: TSV whose header cells are `name:type`."""
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    frame.columns = [c.split(":")[0] for c in frame.columns]
    return frame


def _ids(values: pd.Series) -> np.ndarray:
    """Contiguous ids 1..K in order of first appearance; empty strings map to 0."""
    codes, _ = pd.factorize(values.replace("", np.nan), sort=False)
    return (codes + 1).astype(np.int64)


def load_movielens(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dense float32 (N, 3), sparse int64 (N, 8), labels int32 (N, 1)), rows shuffled by seed."""
    root = movielens_dir()
    inter = _read_atomic(root / "ml-100k.inter")
    users = _read_atomic(root / "ml-100k.user")
    items = _read_atomic(root / "ml-100k.item")
    frame = inter.merge(users, on="user_id", how="left").merge(items, on="item_id", how="left")
    frame = frame.fillna("")
    frame = frame.iloc[np.random.default_rng(seed).permutation(len(frame))].reset_index(drop=True)

    age = pd.to_numeric(frame["age"], errors="coerce").fillna(0).to_numpy()
    year = pd.to_numeric(frame["release_year"], errors="coerce").fillna(1900).to_numpy()
    stamp = pd.to_numeric(frame["timestamp"], errors="coerce").to_numpy()
    dense = np.stack([age / 100.0, (year - 1900.0) / 100.0,
                      (stamp - stamp.min()) / max(1.0, np.ptp(stamp))], axis=1).astype(np.float32)
    age_bucket = pd.cut(age, [0, 18, 25, 35, 45, 50, 56, 200], right=False, labels=False)
    sparse = np.stack([
        _ids(frame["user_id"]), _ids(frame["item_id"]), _ids(frame["gender"]),
        _ids(frame["occupation"]), _ids(frame["zip_code"].str[:3]),
        _ids(pd.Series(age_bucket).astype(str)), _ids(frame["release_year"]), _ids(frame["class"]),
    ], axis=1)
    rating = pd.to_numeric(frame["rating"], errors="raise").to_numpy()
    labels = (rating >= 4).astype(np.int32).reshape(-1, 1)
    return dense, sparse, labels


def prepare_movielens(output: str | os.PathLike, seed: int = 0) -> dict:
    """Write MovieLens-100k as a prepared dataset directory; returns its summary."""
    output = Path(output)
    if output.exists():
        raise ConfigError(f"{output} already exists; choose another --output or remove it first.")
    dense, sparse, labels = load_movielens(seed)
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    np.save(partial / DENSE_FILE, dense)
    np.save(partial / SPARSE_FILE, sparse)
    np.save(partial / LABELS_FILE, labels)
    sizes = [int(sparse[:, f].max()) + 1 for f in range(sparse.shape[1])]
    summary = {
        "dataset": "movielens-100k",
        "source": str(movielens_dir()),
        "rows_read": int(len(labels)),
        "rows_refused": 0,
        "click_rate": float(labels.mean()),
        "label": "rating >= 4",
        "dense_feature_names": DENSE_NAMES,
        "sparse_feature_names": SPARSE_NAMES,
        "num_embeddings": sizes,
        "cardinalities": {n: s - 1 for n, s in zip(SPARSE_NAMES, sizes)},
        "missing_rates": {n: float((sparse[:, f] == 0).mean()) for f, n in enumerate(SPARSE_NAMES)},
        "shuffle_seed": seed,
    }
    (partial / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    os.replace(partial, output)
    return summary
