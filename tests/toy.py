"""A tiny trained DLRM on synthetic clicks, in seconds: for tests, examples and docs.

model, batches = toy_dlrm()          # batches: list of embq.data.prepared.Batch
"""

from __future__ import annotations

import numpy as np
import torch

from embq.data.prepared import Batch, ids_to_kjt
from embq.models.dlrm import DLRMConfig, build_dlrm


def toy_batches(
    rows: int = 8192,
    batch_size: int = 512,
    seed: int = 0,
    n_dense: int = 4,
    cardinalities: tuple[int, ...] = (50, 40, 30),
) -> list[Batch]:
    """Synthetic click rows: log-count-like dense features, Zipf-ish ids, logistic labels."""
    rng = np.random.default_rng(seed)
    truth = np.random.default_rng(1234)  # the same click model for every seed
    w_dense = truth.normal(0, 0.8, n_dense)
    id_effects = [truth.normal(0, 1.0, c) for c in cardinalities]
    dense = np.log1p(rng.exponential(3.0, (rows, n_dense))).astype(np.float32)
    ids = np.stack([np.minimum(rng.zipf(1.3, rows) - 1, c - 1) for c in cardinalities], axis=1)
    logit = -1.2 + (dense - 1.0) @ w_dense + sum(e[ids[:, k]] for k, e in enumerate(id_effects))
    logit += 0.8 * id_effects[0][ids[:, 0]] * id_effects[1][ids[:, 1]]
    labels = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    names = [f"c{k}" for k in range(len(cardinalities))]
    out = []
    for s in range(0, rows, batch_size):
        e = min(rows, s + batch_size)
        out.append(
            Batch(
                torch.from_numpy(dense[s:e]),
                ids_to_kjt(ids[s:e], names),
                torch.from_numpy(labels[s:e]),
            )
        )
    return out


def toy_config(n_dense: int = 4, cardinalities: tuple[int, ...] = (50, 40, 30)) -> DLRMConfig:
    return DLRMConfig(
        dense_in_features=n_dense,
        sparse_feature_names=[f"c{k}" for k in range(len(cardinalities))],
        num_embeddings=list(cardinalities),
        embedding_dim=8,
        dense_arch=[16, 8],
        over_arch=[32, 16, 1],
    )


def toy_dlrm(
    rows: int = 8192, epochs: int = 3, seed: int = 0
) -> tuple[torch.nn.Module, list[Batch]]:
    """(trained toy DLRM in eval mode, its training batches)."""
    batches = toy_batches(rows, seed=seed)
    model = build_dlrm(toy_config(), seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    for _ in range(epochs):
        for b in batches:
            loss = loss_fn(model(b.dense, b.sparse).reshape(-1), b.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, batches
