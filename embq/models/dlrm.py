"""The baseline model: TorchRec's DLRM, one embedding table per sparse feature, saved without pickle.

A model on disk is a directory with `config.json` (a `DLRMConfig`) and `model.safetensors` (the
state dict). Loading builds the same TorchRec modules and loads the tensors strictly.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from embq.artifact.model_check import DLRM_TABLE_PREFIX
from embq.errors import ConfigError
from embq.files import staged_directory

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class DLRMConfig:
    """Shape of a DLRM: dense inputs, one table per sparse feature, the two MLP towers.

    Args:
        dense_in_features: number of dense (float) inputs per row.
        sparse_feature_names: one name per categorical feature; table `t_<name>` serves it.
        num_embeddings: rows of each feature's table, in the order of `sparse_feature_names`.
        embedding_dim: width of every table (DLRM's dot interaction needs one width).
        dense_arch: bottom MLP layer sizes; the last must equal `embedding_dim`.
        over_arch: top MLP layer sizes; the last must be 1 (one click logit).
    """

    dense_in_features: int
    sparse_feature_names: list[str]
    num_embeddings: list[int]
    embedding_dim: int = 16
    dense_arch: list[int] = field(default_factory=lambda: [64, 16])
    over_arch: list[int] = field(default_factory=lambda: [64, 32, 1])

    def __post_init__(self) -> None:
        if len(self.sparse_feature_names) != len(self.num_embeddings):
            raise ConfigError(
                f"Expected one table size per sparse feature, but got {len(self.num_embeddings)} "
                f"sizes for {len(self.sparse_feature_names)} features."
            )
        if not self.dense_arch or self.dense_arch[-1] != self.embedding_dim:
            raise ConfigError(
                f"The bottom MLP must end at embedding_dim={self.embedding_dim}, got {self.dense_arch}."
            )
        if not self.over_arch or self.over_arch[-1] != 1:
            raise ConfigError(f"The top MLP must end with 1 output, got {self.over_arch}.")
        if any(n <= 0 for n in self.num_embeddings):
            raise ConfigError(f"Every table needs at least one row, got {self.num_embeddings}.")

    def table_name(self, feature: str) -> str:
        return DLRM_TABLE_PREFIX + feature

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> DLRMConfig:
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"Not a DLRM config: {exc}") from exc


def embedding_bag_configs(config: DLRMConfig) -> list:
    """TorchRec `EmbeddingBagConfig`s for the model's tables (SUM pooling, one feature each)."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    return [
        EmbeddingBagConfig(
            name=config.table_name(feature),
            embedding_dim=config.embedding_dim,
            num_embeddings=rows,
            feature_names=[feature],
        )
        for feature, rows in zip(config.sparse_feature_names, config.num_embeddings)
    ]


def build_dlrm(config: DLRMConfig, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised TorchRec `DLRM` (CPU) for `config`."""
    from torchrec.models.dlrm import DLRM
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    torch.manual_seed(seed)
    ebc = EmbeddingBagCollection(tables=embedding_bag_configs(config), device=torch.device("cpu"))
    return DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=config.dense_in_features,
        dense_arch_layer_sizes=list(config.dense_arch),
        over_arch_layer_sizes=list(config.over_arch),
    )


def save_model(model: torch.nn.Module, config: DLRMConfig, path: str | os.PathLike) -> Path:
    """Write `config.json` + `model.safetensors` into directory `path`, atomically.

    Refuses to overwrite an existing path: nothing a user already had is lost.
    """
    path = Path(path)
    with staged_directory(path, ConfigError) as tmp:
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2))
    return path


def config_from_model(model: torch.nn.Module) -> DLRMConfig:
    """The `DLRMConfig` of a TorchRec `DLRM` built the way embq builds one (one table
    `t_<feature>` per sparse feature, all of one width), read from its modules.

    Raises:
        ConfigError: a model of another shape (it names what differs).
    """
    from embq.models.tables import find_tables

    tables = find_tables(model)
    try:
        bottom = [m for m in model.dense_arch.modules() if isinstance(m, torch.nn.Linear)]
        top = [m for m in model.over_arch.modules() if isinstance(m, torch.nn.Linear)]
    except AttributeError:
        raise ConfigError(f"{type(model).__name__} is not a TorchRec DLRM (no dense_arch / "
                          "over_arch)") from None  # fmt: skip
    features = [f for t in tables for f in t.feature_names]
    config = DLRMConfig(
        dense_in_features=bottom[0].in_features,
        sparse_feature_names=features,
        num_embeddings=[t.rows for t in tables],
        embedding_dim=tables[0].dim,
        dense_arch=[m.out_features for m in bottom],
        over_arch=[m.out_features for m in top],
    )
    for t in tables:
        if t.feature_names != [t.feature_names[0]] or t.name != config.table_name(t.feature_names[0]):
            raise ConfigError(
                f"table {t.name!r} serving {t.feature_names}: embq's DLRM has one table "
                "t_<feature> per feature; rename the tables or quantize the EBC on its own"
            )
    return config


def load_model(path: str | os.PathLike) -> tuple[torch.nn.Module, DLRMConfig]:
    """Load a model saved by `save_model`: (DLRM in eval mode, its config)."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise ConfigError(f"{path} is not an embq model directory (needs {CONFIG_FILE} and {WEIGHTS_FILE}).")
    try:
        config = DLRMConfig.from_json(json.loads((path / CONFIG_FILE).read_text()))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path / CONFIG_FILE} is not valid JSON: {exc}") from exc
    model = build_dlrm(config)
    try:
        model.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=True)
    except (RuntimeError, OSError) as exc:
        raise ConfigError(f"{path / WEIGHTS_FILE} does not match {CONFIG_FILE}: {exc}") from exc
    model.eval()
    return model, config
