"""Train the baseline DLRM on a prepared dataset, on CPU, in minutes.

Embedding tables get sparse gradients and SparseAdam (only the rows a batch touches are
updated, which is what makes 26 large tables trainable on two cores); the MLPs get Adam.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from embq.data.prepared import PreparedData
from embq.models.dlrm import DLRMConfig, build_dlrm
from embq.models.metrics import evaluate
from embq.progress import progress_bar


@dataclass
class TrainSettings:
    """Args:
        embedding_dim: width of every table.
        dense_arch: bottom MLP sizes (the last is set to embedding_dim).
        over_arch: top MLP sizes (the last is 1).
        epochs: passes over the training rows.
        batch_size: rows per step.
        lr: Adam learning rate of the MLPs.
        embedding_lr: SparseAdam learning rate of the tables.
        valid_fraction: last share of rows held out for evaluation.
        seed: initialisation and batch-order seed.
    """

    embedding_dim: int = 16
    dense_arch: tuple[int, ...] = (64,)
    over_arch: tuple[int, ...] = (64, 32)
    epochs: int = 1
    batch_size: int = 512
    lr: float = 1e-3
    embedding_lr: float = 0.01
    valid_fraction: float = 0.1
    seed: int = 0


def model_config(data: PreparedData, settings: TrainSettings) -> DLRMConfig:
    return DLRMConfig(
        dense_in_features=len(data.dense_feature_names),
        sparse_feature_names=data.sparse_feature_names,
        num_embeddings=data.num_embeddings,
        embedding_dim=settings.embedding_dim,
        dense_arch=[*settings.dense_arch, settings.embedding_dim],
        over_arch=[*settings.over_arch, 1],
    )


def train_dlrm(data: PreparedData, settings: TrainSettings | None = None,
               progress: bool = True) -> tuple[torch.nn.Module, DLRMConfig, dict]:
    """Train a DLRM on the first (1 - valid_fraction) rows; return (model, config, metrics on
    the held-out rows, with `train_seconds`)."""
    settings = settings or TrainSettings()
    config = model_config(data, settings)
    model = build_dlrm(config, seed=settings.seed)
    tables = list(model.sparse_arch.embedding_bag_collection.embedding_bags.values())
    for table in tables:
        table.sparse = True
    table_params = [p for t in tables for p in t.parameters()]
    table_ids = {id(p) for p in table_params}
    dense_params = [p for p in model.parameters() if id(p) not in table_ids]
    optimizers = [torch.optim.SparseAdam(table_params, lr=settings.embedding_lr),
                  torch.optim.Adam(dense_params, lr=settings.lr)]
    loss_fn = torch.nn.BCEWithLogitsLoss()
    (train_start, train_stop), (valid_start, valid_stop) = data.split(settings.valid_fraction)

    start = time.perf_counter()
    model.train()
    steps = -(-(train_stop - train_start) // settings.batch_size) * settings.epochs
    with progress_bar(enabled=progress, total=steps, desc="train", unit="step") as bar:
        for epoch in range(settings.epochs):
            for batch in data.batches(train_start, train_stop, settings.batch_size, shuffle=True,
                                      seed=settings.seed + epoch):
                logits = model(batch.dense, batch.sparse).reshape(-1)
                loss = loss_fn(logits, batch.labels)
                for opt in optimizers:
                    opt.zero_grad()
                loss.backward()
                for opt in optimizers:
                    opt.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    train_seconds = time.perf_counter() - start
    for table in tables:
        table.sparse = False
    model.eval()
    metrics = evaluate(model, data.batches(valid_start, valid_stop, batch_size=4096))
    metrics["train_seconds"] = round(train_seconds, 1)
    metrics["train_rows"] = train_stop - train_start
    return model, config, metrics
