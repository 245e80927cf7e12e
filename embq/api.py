"""The public verbs: quantize a model, save and load the artifact, stream one large table, list
the formats. `embq/__init__.py` exposes them lazily; heavy libraries load on first use.

    qmodel = embq.quantize(model, embq.Plan.parse('{"*": "int4-greedy", "t_cat_0": "int8"}'))
    embq.save(qmodel, "model.embq")
    served = embq.load("model.embq")          # fbgemm kernels over the memory-mapped artifact
    logits = served(dense, kjt)               # float32 [B]
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embq.embedding.configs import FormatConfig, format_families, parse_format
from embq.errors import ConfigError
from embq.plan import Plan


class QuantizedModel:
    """A quantized DLRM (or EmbeddingBagCollection): what `quantize` returns and `load` loads.

    Calling it runs the model: for a DLRM, `qmodel(dense float32 [B, n_dense], sparse
    KeyedJaggedTensor) -> logits float32 [B]` on the runtime's kernels (the same module `load`
    builds from the artifact, so a saved and reloaded model answers bit for bit alike); for an
    EBC, `qmodel(kjt)` -> TorchRec's pooled KeyedTensor (quantized, from `quantize`) or
    `qmodel(values, offsets)` -> pooled float32 [B, sum of dims] (from `load`).

    Attributes:
        module: the torch module called.
        plan: the plan it was quantized with (for a loaded artifact: read back from the
            manifest's table formats and dense kind).
        tables: the encoded tables (`embq.artifact.schema.QuantizedTable`), in feature order.
        config: the `embq.models.dlrm.DLRMConfig`, or None for an EBC.
        dense: (tensors, meta) of the dense section as the artifact stores it, or None.
        path: the artifact it was loaded from (or saved to last), else None.
        digest: that artifact's identity, "sha256:..." (`embq.artifact.digest`: the manifest
            and, through it, every file), else None.
    """

    def __init__(self, module: Any, plan: Plan, tables: list, config: Any = None,
                 dense: tuple[dict, dict] | None = None, path: Path | None = None,
                 digest: str | None = None) -> None:  # fmt: skip
        # `module` may be a zero-argument function that builds it: built on first use, so that
        # quantize-then-save never copies the tables into kernels it does not run
        self._module = module
        self.plan = plan
        self.tables = list(tables)
        self.config = config
        self.dense = dense
        self.path = path
        self.digest = digest

    @property
    def module(self) -> Any:
        """The torch module called (built on first use)."""
        if callable(self._module) and not hasattr(self._module, "forward"):
            self._module = self._module()
        return self._module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.config is None and len(args) == 1 and hasattr(args[0], "offsets"):
            # an EBC called with a KeyedJaggedTensor: TorchRec's quant EBC (fbgemm's TBE) trusts
            # its offsets, so it gets the one input check first (embq.runtime.validate)
            from embq.runtime.validate import check_kjt

            check_kjt(args[0], {f: t.rows for t in self.tables for f in t.feature_names},
                      {f: t.name for t in self.tables for f in t.feature_names})  # fmt: skip
        return self.module(*args, **kwargs)

    def eval(self) -> QuantizedModel:
        """Inference mode (the module is always in it; here so code written for torch modules
        can call it)."""
        self.module.eval()
        return self

    @property
    def stats(self) -> dict[str, dict[str, Any]]:
        """{table name: {"format", "bytes", "fp32_bytes", "size_ratio", "relative_mse", ...}}."""
        return {t.name: {"format": t.format, **t.stats} for t in self.tables}

    @property
    def metadata(self) -> dict[str, Any] | None:
        """What a server needs to know (`embq.runtime.load.inference_metadata`), for a DLRM."""
        return getattr(self.module, "metadata", None)

    def __repr__(self) -> str:
        kind = "DLRM" if self.config is not None else "EmbeddingBagCollection"
        return f"<QuantizedModel {kind}, {len(self.tables)} tables, plan {self.plan}>"


@dataclass(frozen=True)
class FormatInfo:
    """One table format as `formats()` lists it.

    Attributes:
        name: the short name (`embq.embedding.configs`).
        bytes_per_row: the stored bytes of a row of dim D, as a formula.
        kernel: what serves it ("fbgemm-tbe", or "codebook-bag" for codebooks and PQ).
        description: one line.
    """

    name: str
    bytes_per_row: str
    kernel: str
    description: str


_DESCRIPTIONS = {
    "float": "raw little-endian rows",
    "rowwise-minmax": "row-wise min/max, fbgemm's fused rows (codes, fp16 scale, fp16 bias)",
    "rowwise-greedy": "EMB4 GREEDY ranges, byte-identical to ATen's optimized prepack",
    "rowwise-opt": "embq's better range search (same bytes as minmax)",
    "row-codebook": "per-row 16-centroid codebook (exact 1-D k-means), 4-bit codes",
    "shared-codebook": "per-row fp16 scale/offset + one 16-level codebook per table",
    "pq": "faiss product quantization (+ centroids per table)",
}


def _bytes_formula(config: FormatConfig) -> str:
    kind = config.kind
    if kind == "float":
        return f"{config.bits // 8}D"  # type: ignore[attr-defined]
    if kind == "rowwise":
        bits = config.bits  # type: ignore[attr-defined]
        return "D+4" if bits == 8 else f"D/{8 // bits}+4"
    if kind == "row-codebook":
        return "D/2+32"
    if kind == "shared-codebook":
        return "D/2+4 (+72 B per table)"
    return "ceil(M*bits/8) (+ M*2^bits*D/M*4 B of centroids per table)"


def formats() -> list[FormatInfo]:
    """Every table format: name, bytes-per-row formula, kernel, description (PQ by example:
    any pq<M>x<bits> works)."""
    out = []
    for name in format_families():
        config = parse_format(name)
        key = config.kind
        if key == "rowwise":
            key = f"rowwise-{config.search}"  # type: ignore[attr-defined]
        kernel = "fbgemm-tbe" if config.kind in ("float", "rowwise") else "codebook-bag"
        out.append(FormatInfo(name, _bytes_formula(config), kernel, _DESCRIPTIONS[key]))
    return out


def _dense_section(model: Any, plan: Plan, calib: Any) -> tuple[dict, dict]:
    """(tensors, meta) of the dense towers: the fp32 state dict, or towers quantized by
    `embq.dense` as the plan says, calibrated on `calib`."""
    from embq.artifact.writer import DENSE_KIND_FP32
    from embq.models.tables import dense_state_dict

    if plan.dense is None:
        return dense_state_dict(model), {"kind": DENSE_KIND_FP32}
    if calib is None:
        raise ConfigError(
            f"the plan quantizes the dense towers ({plan.dense}); pass calibration batches: "
            "embq.quantize(model, plan, calib=data.batches(...))"
        )
    from embq.dense.api import quantize as quantize_dense
    from embq.dense.serialize import dense_section

    dense = plan.dense
    towers = quantize_dense(model, method=dense.method, w_bits=dense.w_bits, a_bits=dense.a_bits,
                            calib=calib, **dense.option_dict)  # fmt: skip
    return dense_section(towers)


def _plan_kernels(plan: Plan, tables: list) -> dict[str, str]:
    """{table: kernel choice} for the tables the plan chooses a kernel for (own entry or "*")."""
    chosen = {t.name: plan.kernel_for(t.name) for t in tables}
    return {name: choice for name, choice in chosen.items() if choice is not None}


def _dlrm_module(config: Any, tables: list, dense: tuple[dict, dict], kernel: Any) -> Any:
    from embq.runtime.load import build_inference_model

    return build_inference_model(config, tables, dense[0], dense[1], kernel=kernel)


def quantize(
    model: Any,
    plan: Any,
    *,
    calib: Iterable | Any | None = None,
    progress: bool = True,
    kernel: str | None = None,
) -> QuantizedModel:
    """Quantize a TorchRec DLRM's (or EmbeddingBagCollection's) embedding tables and, when the
    plan says so, its dense towers. The input model is left untouched.

    Args:
        model: a float TorchRec `DLRM` (one table `t_<feature>` per feature, as `embq train`
            builds) or `EmbeddingBagCollection`.
        plan: a `Plan`, or anything `Plan.parse` reads: "int4-greedy",
            '{"*": "int4-opt", "t_cat_0": "int8"}', {"tables": ..., "dense": "brecq:w4a8"}.
        calib: calibration batches (objects with .dense, .sparse, .labels, e.g.
            `PreparedData.batches(...)`) or an `embq.dense.CalibrationCache`; needed when the
            plan quantizes the dense towers.
        progress: show a progress bar over the tables.
        kernel: lookup kernels of the returned model ("auto", "compact", "tbe"; see
            `embq.runtime.kernel_choice`); None (default): each table's kernel in the plan's
            "kernels", else "auto".

    Returns:
        A `QuantizedModel`; `save` writes it as an artifact.

    Raises:
        ConfigError: not a TorchRec model, a bad plan, or a dense plan without `calib`.
        FormatError: a table the format cannot store (dims that do not pack, NaN/Inf, ...).
    """
    from embq.embedding.encode import encode_tables
    from embq.models.tables import find_ebc, find_tables

    plan = Plan.parse(plan)
    ebc = find_ebc(model)
    tables = encode_tables(find_tables(model), plan, progress=progress)
    if model is ebc:
        if plan.dense is not None:
            raise ConfigError("an EmbeddingBagCollection has no dense towers; drop 'dense'")
        from embq.runtime.quant_ebc import build_quantized_ebc

        configs = list(ebc.embedding_bag_configs())
        return QuantizedModel(lambda: build_quantized_ebc(tables, configs).eval(), plan, tables)
    from embq.models.dlrm import config_from_model

    config = config_from_model(model)
    by_name = {t.name: t for t in tables}
    tables = [by_name[config.table_name(f)] for f in config.sparse_feature_names]
    dense = _dense_section(model, plan, calib)
    kernels = kernel if kernel is not None else _plan_kernels(plan, tables)
    return QuantizedModel(lambda: _dlrm_module(config, tables, dense, kernels), plan, tables,
                          config, dense)  # fmt: skip


def save(qmodel: QuantizedModel, path: str | os.PathLike) -> Path:
    """Write a quantized model as an artifact directory (atomically; `path` must not exist).
    The plan's per-table kernel choices are recorded, so that `load` serves them by default.

    Returns:
        The artifact path.
    """
    from embq.artifact.writer import ArtifactWriter, write_model_artifact

    if not isinstance(qmodel, QuantizedModel):
        raise ConfigError(f"save() takes what embq.quantize returns, got {type(qmodel).__name__}")
    kernels = _plan_kernels(qmodel.plan, qmodel.tables)
    with ArtifactWriter(path) as writer:
        if qmodel.config is not None:
            write_model_artifact(writer, qmodel.tables, qmodel.config, *qmodel.dense,
                                 kernels=kernels)  # fmt: skip
        else:
            for t in qmodel.tables:
                writer.add_table(t.name, t.format, t.codes, t.dim, params=t.params,
                                 feature_names=t.feature_names, stats=t.stats,
                                 kernel_choice=kernels.get(t.name))  # fmt: skip
        out = writer.publish()
    qmodel.path, qmodel.digest = Path(out), writer.digest
    return Path(out)


def _plan_of(artifact: Any) -> Plan:
    """The plan an artifact was written with, as far as its manifest tells: table formats, the
    kernel choices it records, and the dense method when its towers were quantized by
    embq.dense."""
    formats = [entry.format for entry in artifact.tables.values()]
    common = max(set(formats), key=formats.count) if formats else None
    tables = (("*", common),) if common else ()
    tables += tuple((name, e.format) for name, e in artifact.tables.items() if e.format != common)
    kernels = tuple((n, e.kernel_choice) for n, e in artifact.tables.items() if e.kernel_choice)
    meta = artifact.dense_meta or {}
    info = meta.get("info") or {}
    dense = None
    if meta.get("kind") != "fp32" and {"method", "w_bits", "a_bits"} <= set(info):
        dense = f"{info['method']}:w{info['w_bits']}a{info['a_bits']}"
    return Plan(tables, dense, kernels)


def load(
    path: str | os.PathLike,
    kernel: str | dict[str, str] | None = None,
    verify: bool = True,
    expect_digest: str | None = None,
) -> QuantizedModel:
    """Load an artifact for inference: its manifest's digest and every file's size and checksum
    checked (`verify`), tables on the runtime's kernels (`kernel`: "auto", "compact" or "tbe",
    or {table or "*": choice}; None: the choices the artifact records, else "auto"),
    memory-mapped. `expect_digest` ("sha256:...") pins the artifact: any other is refused.

    Raises:
        ArtifactError: a missing, truncated, tampered, unsealed or unknown artifact, or one
            whose digest is not `expect_digest`.
        ConfigError: an unknown kernel choice.
    """
    from embq.artifact.digest import check_expected_digest
    from embq.artifact.reader import load_artifact
    from embq.runtime.bags import (
        artifact_tables,
        build_embedding_bags,
        model_pooling,
        recorded_kernels,
    )
    from embq.runtime.kernel_choice import check_kernel_choice, resolve_kernels
    from embq.runtime.load import built_from, dlrm_config, load_inference_model

    if isinstance(kernel, str):
        check_kernel_choice(kernel)
    artifact = load_artifact(path, verify=verify)
    check_expected_digest(artifact.digest, expect_digest, str(artifact.path))
    plan = _plan_of(artifact)
    tables = artifact_tables(artifact, model_pooling(artifact))
    kernel = resolve_kernels([t.name for t in tables], kernel, recorded_kernels(artifact))
    if (artifact.model or {}).get("type") != "dlrm":
        module = built_from(artifact, "the table lookups", build_embedding_bags, tables, kernel)
        return QuantizedModel(module, plan, tables, path=artifact.path, digest=artifact.digest)
    config = dlrm_config(artifact)
    module = load_inference_model(artifact, kernel=kernel)
    dense = (artifact.dense(), dict(artifact.dense_meta or {}))
    return QuantizedModel(module, plan, tables, config, dense, path=artifact.path,
                          digest=artifact.digest)  # fmt: skip


def quantize_table(
    src: str | os.PathLike, fmt: str | FormatConfig, out: str | os.PathLike, **options: Any
) -> Path:
    """Quantize one table file (.npy, .safetensors, torch.save) larger than RAM into a one-table
    artifact, in row chunks, resumably (`embq.embedding.stream.quantize_table`; `options` are
    its keyword arguments: tensor, name, chunk_rows, resume, progress, ...).

    Returns:
        The artifact path.
    """
    from embq.embedding.stream import quantize_table as stream_table

    return stream_table(src, fmt, out, **options)

