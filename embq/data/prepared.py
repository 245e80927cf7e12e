"""Prepared datasets on disk and their batches.

A prepared dataset is a directory, laid out like TorchRec's Criteo `.npy` files:

    dense.npy     float32 (rows, n_dense)   dense features, already transformed
    sparse.npy    int64   (rows, n_sparse)  one id per categorical feature, in [0, table rows)
    labels.npy    int32   (rows, 1)         0 / 1 clicks
    summary.json  feature names, table sizes (`num_embeddings`), counts and missing rates

Arrays are opened memory-mapped, so a dataset larger than RAM can be batched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from embq.errors import DataError

DENSE_FILE, SPARSE_FILE, LABELS_FILE, SUMMARY_FILE = "dense.npy", "sparse.npy", "labels.npy", "summary.json"


@dataclass
class Batch:
    """One mini-batch: dense [B, n_dense] float32, sparse KeyedJaggedTensor (one id per feature
    per row), labels [B] float32."""

    dense: torch.Tensor
    sparse: object  # torchrec.sparse.jagged_tensor.KeyedJaggedTensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def ids_to_kjt(ids: np.ndarray | torch.Tensor, feature_names: list[str]):
    """A KeyedJaggedTensor holding one id per feature per row.

    `ids` is int64 of shape (B, F). The KJT is key-major: the B values of feature 0, then of
    feature 1, ..., with every length 1.
    """
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    ids = torch.as_tensor(np.array(ids, dtype=np.int64))
    batch, n_features = ids.shape
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(feature_names),
        values=ids.t().reshape(-1),
        lengths=torch.ones(batch * n_features, dtype=torch.int32),
    )


class PreparedData:
    """A prepared dataset directory, memory-mapped.

    Example:
        data = PreparedData("datasets/prepared/synth")
        train, valid = data.split(valid_fraction=0.1)
        for batch in data.batches(*train, batch_size=1024):
            ...
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        for name in (DENSE_FILE, SPARSE_FILE, LABELS_FILE, SUMMARY_FILE):
            if not (self.path / name).is_file():
                raise DataError(f"{self.path} is not a prepared dataset: {name} is missing. "
                                "Run `embq data prepare` first.")
        self.summary = json.loads((self.path / SUMMARY_FILE).read_text())
        self.dense = np.load(self.path / DENSE_FILE, mmap_mode="r")
        self.sparse = np.load(self.path / SPARSE_FILE, mmap_mode="r")
        self.labels = np.load(self.path / LABELS_FILE, mmap_mode="r")
        rows = {len(self.dense), len(self.sparse), len(self.labels)}
        if len(rows) != 1:
            raise DataError(f"{self.path}: dense, sparse and labels disagree on the row count ({rows}).")
        if self.sparse.shape[1] != len(self.sparse_feature_names):
            raise DataError(f"{self.path}: sparse.npy has {self.sparse.shape[1]} columns but "
                            f"summary.json names {len(self.sparse_feature_names)} features.")

    @property
    def rows(self) -> int:
        return int(len(self.labels))

    @property
    def dense_feature_names(self) -> list[str]:
        return list(self.summary["dense_feature_names"])

    @property
    def sparse_feature_names(self) -> list[str]:
        return list(self.summary["sparse_feature_names"])

    @property
    def num_embeddings(self) -> list[int]:
        """Table rows per sparse feature (ids are in [0, n))."""
        return [int(n) for n in self.summary["num_embeddings"]]

    @property
    def name(self) -> str:
        return str(self.summary.get("dataset", self.path.name))

    def split(self, valid_fraction: float = 0.1) -> tuple[tuple[int, int], tuple[int, int]]:
        """Row ranges (start, stop) of the train and held-out parts: the held-out part is the
        last `valid_fraction` of the rows (the latest, for time-ordered data such as Criteo)."""
        if not 0.0 < valid_fraction < 1.0:
            raise DataError(f"valid_fraction must be in (0, 1), got {valid_fraction}.")
        cut = int(round(self.rows * (1.0 - valid_fraction)))
        return (0, cut), (cut, self.rows)

    def batches(self, start: int = 0, stop: int | None = None, batch_size: int = 1024,
                shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        """Batches over rows [start, stop); shuffled batch order (not rows) when `shuffle`."""
        stop = self.rows if stop is None else stop
        starts = np.arange(start, stop, batch_size)
        if shuffle:
            np.random.default_rng(seed).shuffle(starts)
        names = self.sparse_feature_names
        for s in starts:
            e = min(s + batch_size, stop)
            yield Batch(
                dense=torch.from_numpy(np.array(self.dense[s:e], dtype=np.float32)),
                sparse=ids_to_kjt(np.asarray(self.sparse[s:e]), names),
                labels=torch.from_numpy(np.asarray(self.labels[s:e], dtype=np.float32).reshape(-1)),
            )
