"""What a report measures on held-out rows: predictions of the fp32 model and of artifacts, which
table rows the data looks up and how far their quantized values are from fp32, and the error
each quantized dense layer's output carries."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from embq.models.metrics import predict_probs

EVAL_BATCH = 4096


def held_out_batches(data: Any, start: int, stop: int) -> Iterable:
    """The held-out rows as `Batch`es (dense, sparse KJT, labels), in order."""
    return data.batches(start, stop, batch_size=EVAL_BATCH)


def score(model: Any, data: Any, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels float [n], click probabilities float [n]) of `model` (any callable taking dense
    and a KJT and returning logits, e.g. a DLRM or `embq.load`'s QuantizedModel) on rows
    start..stop-1."""
    return predict_probs(model, held_out_batches(data, start, stop))


def lookup_counts(ids: np.ndarray, rows: int) -> np.ndarray:
    """How many times each of a table's `rows` rows is looked up by `ids` (int64 [n])."""
    return np.bincount(np.asarray(ids, dtype=np.int64).reshape(-1), minlength=rows)


def weighted_relative_mse(weight: torch.Tensor, table: Any, counts: np.ndarray) -> float:
    """sum_i c_i ||w_i - w^_i||^2 / sum_i c_i ||w_i||^2 over the rows the data looks up
    (c_i lookups of row i): the table's error as the model sees it.

    weight: the fp32 table [rows, dim]; table: the artifact's `Table` (decodes its rows)."""
    touched = np.flatnonzero(counts)
    if touched.size == 0:
        return 0.0
    w = weight[torch.from_numpy(touched)].detach().to(torch.float64).numpy()
    decoded = table.format.decode(np.asarray(table.rows[touched]), table.params, table.entry.dim)
    err = ((decoded.astype(np.float64) - w) ** 2).sum(axis=1)
    energy = (w * w).sum(axis=1)
    c = counts[touched].astype(np.float64)
    den = float(c @ energy)
    return float(c @ err) / den if den > 0 else 0.0


def _linear_outputs(module: torch.nn.Module, run: Any) -> list[torch.Tensor]:
    """The output of every leaf layer with weights in `module`, in call order, during run()."""
    outs: list[torch.Tensor] = []
    hooks = []
    for m in module.modules():
        if len(list(m.children())) == 0 and ("weight" in dir(m) or isinstance(m, torch.nn.Linear)):
            hooks.append(m.register_forward_hook(lambda _m, _i, o: outs.append(o.detach())))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return [o.dequantize() if o.is_quantized else o for o in outs]


def dense_layer_errors(fp32_model: Any, served: Any, batch: Any) -> list[dict[str, Any]]:
    """Relative squared error of each dense layer's output, quantized towers against fp32, with
    both fed the fp32 model's dense inputs and pooled embeddings (so the error is the dense
    towers' own; it accumulates from layer to layer as in serving): [{"layer", "tower",
    "relative_error"}], bottom MLP first.

    fp32_model: the float TorchRec DLRM; served: the runtime's InferenceDLRM; batch: one Batch."""
    core = served.core
    dense = batch.dense.to(torch.float32)
    with torch.no_grad():
        sparse = fp32_model.sparse_arch(batch.sparse)  # [B, F, D], fp32 tables

    def run(towers: Any) -> None:
        towers.over_arch(towers.inter_arch(towers.dense_arch(dense), sparse))

    want = _linear_outputs(fp32_model.dense_arch, lambda: run(fp32_model))
    want += _linear_outputs(fp32_model.over_arch, lambda: run(fp32_model))
    got = _linear_outputs(core.dense_arch, lambda: run(core))
    got += _linear_outputs(core.over_arch, lambda: run(core))
    bottom = len(_linear_outputs(core.dense_arch, lambda: core.dense_arch(dense)))
    out = []
    for i, (w, g) in enumerate(zip(want, got)):
        tower, index = ("bottom", i) if i < bottom else ("top", i - bottom)
        den = float((w.double() ** 2).sum())
        err = float(((g.double() - w.double()) ** 2).sum())
        out.append({"layer": f"{tower}.{index}", "tower": tower,
                    "relative_error": err / den if den > 0 else 0.0})  # fmt: skip
    return out
