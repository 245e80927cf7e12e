"""Reading the embedding tables and dense towers out of TorchRec models (an
`EmbeddingBagCollection`, or a `DLRM` holding one)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from embq.artifact.schema import POOLINGS
from embq.errors import ConfigError


@dataclass(frozen=True)
class TableInfo:
    """One float embedding table of a TorchRec model.

    Attributes:
        name: the table name (`EmbeddingBagConfig.name`, `t_<feature>` in embq's DLRM).
        rows: number of rows.
        dim: row width (values per row).
        feature_names: the sparse features looked up in this table.
        pooling: "SUM" or "MEAN".
        weight: the float table, [rows, dim] (a view of the model's parameter, not a copy).
    """

    name: str
    rows: int
    dim: int
    feature_names: list[str]
    pooling: str
    weight: torch.Tensor = field(repr=False)



def find_ebc(model: torch.nn.Module) -> torch.nn.Module:
    """The float TorchRec `EmbeddingBagCollection` of `model` (the model itself, or a DLRM's
    `sparse_arch.embedding_bag_collection`).

    Raises:
        ConfigError: for anything else, or a weighted EBC (per-sample weights are not supported).
    """
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    ebc = model
    if not isinstance(ebc, EmbeddingBagCollection):
        ebc = getattr(getattr(model, "sparse_arch", None), "embedding_bag_collection", None)
    if not isinstance(ebc, EmbeddingBagCollection):
        raise ConfigError(
            f"expected a TorchRec EmbeddingBagCollection or a DLRM holding one (float, not yet "
            f"quantized), got {type(model).__name__}"
        )
    if ebc.is_weighted():
        raise ConfigError("weighted EmbeddingBagCollections (per-sample weights) are not supported")
    return ebc


def find_tables(model: torch.nn.Module) -> list[TableInfo]:
    """The embedding tables of a TorchRec EBC or DLRM, in the collection's order."""
    ebc = find_ebc(model)
    tables = []
    for config in ebc.embedding_bag_configs():
        pooling = config.pooling.name
        if pooling not in POOLINGS:
            raise ConfigError(
                f"table {config.name!r} uses pooling {pooling}; embq serves {POOLINGS}"
            )
        weight = ebc.embedding_bags[config.name].weight
        tables.append(
            TableInfo(
                name=config.name,
                rows=int(weight.shape[0]),
                dim=int(weight.shape[1]),
                feature_names=list(config.feature_names),
                pooling=pooling,
                weight=weight.detach(),
            )
        )
    return tables


def dense_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A DLRM's non-embedding tensors (bottom and top MLPs), keyed as in `model.state_dict()`."""
    find_ebc(model)
    if not hasattr(model, "sparse_arch"):
        raise ConfigError(f"{type(model).__name__} has no dense towers; expected a DLRM")
    return {
        k: v.detach() for k, v in model.state_dict().items() if not k.startswith("sparse_arch.")
    }

