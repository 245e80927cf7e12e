"""Artifact -> inference modules: fbgemm kernels for row-wise tables, codebook bags for the rest.

`load_inference_model(path)` turns an artifact written by `embq quantize` into an eager module,
`forward(dense float32 [B, n_dense], sparse KeyedJaggedTensor) -> logits float32 [B]`:

- row-wise tables (fp32, fp16, int8/4/2 and their searches) go into fbgemm's
  `IntNBitTableBatchedEmbeddingBagsCodegen`, one module per pooling mode holding every such
  table whatever its format (the kernel mixes weight types), CPU / `EmbeddingLocation.HOST`.
  Their bytes are copied from the artifact's memory-mapped rows as they are: nothing is
  re-quantized, and the tables stay compressed in memory;
- codebook / PQ tables go to `embq.codebook_bag` (their codes stay memory-mapped);
- the dense towers come from dense.safetensors, built by the loader registered for the dense
  section's meta "kind" (`DENSE_LOADERS`; "fp32" here, quantized towers register their own).

`export_torchscript(artifact, out)` saves the model's scriptable core (`DLRMCore`) with
`torch.jit.save`. Loading it needs only `torch` and `fbgemm_gpu` imported::

    import torch, fbgemm_gpu  # fbgemm_gpu registers the kernels the module calls
    m = torch.jit.load("model.pt")
    logits = m(dense, values, offsets)  # float32 [B]

    dense:   float32 [B, n_dense]
    values:  int64 [N]          ids of every sparse feature, key-major in the model's feature
                                order (all B bags of feature 0, then feature 1, ...);
                                exactly a KeyedJaggedTensor's values()
    offsets: int64 [F * B + 1]  bag boundaries into values (offsets[0] == 0); a KJT's offsets()

The feature order, table sizes and formats are in the file's extra file "embq_metadata.json"
(`torch.jit.load(path, _extra_files={"embq_metadata.json": ""})`) and in `inference_metadata`.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from embq.artifact import Artifact, load_artifact
from embq.errors import ArtifactError, DataError
from embq.model import DLRMConfig
from embq.torchrec import POOLINGS, QuantizedTable, is_rowwise, tbe_weight_pair

METADATA_FILE = "embq_metadata.json"  # extra file inside exported TorchScript archives


# --------------------------------------------------------------------------- embedding lookups


def build_tbe(tables: list[QuantizedTable], pooling: str) -> torch.nn.Module:
    """One fbgemm `IntNBitTableBatchedEmbeddingBagsCodegen` for row-wise tables of any mix of
    formats, all pooled with `pooling`. forward(indices, offsets) -> float32 [B, sum of dims],
    features in table order (each table's feature_names in order).

    Out-of-range ids raise (BoundsCheckMode.FATAL) instead of silently reading row 0.
    """
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
        BoundsCheckMode,
        EmbeddingLocation,
        PoolingMode,
    )
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
        IntNBitTableBatchedEmbeddingBagsCodegen,
    )

    from embq.formats import get_format

    specs, weights, feature_table_map = [], [], []
    for i, t in enumerate(tables):
        sparse_type = SparseType[get_format(t.format).sparse_type]
        specs.append((t.name, t.rows, t.dim, sparse_type, EmbeddingLocation.HOST))
        codes = torch.from_numpy(t.codes) if isinstance(t.codes, np.ndarray) else t.codes
        weights.append(tbe_weight_pair(t.format, codes))
        feature_table_map.extend([i] * len(t.feature_names))
    return IntNBitTableBatchedEmbeddingBagsCodegen(
        specs,
        feature_table_map=feature_table_map,
        pooling_mode=PoolingMode[pooling],
        device=torch.device("cpu"),
        bounds_check_mode=BoundsCheckMode.FATAL,
        weight_lists=weights,
        output_dtype=SparseType.FP32,
    )


class FeatureGroup(torch.nn.Module):
    """One lookup kernel and the features it serves.

    `features` are indices into the caller's feature order; forward picks those features' bags
    out of the caller's jagged input (fbgemm `permute_2D_sparse_data`; skipped when the kernel
    serves every feature in order) and returns the kernel's pooled float32 [B, sum of its dims].
    """

    def __init__(self, kernel: torch.nn.Module, features: list[int], num_features: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.identity: bool = list(features) == list(range(num_features))
        self.register_buffer(
            "features", torch.tensor(features, dtype=torch.int32), persistent=False
        )

    def forward(
        self, values: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """values int64 [N], offsets int64 [F*B+1], lengths int64 [F, B] of the whole input."""
        if self.identity:
            return self.kernel(values, offsets)
        sub_lengths, sub_values, _ = torch.ops.fbgemm.permute_2D_sparse_data(
            self.features, lengths, values, None, None
        )
        sub_offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(sub_lengths.reshape(-1))
        return self.kernel(sub_values, sub_offsets)


class QuantEmbeddingBags(torch.nn.Module):
    """Pooled lookups of every table of a model, on plain tensors (TorchScript-friendly).

    forward(values int [N], offsets int [F*B+1]) -> float32 [B, sum of dims]: the input is
    key-major in `feature_names` order (a KeyedJaggedTensor's values() / offsets() with those
    keys); the output puts the features side by side in the same order.
    """

    def __init__(
        self,
        groups: list[FeatureGroup],
        feature_names: list[str],
        feature_dims: list[int],
        group_features: list[list[int]],
    ) -> None:
        super().__init__()
        self.groups = torch.nn.ModuleList(groups)
        self.feature_names = list(feature_names)
        self.feature_dims = list(feature_dims)
        self.num_features: int = len(feature_names)
        # Groups emit their features' columns group by group; `columns` puts them back in
        # feature order (column j of the output is column columns[j] of the concatenation).
        starts = np.concatenate([[0], np.cumsum(feature_dims)]).astype(np.int64)
        emitted = [c for fs in group_features for f in fs for c in range(starts[f], starts[f + 1])]
        inverse = np.argsort(np.asarray(emitted, dtype=np.int64), kind="stable")
        self.in_order: bool = emitted == list(range(int(starts[-1])))
        self.register_buffer("columns", torch.from_numpy(inverse), persistent=False)

    def forward(self, values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        values = values.to(torch.int64)
        offsets = offsets.to(torch.int64)
        batch = (offsets.shape[0] - 1) // self.num_features
        lengths = (offsets[1:] - offsets[:-1]).reshape(self.num_features, batch)
        outs: list[torch.Tensor] = []
        for group in self.groups:
            outs.append(group(values, offsets, lengths))
        pooled = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        if self.in_order:
            return pooled
        return pooled.index_select(1, self.columns)


def build_embedding_bags(tables: list[QuantizedTable]) -> QuantEmbeddingBags:
    """Kernels for encoded tables: one fbgemm TBE per pooling mode for the row-wise tables, one
    `CodebookBagCollection` for codebook / PQ tables. Feature order: tables in order, each
    table's feature_names in order."""
    from embq.codebook_bag import CodebookBagCollection

    first, feature_names, feature_dims = {}, [], []
    for t in tables:
        first[t.name] = len(feature_names)
        feature_names.extend(t.feature_names)
        feature_dims.extend([t.dim] * len(t.feature_names))
    num_features = len(feature_names)

    def features_of(group: list[QuantizedTable]) -> list[int]:
        return [first[t.name] + j for t in group for j in range(len(t.feature_names))]

    kernels: list[tuple[torch.nn.Module, list[QuantizedTable]]] = []
    for pooling in POOLINGS:
        rowwise = [t for t in tables if is_rowwise(t.format) and t.pooling == pooling]
        if rowwise:
            kernels.append((build_tbe(rowwise, pooling), rowwise))
    codebook = [t for t in tables if not is_rowwise(t.format)]
    if codebook:
        kernels.append((CodebookBagCollection.from_tables(codebook), codebook))
    groups = [FeatureGroup(k, features_of(ts), num_features) for k, ts in kernels]
    return QuantEmbeddingBags(
        groups, feature_names, feature_dims, [features_of(ts) for _, ts in kernels]
    )


def artifact_tables(
    artifact: Artifact, pooling: dict[str, str] | None = None
) -> list[QuantizedTable]:
    """The artifact's tables as `QuantizedTable`s whose codes are memory-mapped copy-on-write
    (nothing is read until a kernel copies or gathers rows). `pooling`: {table: SUM|MEAN}."""
    pooling = pooling or {}
    if not isinstance(pooling, dict):
        raise ArtifactError(f"{artifact.path}: the manifest's model 'pooling' must be an object")
    out = []
    for name in artifact.table_names():
        table = artifact.table(name)
        entry = table.entry
        # mode "c": a writable (private) mapping, so torch.from_numpy accepts it without a copy
        codes = np.memmap(
            table.rows.filename,
            dtype=np.uint8,
            mode="c",
            offset=table.rows.offset,
            shape=table.rows.shape,
        )
        mode = pooling.get(name, "SUM")
        if mode not in POOLINGS:
            raise ArtifactError(f"table {name!r}: pooling {mode!r} is not one of {POOLINGS}")
        out.append(
            QuantizedTable(
                name=name,
                rows=entry.rows,
                dim=entry.dim,
                feature_names=list(entry.feature_names),
                pooling=mode,
                format=entry.format,
                codes=codes,
                params=table.params,
                stats=dict(entry.stats),
            )
        )
    return out


def load_embedding_bags(
    path: str | os.PathLike | Artifact, verify: bool = True
) -> QuantEmbeddingBags:
    """The pooled-lookup module of an artifact's tables (any artifact, with or without a model)."""
    artifact = path if isinstance(path, Artifact) else load_artifact(path, verify=verify)
    return build_embedding_bags(
        artifact_tables(artifact, _model_section(artifact, required=False).get("pooling"))
    )


# --------------------------------------------------------------------------- dense towers


class DenseTowers(NamedTuple):
    """A DLRM's dense part: bottom MLP, feature interaction, top MLP (scriptable modules).

    dense_arch: float32 [B, n_dense] -> [B, D]; inter_arch: ([B, D], [B, F, D]) -> [B, K];
    over_arch: [B, K] -> [B, 1].
    """

    dense_arch: torch.nn.Module
    inter_arch: torch.nn.Module
    over_arch: torch.nn.Module


DenseLoader = Callable[[DLRMConfig, dict[str, torch.Tensor], dict[str, Any]], DenseTowers]
# meta "kind" -> the loader, or "module:function" naming one (imported on first use, so kinds
# whose code lives elsewhere, e.g. embq.dense, need no import here). The one dispatch table.
DENSE_LOADERS: dict[str, DenseLoader | str] = {}


def register_dense_loader(kind: str) -> Callable[[DenseLoader], DenseLoader]:
    """Register the builder of dense towers stored with meta {"kind": kind} (a decorator).

    A loader takes (config, dense tensors by name, meta) and returns `DenseTowers` of scriptable
    modules. Code that is not imported before loading registers by name instead:
    `DENSE_LOADERS["int8-x"] = "embq.dense.runtime:load_towers"`.
    """

    def register(fn: DenseLoader) -> DenseLoader:
        DENSE_LOADERS[kind] = fn
        return fn

    return register


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


@register_dense_loader("fp32")
def _load_fp32_towers(
    config: DLRMConfig, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> DenseTowers:
    """TorchRec's DenseArch / InteractionArch / OverArch with the float state dict loaded."""
    from torchrec.models.dlrm import DenseArch, InteractionArch, OverArch, choose

    n = len(config.sparse_feature_names)
    towers = DenseTowers(
        DenseArch(config.dense_in_features, list(config.dense_arch)),
        InteractionArch(num_sparse_features=n),
        OverArch(config.embedding_dim + choose(n, 2) + n, list(config.over_arch)),
    )
    expected = {f"{name}.{k}" for name, m in towers._asdict().items() for k in m.state_dict()}
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ArtifactError(
            f"dense.safetensors does not match the DLRM config: missing {missing}, "
            f"unexpected {unexpected}"
        )
    for name, module in towers._asdict().items():
        module.load_state_dict(
            {k: v.float() for k, v in _strip(tensors, f"{name}.").items()}, strict=True
        )
        module.eval()
    return towers


def load_dense_towers(
    config: DLRMConfig, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> DenseTowers:
    """Build the dense towers with the loader registered for meta["kind"]."""
    kind = meta.get("kind")
    loader = DENSE_LOADERS.get(kind) if isinstance(kind, str) else None
    if loader is None:
        raise ArtifactError(
            f"the artifact's dense towers are stored as kind {kind!r}, which this embq cannot load "
            f"(known kinds: {sorted(DENSE_LOADERS)}); upgrade embq or re-create the artifact"
        )
    if isinstance(loader, str):
        module, _, name = loader.partition(":")
        loader = DENSE_LOADERS[kind] = getattr(importlib.import_module(module), name)
    return loader(config, tensors, meta)


# --------------------------------------------------------------------------- the model


class DLRMCore(torch.nn.Module):
    """A quantized DLRM on plain tensors: the module that TorchScript exports.

    forward(dense float32 [B, n_dense], values int [N], offsets int [F*B+1]) -> logits float32
    [B]; values / offsets are key-major in `feature_names` order (see the module docstring).
    Computes what TorchRec's DLRM computes: bottom MLP, pooled embeddings [B, F, D], pairwise
    dot interaction, top MLP.
    """

    def __init__(
        self, embeddings: QuantEmbeddingBags, towers: DenseTowers, embedding_dim: int
    ) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.dense_arch = towers.dense_arch
        self.inter_arch = towers.inter_arch
        self.over_arch = towers.over_arch
        self.num_features: int = embeddings.num_features
        self.embedding_dim: int = int(embedding_dim)

    def forward(
        self, dense: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor
    ) -> torch.Tensor:
        embedded_dense = self.dense_arch(dense)
        pooled = self.embeddings(values, offsets)
        sparse = pooled.reshape(-1, self.num_features, self.embedding_dim)
        return self.over_arch(self.inter_arch(embedded_dense, sparse)).reshape(-1)


class InferenceDLRM(torch.nn.Module):
    """The eager inference model: forward(dense float32 [B, n_dense], sparse KeyedJaggedTensor)
    -> logits float32 [B]. Inputs are checked (DataError: wrong shapes, missing features,
    ids outside a table); the KJT may hold its keys in any order, and extra keys are ignored.

    Attributes:
        core: the `DLRMCore` doing the work (what `export_torchscript` saves).
        feature_names: the sparse features, in the order `core` expects them.
        dense_in_features: n_dense.
        table_rows: rows of the table behind each feature, in feature order.
        metadata: `inference_metadata` of the artifact it came from.
    """

    def __init__(
        self,
        core: DLRMCore,
        dense_in_features: int,
        table_rows: list[int],
        metadata: dict[str, Any],
    ) -> None:
        super().__init__()
        self.core = core
        self.feature_names = list(core.embeddings.feature_names)
        self.dense_in_features = int(dense_in_features)
        self.table_rows = list(table_rows)
        self.metadata = metadata
        self.register_buffer("_rows", torch.tensor(table_rows, dtype=torch.int64), persistent=False)

    def forward(self, dense: torch.Tensor, sparse) -> torch.Tensor:
        values, offsets = self.sparse_inputs(sparse, batch=self._check_dense(dense))
        return self.core(dense.to(torch.float32), values, offsets)

    def _check_dense(self, dense: torch.Tensor) -> int:
        if (
            not isinstance(dense, torch.Tensor)
            or dense.ndim != 2
            or dense.shape[1] != self.dense_in_features
        ):
            got = list(dense.shape) if isinstance(dense, torch.Tensor) else type(dense).__name__
            raise DataError(f"dense must be float32 [B, {self.dense_in_features}], got {got}")
        return int(dense.shape[0])

    def sparse_inputs(self, sparse, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values int64 [N], offsets int64 [F*B+1]) in `feature_names` order from a KJT,
        checked."""
        keys = list(sparse.keys())
        missing = [f for f in self.feature_names if f not in keys]
        if missing:
            raise DataError(
                f"the sparse input lacks features {missing}; the model needs {self.feature_names}"
            )
        if keys != self.feature_names:
            sparse = sparse.permute([keys.index(f) for f in self.feature_names])
        if sparse.variable_stride_per_key() or sparse.stride() != batch:
            raise DataError(
                f"every sparse feature needs exactly B={batch} bags (one per dense row)"
            )
        values = sparse.values().to(torch.int64)
        offsets = sparse.offsets().to(torch.int64)
        per_key = torch.tensor(sparse.length_per_key(), dtype=torch.int64)
        limit = torch.repeat_interleave(self._rows, per_key)
        bad = (values < 0) | (values >= limit)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            feature = self.feature_names[
                int(np.searchsorted(np.cumsum(sparse.length_per_key()), i, side="right"))
            ]
            raise DataError(
                f"id {int(values[i])} of feature {feature!r} is outside its table's "
                f"{self.table_rows[self.feature_names.index(feature)]} rows"
            )
        return values, offsets


def _model_section(artifact: Artifact, required: bool = True) -> dict[str, Any]:
    model = artifact.model or {}
    if required and model.get("type") != "dlrm":
        raise ArtifactError(
            f"{artifact.path} holds no DLRM (manifest 'model' is {artifact.model!r}); only "
            "artifacts written by `embq quantize --model` carry a full model"
        )
    return model


def _dlrm_config(artifact: Artifact) -> DLRMConfig:
    model = _model_section(artifact)
    try:
        config = DLRMConfig.from_json(model.get("config"))
    except Exception as e:  # ConfigError, or TypeError for a non-dict
        raise ArtifactError(f"{artifact.path}: the manifest's DLRM config is invalid: {e}") from e
    for feature, rows in zip(config.sparse_feature_names, config.num_embeddings):
        name = config.table_name(feature)
        entry = artifact.tables.get(name)
        if (
            entry is None
            or entry.rows != rows
            or entry.dim != config.embedding_dim
            or entry.feature_names != [feature]
        ):
            raise ArtifactError(
                f"{artifact.path}: table {name!r} for feature {feature!r} should be "
                f"[{rows}, {config.embedding_dim}] serving [{feature!r}], the manifest has {entry}"
            )
    if len(artifact.tables) != len(config.sparse_feature_names):
        raise ArtifactError(
            f"{artifact.path}: holds tables {artifact.table_names()}, the DLRM config has "
            f"one per feature of {config.sparse_feature_names}"
        )
    return config


def inference_metadata(artifact: str | os.PathLike | Artifact) -> dict[str, Any]:
    """What a server needs to know about an artifact, as JSON-able data.

    Returns:
        {"model": "dlrm" | None,
         "tables": [{name, format, kernel ("fbgemm-tbe" | "codebook-bag"), rows, dim, bytes
                     (the table file, bytes), bytes_per_row, feature_names, pooling, stats}],
         "table_bytes": total bytes of the table files,
         "fp32_bytes": what the same tables take in fp32 (rows * dim * 4),
         "formats": {format: number of tables},
         "dense": {"kind", "bytes"} | None,
         "inputs": {"dense": {"shape": [None, n_dense], "dtype": "float32"} | None,
                    "sparse": {"feature_names": [...], "table_rows": {feature: rows},
                               "values": "int64 [N], key-major in feature_names order",
                               "offsets": "int64 [F * B + 1]"}},
         "output": "logits float32 [B]" | None}
    """
    if not isinstance(artifact, Artifact):
        artifact = load_artifact(artifact, verify=False)
    model = _model_section(artifact, required=False)
    pooling = model.get("pooling") or {}
    tables, features, rows_of = [], [], {}
    for name, e in artifact.tables.items():
        tables.append(
            {
                "name": name,
                "format": e.format,
                "kernel": "fbgemm-tbe" if is_rowwise(e.format) else "codebook-bag",
                "rows": e.rows,
                "dim": e.dim,
                "bytes": e.bytes,
                "bytes_per_row": e.bytes_per_row,
                "feature_names": list(e.feature_names),
                "pooling": pooling.get(name, "SUM"),
                "stats": dict(e.stats),
            }
        )
        features.extend(e.feature_names)
        rows_of.update({f: e.rows for f in e.feature_names})
    formats: dict[str, int] = {}
    for t in tables:
        formats[t["format"]] = formats.get(t["format"], 0) + 1
    dense = artifact.manifest.get("dense")
    is_dlrm = model.get("type") == "dlrm"
    config = model.get("config") or {}
    return {
        "model": "dlrm" if is_dlrm else None,
        "tables": tables,
        "table_bytes": sum(t["bytes"] for t in tables),
        "fp32_bytes": sum(t["rows"] * t["dim"] * 4 for t in tables),
        "formats": formats,
        "dense": None
        if dense is None
        else {"kind": (dense.get("meta") or {}).get("kind"), "bytes": dense.get("bytes")},
        "inputs": {
            "dense": (
                {"shape": [None, config.get("dense_in_features")], "dtype": "float32"}
                if is_dlrm
                else None
            ),
            "sparse": {
                "feature_names": features,
                "table_rows": rows_of,
                "values": "int64 [N], key-major in feature_names order",
                "offsets": "int64 [F * B + 1], bag boundaries into values",
            },
        },
        "output": "logits float32 [B]" if is_dlrm else None,
    }


def load_inference_model(path: str | os.PathLike, verify: bool = True) -> InferenceDLRM:
    """An artifact written by `embq quantize` as an eager inference model (eval mode).

    Args:
        path: the artifact directory.
        verify: check every file's sha256 while loading (reads each byte once).

    Raises:
        ArtifactError: not a DLRM artifact, tables that disagree with its config, dense towers
            of an unknown kind, or anything `load_artifact` refuses.
    """
    artifact = load_artifact(path, verify=verify)
    config = _dlrm_config(artifact)
    pooling = _model_section(artifact).get("pooling")
    tables = {t.name: t for t in artifact_tables(artifact, pooling)}
    ordered = [tables[config.table_name(f)] for f in config.sparse_feature_names]
    embeddings = build_embedding_bags(ordered)
    meta = artifact.dense_meta
    if meta is None:
        raise ArtifactError(
            f"{artifact.path} has no dense towers (dense.safetensors); it cannot predict"
        )
    towers = load_dense_towers(config, artifact.dense(), meta)
    core = DLRMCore(embeddings, towers, config.embedding_dim).eval()
    model = InferenceDLRM(
        core, config.dense_in_features, list(config.num_embeddings), inference_metadata(artifact)
    )
    return model.eval()


def export_torchscript(artifact_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Script the artifact's inference model and save it (TorchScript, `torch.jit.save`).

    The saved module takes (dense float32 [B, n_dense], values int64 [N], offsets int64
    [F*B+1]) and returns logits float32 [B] (see the module docstring); the tables inside stay
    in their compressed formats. `inference_metadata` is stored as the extra file
    "embq_metadata.json". The file is written to a temporary name and renamed into place.

    Returns:
        out_path.
    """
    model = load_inference_model(artifact_path)
    scripted = torch.jit.script(model.core)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        torch.jit.save(scripted, tmp, _extra_files={METADATA_FILE: json.dumps(model.metadata)})
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
