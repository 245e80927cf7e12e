"""Loading an artifact as an inference model: the DLRM config checked against the tables, each
table on its kernel, the dense towers built by the loader of their kind.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from embq.artifact.reader import Artifact, load_artifact
from embq.artifact.schema import QuantizedTable
from embq.errors import ArtifactError, EmbqError
from embq.models.dlrm import DLRMConfig
from embq.runtime.bags import (
    artifact_tables,
    build_embedding_bags,
    model_pooling,
    recorded_kernels,
)
from embq.runtime.dense_towers import dense_layer_kernels, load_dense_towers
from embq.runtime.dlrm import DLRMCore, InferenceDLRM
from embq.runtime.kernel_choice import (
    check_kernel_choice,
    resolve_kernels,
    table_kernel,
    table_memory_bytes,
)

KernelArg = str | Mapping[str, str] | None  # one choice, {table or "*": choice}, or as recorded


def model_section(artifact: Artifact, required: bool = True) -> dict[str, Any]:
    """The manifest's "model" section ({} if none); ArtifactError if `required` and it holds
    no DLRM."""
    model = artifact.model or {}
    if required and model.get("type") != "dlrm":
        raise ArtifactError(
            f"{artifact.path} holds no DLRM (manifest 'model' is {artifact.model!r}); only "
            "artifacts written by `embq quantize --model` carry a full model"
        )
    return model


def dlrm_config(artifact: Artifact) -> DLRMConfig:
    """The artifact's DLRM config (the reader checked it against the tables:
    `embq.artifact.model_check`).

    Raises:
        ArtifactError: no DLRM in the artifact, or a config DLRMConfig refuses.
    """
    model = model_section(artifact)
    try:
        return DLRMConfig.from_json(model.get("config"))
    except Exception as e:  # ConfigError, or TypeError for a non-dict
        raise ArtifactError(f"{artifact.path}: the manifest's DLRM config is invalid: {e}") from e


def inference_metadata(
    artifact: str | os.PathLike | Artifact, kernel: KernelArg = None
) -> dict[str, Any]:
    """What a server needs to know about an artifact, as JSON-able data.

    `kernel`: the kernel choice the model is (or will be) loaded with (see
    `load_inference_model`); it decides each table's "kernel" and "kernel_choice" entries.

    Returns:
        {"digest": the artifact's digest, "sha256:..." (`embq.artifact.digest`),
         "model": "dlrm" | None,
         "tables": [{name, format, kernel ("aten-nbit" | "fbgemm-tbe" | "codebook-bag"),
                     kernel_choice ("auto" | "compact" | "tbe"), rows, dim, bytes (the table
                     file, bytes), bytes_per_row, memory_bytes (what the
                     loaded kernel holds: `table_memory_bytes`), feature_names, pooling,
                     stats}],
         "table_bytes": total bytes of the table files,
         "memory_bytes": total memory_bytes of the tables,
         "fp32_bytes": what the same tables take in fp32 (rows * dim * 4),
         "formats": {format: number of tables},
         "dense": {"kind", "bytes", "version" (of a PTQ section's layout; None for fp32),
                   "layers": [{name, kernel ("fbgemm-int8-static" | "dequantized-fp32" |
                               "fp32"), weight_bits (stored), runtime_weight_bits (multiplied),
                               act_bits, runtime_bytes}] for PTQ towers, else None} | None,
         "inputs": {"dense": {"shape": [None, n_dense], "dtype": "float32"} | None,
                    "sparse": {"feature_names": [...], "table_rows": {feature: rows},
                               "values": "int64 [N], key-major in feature_names order",
                               "offsets": "int64 [F * B + 1]"}},
         "output": "logits float32 [B]" | None}
    """
    if isinstance(kernel, str):
        check_kernel_choice(kernel)  # before reading anything
    if not isinstance(artifact, Artifact):
        artifact = load_artifact(artifact, verify=False)
    model = model_section(artifact, required=False)
    pooling = model.get("pooling") or {}
    choice = resolve_kernels(artifact.table_names(), kernel, recorded_kernels(artifact))
    tables = [
        _table_metadata(name, e.format, e.rows, e.dim, e.bytes, e.bytes_per_row,
                        e.feature_names, pooling.get(name, "SUM"), e.stats, choice[name])
        for name, e in artifact.tables.items()
    ]  # fmt: skip
    dense = artifact.manifest.get("dense")
    dense_info = None if dense is None else _dense_metadata(dense.get("meta") or {},
                                                            dense.get("bytes"))  # fmt: skip
    is_dlrm = model.get("type") == "dlrm"
    n_dense = (model.get("config") or {}).get("dense_in_features") if is_dlrm else None
    return _assemble_metadata(tables, is_dlrm, n_dense, dense_info, artifact.digest)


def tables_metadata(config: DLRMConfig, tables: list[QuantizedTable],
                    dense_meta: dict[str, Any], kernel: KernelArg = "auto") -> dict[str, Any]:  # fmt: skip
    """`inference_metadata` of a model quantized in memory (not yet an artifact): "bytes" are
    the encoded bytes of each table (`stats["bytes"]`), dense "bytes" None, "digest" None."""
    choice = resolve_kernels([t.name for t in tables], kernel)
    rows = []
    for t in tables:
        bpr = int(t.codes.shape[1])
        rows.append(_table_metadata(t.name, t.format, t.rows, t.dim, int(t.stats["bytes"]), bpr,
                                    t.feature_names, t.pooling, t.stats, choice[t.name]))  # fmt: skip
    return _assemble_metadata(rows, True, config.dense_in_features,
                              _dense_metadata(dense_meta, None))  # fmt: skip


def _dense_metadata(meta: dict[str, Any], nbytes: int | None) -> dict[str, Any]:
    """What the loader reads from a dense section: its kind, format version and, for PTQ towers,
    each layer's kernel and bit widths (`dense_layer_kernels`)."""
    return {"kind": meta.get("kind"), "bytes": nbytes, "version": meta.get("version"),
            "layers": dense_layer_kernels(meta)}  # fmt: skip


def _table_metadata(name: str, fmt: str, rows: int, dim: int, nbytes: int, bytes_per_row: int,
                    feature_names: list[str], pooling: str, stats: dict[str, Any],
                    kernel: str) -> dict[str, Any]:  # fmt: skip
    return {
        "name": name,
        "format": fmt,
        "kernel": table_kernel(fmt, kernel),
        "kernel_choice": kernel,
        "rows": rows,
        "dim": dim,
        "bytes": nbytes,
        "bytes_per_row": bytes_per_row,
        "memory_bytes": table_memory_bytes(fmt, rows, nbytes, bytes_per_row, kernel),
        "feature_names": list(feature_names),
        "pooling": pooling,
        "stats": dict(stats),
    }


def _assemble_metadata(tables: list[dict[str, Any]], is_dlrm: bool, n_dense: int | None,
                       dense_info: dict[str, Any] | None,
                       digest: str | None = None) -> dict[str, Any]:  # fmt: skip
    features: list[str] = []
    rows_of: dict[str, int] = {}
    for t in tables:
        features.extend(t["feature_names"])
        rows_of.update({f: t["rows"] for f in t["feature_names"]})
    formats: dict[str, int] = {}
    for t in tables:
        formats[t["format"]] = formats.get(t["format"], 0) + 1
    return {
        "digest": digest,
        "model": "dlrm" if is_dlrm else None,
        "tables": tables,
        "table_bytes": sum(t["bytes"] for t in tables),
        "memory_bytes": sum(t["memory_bytes"] for t in tables),
        "fp32_bytes": sum(t["rows"] * t["dim"] * 4 for t in tables),
        "formats": formats,
        "dense": dense_info,
        "inputs": {
            "dense": {"shape": [None, n_dense], "dtype": "float32"} if is_dlrm else None,
            "sparse": {
                "feature_names": features,
                "table_rows": rows_of,
                "values": "int64 [N], key-major in feature_names order",
                "offsets": "int64 [F * B + 1], bag boundaries into values",
            },
        },
        "output": "logits float32 [B]" if is_dlrm else None,
    }


def build_inference_model(
    config: DLRMConfig,
    tables: list[QuantizedTable],
    dense_tensors: dict[str, Any],
    dense_meta: dict[str, Any],
    kernel: KernelArg = "auto",
    metadata: dict[str, Any] | None = None,
) -> InferenceDLRM:
    """The eager inference model of encoded tables (in `config`'s feature order) and a dense
    section (tensors, meta {"kind": ...}), on the kernels of `kernel` (one choice, or
    {table or "*": choice}; None: "auto"). `metadata` defaults to `tables_metadata`."""
    kernel = resolve_kernels([t.name for t in tables], kernel)
    embeddings = build_embedding_bags(tables, kernel)
    towers = load_dense_towers(config, dense_tensors, dense_meta)
    core = DLRMCore(embeddings, towers, config.embedding_dim, config.dense_in_features).eval()
    if metadata is None:
        metadata = tables_metadata(config, tables, dense_meta, kernel)
    model = InferenceDLRM(core, config.dense_in_features, list(config.num_embeddings), metadata)
    return model.eval()


def load_inference_model(
    path: str | os.PathLike | Artifact, verify: bool = True, kernel: KernelArg = None
) -> InferenceDLRM:
    """An artifact written by `embq quantize` as an eager inference model (eval mode).

    Args:
        path: the artifact directory (or an already loaded `Artifact`).
        verify: check every file's sha256 while loading (reads each byte once).
        kernel: "auto" (default): every row-wise table in fbgemm's TBE, rows of at most 64 bytes
            padded to a power of two (fastest lookups; an int4 row of dim 64 takes 64 bytes
            instead of 36); "compact": 4-bit / 2-bit row-wise tables on ATen's n-bit
            embedding-bag ops over the memory-mapped rows (nothing copied: the least memory),
            the others in the TBE unpadded; "tbe": every row-wise table in the TBE, unpadded.
            Codebook / PQ tables use embq.runtime.codebook_bag in every case. The choices agree up to
            float32 rounding ("auto" and "tbe" run the same kernel and agree exactly).
            {table or "*": choice} chooses per table; None (default): the choices the artifact
            records (an artifact quantized from an `embq plan` plan), else "auto".

    Raises:
        ArtifactError: not a DLRM artifact, tables that disagree with its config, dense towers
            of an unknown kind, or anything `load_artifact` refuses.
        ConfigError: an unknown kernel choice.
    """
    if isinstance(kernel, str):
        check_kernel_choice(kernel)  # before reading anything
    artifact = path if isinstance(path, Artifact) else load_artifact(path, verify=verify)
    kernel = resolve_kernels(artifact.table_names(), kernel, recorded_kernels(artifact))
    config = dlrm_config(artifact)
    meta = artifact.dense_meta
    if meta is None:
        raise ArtifactError(
            f"{artifact.path} has no dense towers (dense.safetensors); it cannot predict"
        )
    # the reader checked that the tables follow the config's feature order
    tables = artifact_tables(artifact, model_pooling(artifact))
    return built_from(artifact, "the inference model", build_inference_model, config, tables,
                      artifact.dense(), meta, kernel, inference_metadata(artifact, kernel))  # fmt: skip


def built_from(artifact: Artifact, what: str, build: Any, *args: Any) -> Any:
    """build(*args), with anything but an EmbqError raised as an ArtifactError naming the
    artifact: every load failure is an EmbqError (e.g. torch's load_state_dict refusing dense
    tensors of other shapes than the config's layers)."""
    try:
        return build(*args)
    except EmbqError:
        raise
    except Exception as e:
        raise ArtifactError(
            f"{artifact.path}: cannot build {what} from it ({type(e).__name__}: {e}); its parts "
            "disagree with each other. Re-create the artifact."
        ) from e

