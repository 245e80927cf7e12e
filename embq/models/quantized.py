"""TorchRec models in, quantized TorchRec models out: `quantize_model` encodes a DLRM's (or an
EBC's) tables and swaps TorchRec's quant EBC (or a mixed one, for codebook formats) into a copy.

Example::

    model, config = embq.models.dlrm.load_model("runs/demo/model")
    result = quantize_model(model, {"*": "int4-greedy", "t_cat_3": "int8"})
    result.model(dense, kjt)            # a DLRM whose sparse arch reads the quantized tables
    result.stats["t_cat_3"]             # {"bytes": ..., "size_ratio": ..., "relative_mse": ...}

`embq.quantize` is the public way in; this is the TorchRec-shaped result it can also give.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from embq.artifact.schema import QuantizedTable
from embq.embedding.encode import encode_tables
from embq.models.tables import find_ebc, find_tables
from embq.runtime.quant_ebc import build_quantized_ebc


@dataclass
class QuantizeResult:
    """What `quantize_model` returns.

    Attributes:
        model: the quantized model, of the same kind as the input (DLRM or EBC).
        tables: the encoded tables, in the model's table order.
    """

    model: torch.nn.Module
    tables: list[QuantizedTable]

    @property
    def stats(self) -> dict[str, dict[str, Any]]:
        """{table name: stats} (bytes, fp32_bytes, size_ratio, relative_mse, rmse, format)."""
        return {t.name: {"format": t.format, **t.stats} for t in self.tables}


def quantize_model(
    model: torch.nn.Module,
    plan: Any,
    *,
    sample_rows: int | None = None,
    seed: int | None = None,
) -> QuantizeResult:
    """Quantize the embedding tables of a TorchRec EBC or DLRM.

    The input model is left untouched. For a DLRM the result is a DLRM with the same (copied)
    dense towers whose `sparse_arch.embedding_bag_collection` is the quantized EBC; for an EBC
    it is the quantized EBC. Pooled outputs equal pooling the format's decoded rows.

    Args:
        model: a float TorchRec `EmbeddingBagCollection` or `DLRM`.
        plan: a `Plan`, a format name for every table, or {table name: format} ("*" = default).
        sample_rows, seed: how codebook formats draw the rows they are fitted on (default: the
            format configs').

    Raises:
        ConfigError: not a TorchRec model, or a bad plan (unknown table / format).
        FormatError: a table the format cannot store (dims that do not pack, NaN/Inf, ...).
    """
    ebc = find_ebc(model)
    tables = encode_tables(find_tables(model), plan, sample_rows=sample_rows, seed=seed)
    qebc = build_quantized_ebc(tables, copy.deepcopy(ebc.embedding_bag_configs()))
    qebc.eval()
    if model is ebc:
        return QuantizeResult(qebc, tables)
    # Copy the dense towers but not the float tables (memo maps the EBC to itself), then swap.
    quantized = copy.deepcopy(model, memo={id(ebc): ebc})
    quantized.sparse_arch.embedding_bag_collection = qebc
    quantized.eval()
    return QuantizeResult(quantized, tables)

