"""Click-model quality: AUC, log loss, normalized entropy and calibration (scikit-learn based)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from sklearn.metrics import log_loss, roc_auc_score

from embq.errors import DataError


def click_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUC, log loss, NE (log loss / entropy of the base click rate) and calibration
    (mean prediction / base rate) of predicted click probabilities."""
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    probs = np.clip(np.asarray(probs, dtype=np.float64).reshape(-1), 1e-7, 1 - 1e-7)
    if labels.size == 0:
        raise DataError("Cannot score an empty set of predictions.")
    base = labels.mean()
    if base <= 0.0 or base >= 1.0:
        raise DataError("AUC and NE need both clicks and non-clicks among the labels.")
    logloss = float(log_loss(labels, probs, labels=[0, 1]))
    base_entropy = float(-(base * np.log(base) + (1 - base) * np.log(1 - base)))
    return {
        "rows": int(labels.size),
        "auc": float(roc_auc_score(labels, probs)),
        "logloss": logloss,
        "ne": logloss / base_entropy,
        "calibration": float(probs.mean() / base),
    }


@torch.no_grad()
def predict_probs(model: torch.nn.Module, batches: Iterable) -> tuple[np.ndarray, np.ndarray]:
    """(labels, click probabilities) of `model` over `batches` (objects with dense, sparse, labels)."""
    model.eval()
    labels, probs = [], []
    for batch in batches:
        logits = model(batch.dense, batch.sparse).reshape(-1)
        probs.append(torch.sigmoid(logits.float()).numpy())
        labels.append(batch.labels.numpy())
    return np.concatenate(labels), np.concatenate(probs)


def evaluate(model: torch.nn.Module, batches: Iterable) -> dict[str, float]:
    """Click metrics of `model` on `batches`."""
    labels, probs = predict_probs(model, batches)
    return click_metrics(labels, probs)
