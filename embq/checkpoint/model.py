"""Which tensors of a DCP checkpoint are a DLRM's tables and towers (the config says what to expect).

TorchRec's DLRM state dict names table `t` as
``sparse_arch.embedding_bag_collection.embedding_bags.<t>.weight``; a checkpoint of a model wrapped
in `DistributedModelParallel` (or another wrapper) may put a prefix such as ``module.`` in front of
every key. The dense towers are every other key of the DLRM's state dict (``dense_arch.*``,
``over_arch.*``). Any disagreement between the config and the checkpoint (a missing or extra
table, a wrong shape, two prefixes) is a ConfigError naming the expected and the found keys.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from embq.checkpoint.metadata import CheckpointIndex
from embq.errors import ConfigError

TABLE_KEY_STEM = "sparse_arch.embedding_bag_collection.embedding_bags."
_WEIGHT = ".weight"


@dataclass(frozen=True)
class CheckpointTableKey:
    """One DLRM table in the checkpoint: its artifact name, feature, key, shape."""

    name: str
    feature: str
    key: str
    rows: int
    dim: int


@dataclass(frozen=True)
class CheckpointModel:
    """A DLRM found in a checkpoint.

    Attributes:
        config: the DLRMConfig (from --config).
        prefix: the wrapper prefix in front of every key ("" or e.g. "module.").
        tables: the tables in the config's feature order.
        dense_keys: {DLRM state-dict key: checkpoint key} of the towers.
    """

    config: object
    prefix: str
    tables: tuple[CheckpointTableKey, ...]
    dense_keys: dict[str, str]


def load_config(path: str | os.PathLike):
    """The `DLRMConfig` in a JSON file (a model directory's config.json, or the manifest's
    model config)."""
    from embq.models.dlrm import DLRMConfig

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read the model config {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a DLRMConfig JSON object")
    return DLRMConfig.from_json(data)


def _dense_shapes(config) -> dict[str, tuple[int, ...]]:
    """{key: shape} of the DLRM's tower tensors; built with one-row tables so it costs nothing."""
    from embq.models.dlrm import build_dlrm

    small = replace(config, num_embeddings=[1] * len(config.num_embeddings))
    model = build_dlrm(small)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()
            if not k.startswith("sparse_arch.")}  # fmt: skip


def _find_prefix(index: CheckpointIndex) -> str:
    prefixes = {k[: k.index(TABLE_KEY_STEM)] for k in index.tensors if TABLE_KEY_STEM in k}
    if not prefixes:
        shown = ", ".join(sorted(index.tensors)[:12])
        raise ConfigError(
            f"checkpoint {index.path} holds no TorchRec DLRM tables (keys like "
            f"'{TABLE_KEY_STEM}<table>.weight', optionally under a prefix such as 'module.'); "
            f"it holds: {shown}"
        )
    if len(prefixes) > 1:
        raise ConfigError(f"checkpoint {index.path} holds tables under several prefixes "
                          f"{sorted(prefixes)}; embq reads one model per checkpoint")  # fmt: skip
    return prefixes.pop()


def map_checkpoint(index: CheckpointIndex, config) -> CheckpointModel:
    """Match the checkpoint's keys to the config's tables and towers.

    Raises:
        ConfigError: missing or unexpected tables or tower tensors, or shapes that differ from
            the config (the message names the expected and the found keys / shapes).
    """
    prefix = _find_prefix(index)
    stem = prefix + TABLE_KEY_STEM
    found = {k[len(stem) : -len(_WEIGHT)]: k for k in index.tensors
             if k.startswith(stem) and k.endswith(_WEIGHT)}  # fmt: skip
    expected = [config.table_name(f) for f in config.sparse_feature_names]
    missing, extra = [t for t in expected if t not in found], sorted(set(found) - set(expected))
    if missing or extra:
        raise ConfigError(
            f"checkpoint {index.path} and the config disagree on the tables: expected keys "
            f"{[stem + t + _WEIGHT for t in missing]} are missing; unexpected tables {extra}. The "
            f"config names {expected}; the checkpoint holds {sorted(found)}. Use the config the "
            "model was trained with."
        )
    tables = []
    for feature, rows, name in zip(config.sparse_feature_names, config.num_embeddings, expected):
        shape = index.tensors[found[name]].shape
        if shape != (rows, config.embedding_dim):
            raise ConfigError(f"{found[name]!r} has shape {list(shape)} in the checkpoint but the "
                              f"config says [{rows}, {config.embedding_dim}]")  # fmt: skip
        tables.append(CheckpointTableKey(name, feature, found[name], rows, config.embedding_dim))
    dense = _dense_shapes(config)
    dense_keys = {}
    for key, shape in dense.items():
        saved = index.tensors.get(prefix + key)
        if saved is None:
            others = sorted(k for k in index.tensors if TABLE_KEY_STEM not in k)
            raise ConfigError(f"checkpoint {index.path} lacks the tower tensor {prefix + key!r} "
                              f"the config implies; its other tensors are {others}")  # fmt: skip
        if saved.shape != shape:
            raise ConfigError(f"{prefix + key!r} has shape {list(saved.shape)} in the checkpoint "
                              f"but the config implies {list(shape)}")  # fmt: skip
        dense_keys[key] = prefix + key
    return CheckpointModel(config, prefix, tuple(tables), dense_keys)


def read_dense(index: CheckpointIndex, model: CheckpointModel) -> dict:
    """The towers' tensors as float32 torch tensors, keyed as in the DLRM's state dict."""
    import torch

    from embq.checkpoint.source import read_small_tensor

    return {k: torch.from_numpy(np.ascontiguousarray(read_small_tensor(index, ck)))
            for k, ck in model.dense_keys.items()}  # fmt: skip
