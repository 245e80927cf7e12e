"""TorchRec models in, quantized TorchRec models out.

`find_tables` lists the embedding tables of a TorchRec `EmbeddingBagCollection` or `DLRM`;
`quantize_tables` encodes them with embq formats; `quantize_model` does both and swaps the
quantized tables into a model of the same kind:

- row-wise formats (fp32, fp16, int8/4/2 and their greedy/opt searches) are fbgemm's fused rows;
  their bytes go UNCHANGED into TorchRec's quant `EmbeddingBagCollection`
  (`table_name_to_quantized_weights`), i.e. into fbgemm's `IntNBitTableBatchedEmbeddingBagsCodegen`;
- codebook / PQ formats have no fbgemm kernel and are looked up by
  `embq.codebook_bag.CodebookBagCollection` (gather codes, look up centroids, pool).

A plan is one format name for every table, or {table name: format name}, optionally with a
"*" entry as the default for tables it does not name.

Example::

    model, config = embq.model.load_model("runs/demo/model")
    result = quantize_model(model, {"*": "int4-greedy", "t_cat_3": "int8"})
    result.model(dense, kjt)            # a DLRM whose sparse arch reads the quantized tables
    result.stats["t_cat_3"]             # {"bytes": ..., "size_ratio": ..., "relative_mse": ...}
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from embq.errors import ConfigError, FormatError

DEFAULT_SAMPLE_ROWS = 65_536  # rows drawn to fit codebooks; the same default as embq.stream
CHUNK_ROWS = 65_536  # rows encoded / measured at a time: bounds the float32 copies we make
PLAN_DEFAULT_KEY = "*"
POOLINGS = ("SUM", "MEAN")


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


@dataclass
class QuantizedTable:
    """One table encoded with an embq format: what an artifact stores and a kernel loads.

    Attributes:
        name, rows, dim, feature_names, pooling: as in `TableInfo`.
        format: the embq format name.
        codes: uint8 [rows, bytes_per_row] encoded rows.
        params: {name: array} table-level params (codebooks), {} for row-wise formats.
        stats: {"bytes", "fp32_bytes", "size_ratio", "relative_mse", "rmse"}; see `table_stats`.
    """

    name: str
    rows: int
    dim: int
    feature_names: list[str]
    pooling: str
    format: str
    codes: np.ndarray = field(repr=False)
    params: dict[str, np.ndarray] = field(repr=False)
    stats: dict[str, Any]


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


# --------------------------------------------------------------------------- finding tables


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


# --------------------------------------------------------------------------- plans


def _get_format(name: Any):
    """embq.formats.get_format, with an unknown name reported as a ConfigError (a bad plan)."""
    from embq.formats import format_names, get_format

    try:
        return get_format(name)
    except FormatError as e:
        raise ConfigError(
            f"unknown format {name!r} in the plan; valid formats: {', '.join(format_names())} "
            "(and any pq<M>x<bits>)"
        ) from e


SMALL_TABLE_FALLBACK = "fp16"


def resolve_plan(tables: list[TableInfo], plan: str | Mapping[str, str]) -> dict[str, str]:
    """{table name: format name} for every table, checked.

    Args:
        tables: the model's tables (`find_tables`).
        plan: one format name for all tables, or {table name: format name}; a "*" entry is the
            default for tables not named. A table given the default whose format needs more
            rows to fit than the table has (`TableFormat.min_fit_rows`) is kept as fp16
            (SMALL_TABLE_FALLBACK); a table named explicitly gets its format or an error.

    Raises:
        ConfigError: a table the model does not have, a table the plan leaves out (with no "*"),
            or a format name embq does not know; the message lists the valid choices.
        FormatError: a format that cannot store a table of that dim (e.g. int4 at dim 6).
    """
    names = [t.name for t in tables]
    if isinstance(plan, str):
        plan = {PLAN_DEFAULT_KEY: plan}
    if not isinstance(plan, Mapping) or not plan:
        raise ConfigError(
            f"a plan is a format name or a non-empty {{table: format}} dict, got {plan!r}"
        )
    unknown = sorted(k for k in plan if k != PLAN_DEFAULT_KEY and k not in names)
    if unknown:
        raise ConfigError(
            f"the plan names tables {unknown} that the model does not have; its tables are {names}"
        )
    missing = [n for n in names if n not in plan and PLAN_DEFAULT_KEY not in plan]
    if missing:
        raise ConfigError(
            f"the plan gives no format for tables {missing}; name them or add a "
            f"{PLAN_DEFAULT_KEY!r} default"
        )
    resolved = {t.name: plan.get(t.name, plan.get(PLAN_DEFAULT_KEY)) for t in tables}
    for table in tables:
        fmt = _get_format(resolved[table.name])
        if table.rows < fmt.min_fit_rows() and table.name not in plan:
            # A default format that must learn more centroids than the table has rows (PQ with
            # 256 centroids on a 4-row table): such a table is a few KB, so it stays fp16.
            resolved[table.name] = SMALL_TABLE_FALLBACK
            continue
        try:
            fmt.check_dim(table.dim)
        except FormatError as e:
            raise FormatError(f"table {table.name!r} (dim {table.dim}): {e}") from e
    return resolved


# --------------------------------------------------------------------------- encoding


def is_rowwise(format_name: str) -> bool:
    """Whether fbgemm's TBE reads this format's rows directly (it has an fbgemm SparseType)."""
    return _get_format(format_name).sparse_type is not None


def _chunks(rows: int, chunk_rows: int = CHUNK_ROWS):
    for start in range(0, rows, chunk_rows):
        yield start, min(start + chunk_rows, rows)


def _float_rows(weight: torch.Tensor, start: int, stop: int) -> np.ndarray:
    """Rows start..stop-1 of a table as a float32 numpy array [stop - start, dim]."""
    return weight[start:stop].detach().to(torch.float32).cpu().numpy()


def table_stats(
    weight: torch.Tensor, format_name: str, codes: np.ndarray, params: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Size and error of an encoded table, measured over every row.

    Returns:
        {"bytes": encoded rows + table-level params (bytes, no alignment padding),
         "fp32_bytes": rows * dim * 4, "size_ratio": bytes / fp32_bytes,
         "relative_mse": sum((W - decode(codes))^2) / sum(W^2) (float64),
         "rmse": root mean squared error per value, in table units}
    """
    fmt = _get_format(format_name)
    rows, dim = int(weight.shape[0]), int(weight.shape[1])
    sse = energy = 0.0
    for start, stop in _chunks(rows):
        w = _float_rows(weight, start, stop).astype(np.float64)
        err = fmt.decode(codes[start:stop], params, dim).astype(np.float64) - w
        sse += float(np.sum(err * err))
        energy += float(np.sum(w * w))
    nbytes = int(codes.nbytes) + int(fmt.params_bytes(dim, params))
    fp32 = rows * dim * 4
    return {
        "bytes": nbytes,
        "fp32_bytes": fp32,
        "size_ratio": nbytes / fp32,
        "relative_mse": sse / energy if energy > 0 else 0.0,
        "rmse": float(np.sqrt(sse / (rows * dim))),
    }


def quantize_table(
    table: TableInfo, format_name: str, *, sample_rows: int = DEFAULT_SAMPLE_ROWS, seed: int = 0
) -> QuantizedTable:
    """Encode one table: fit table-level params on a seeded row sample, encode in row chunks.

    Args:
        table: the float table.
        format_name: an embq format name.
        sample_rows: rows drawn (without replacement, seeded) to fit codebooks; row-wise formats
            fit nothing.
        seed: the sampling seed.
    """
    fmt = _get_format(format_name)
    try:
        fmt.check_dim(table.dim)
        n = min(int(sample_rows), table.rows)
        idx = np.sort(np.random.default_rng(seed).choice(table.rows, size=n, replace=False))
        sample = table.weight[torch.from_numpy(idx)].detach().to(torch.float32).numpy()
        params = fmt.fit(sample)
        codes = np.empty((table.rows, fmt.bytes_per_row(table.dim)), dtype=np.uint8)
        for start, stop in _chunks(table.rows):
            codes[start:stop] = fmt.encode(_float_rows(table.weight, start, stop), params)
    except FormatError as e:
        raise FormatError(f"table {table.name!r} as {format_name}: {e}") from e
    return QuantizedTable(
        name=table.name,
        rows=table.rows,
        dim=table.dim,
        feature_names=list(table.feature_names),
        pooling=table.pooling,
        format=format_name,
        codes=codes,
        params=params,
        stats=table_stats(table.weight, format_name, codes, params),
    )


def quantize_tables(
    tables: list[TableInfo],
    plan: str | Mapping[str, str],
    *,
    sample_rows: int = DEFAULT_SAMPLE_ROWS,
    seed: int = 0,
) -> list[QuantizedTable]:
    """Encode every table as the plan says (see `resolve_plan`), in table order."""
    resolved = resolve_plan(tables, plan)
    return [quantize_table(t, resolved[t.name], sample_rows=sample_rows, seed=seed) for t in tables]


# --------------------------------------------------------------------------- modules


def tbe_weight_pair(
    format_name: str, codes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split fused rows (uint8 [rows, bytes_per_row]) into the (weights, scale_bias) pair that
    fbgemm's TBE and TorchRec's quant EBC take.

    embq rows keep fbgemm's fused layout, qparams LAST (codes, fp16 scale, fp16 bias); the TBE
    keeps them FIRST. Passing `(q[:, :-4], q[:, -4:])` makes `assign_embedding_weights` move them
    into place, byte for byte. (`reverse_qparam=True` only changes that split, not the CPU lookup,
    so it must stay False.) Float formats are their raw bytes with no qparams.
    """
    sparse_type = _get_format(format_name).sparse_type
    if sparse_type is None:
        raise FormatError(f"{format_name} has no fbgemm kernel; it is served by embq.codebook_bag")
    if sparse_type in ("FP32", "FP16"):
        return codes, None
    return codes[:, :-4], codes[:, -4:]


def _codes_tensor(table: QuantizedTable) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(table.codes))


def build_torchrec_qebc(tables: list[QuantizedTable]) -> torch.nn.Module:
    """TorchRec's quant `EmbeddingBagCollection` holding row-wise tables' bytes unchanged.

    Every table must have a row-wise format. CPU, float32 output.
    """
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC
    from torchrec.types import DataType

    configs, weights = [], {}
    for t in tables:
        sparse_type = _get_format(t.format).sparse_type
        if sparse_type is None:
            raise FormatError(f"table {t.name!r}: {t.format} is not a row-wise format")
        configs.append(
            EmbeddingBagConfig(
                name=t.name,
                num_embeddings=t.rows,
                embedding_dim=t.dim,
                feature_names=list(t.feature_names),
                pooling=PoolingType[t.pooling],
                data_type=DataType[sparse_type],
            )
        )
        weights[t.name] = tbe_weight_pair(t.format, _codes_tensor(t))
    return QuantEBC(
        configs,
        is_weighted=False,
        device=torch.device("cpu"),
        output_dtype=torch.float32,
        table_name_to_quantized_weights=weights,
    )


class MixedQuantEmbeddingBagCollection(torch.nn.Module):
    """A quantized EBC for plans that mix row-wise and codebook formats.

    Row-wise tables live in a TorchRec quant EBC (fbgemm TBE); codebook / PQ tables in a
    `CodebookBagCollection`. forward(KeyedJaggedTensor) -> KeyedTensor of pooled float32
    [B, sum of dims], keyed by feature, like any TorchRec EBC (key order: TorchRec's for the
    row-wise features, then the codebook features).
    """

    def __init__(self, tables: list[QuantizedTable], configs: list) -> None:
        super().__init__()
        from embq.codebook_bag import CodebookBagCollection

        rowwise = [t for t in tables if is_rowwise(t.format)]
        codebook = [t for t in tables if not is_rowwise(t.format)]
        self.rowwise = build_torchrec_qebc(rowwise) if rowwise else None
        self.codebook = CodebookBagCollection.from_tables(codebook)
        self._configs = configs
        self._codebook_keys = self.codebook.feature_names

    def embedding_bag_configs(self) -> list:
        """The float model's `EmbeddingBagConfig`s (DLRM's SparseArch reads names and dims)."""
        return self._configs

    def is_weighted(self) -> bool:
        return False

    def forward(self, features):
        from torchrec.sparse.jagged_tensor import KeyedTensor

        keys = features.keys()
        out_keys, values, length_per_key = [], [], []
        if self.rowwise is not None:
            # TorchRec orders its output by pooling group, not by table: take its own keys
            pooled = self.rowwise(features)
            out_keys += pooled.keys()
            values.append(pooled.values())
            length_per_key += pooled.length_per_key()
        sub = features.permute([keys.index(k) for k in self._codebook_keys])
        values.append(self.codebook(sub.values(), sub.offsets()))
        length_per_key += self.codebook.feature_dims
        return KeyedTensor(
            keys=out_keys + self._codebook_keys,
            length_per_key=length_per_key,
            values=torch.cat(values, dim=1),
        )


def build_quantized_ebc(tables: list[QuantizedTable], configs: list) -> torch.nn.Module:
    """The quantized EBC for encoded tables: TorchRec's quant EBC when every table is row-wise,
    else a `MixedQuantEmbeddingBagCollection`. `configs` are the float EBC's configs."""
    if all(is_rowwise(t.format) for t in tables):
        return build_torchrec_qebc(tables)
    return MixedQuantEmbeddingBagCollection(tables, configs)


def quantize_model(
    model: torch.nn.Module,
    plan: str | Mapping[str, str],
    *,
    sample_rows: int = DEFAULT_SAMPLE_ROWS,
    seed: int = 0,
) -> QuantizeResult:
    """Quantize the embedding tables of a TorchRec EBC or DLRM.

    The input model is left untouched. For a DLRM the result is a DLRM with the same (copied)
    dense towers whose `sparse_arch.embedding_bag_collection` is the quantized EBC; for an EBC
    it is the quantized EBC. Pooled outputs equal pooling the format's decoded rows.

    Args:
        model: a float TorchRec `EmbeddingBagCollection` or `DLRM`.
        plan: a format name for every table, or {table name: format} ("*" = default).
        sample_rows, seed: how codebook formats draw the rows they are fitted on.

    Raises:
        ConfigError: not a TorchRec model, or a bad plan (unknown table / format).
        FormatError: a table the format cannot store (dims that do not pack, NaN/Inf, ...).
    """
    ebc = find_ebc(model)
    tables = quantize_tables(find_tables(model), plan, sample_rows=sample_rows, seed=seed)
    qebc = build_quantized_ebc(tables, copy.deepcopy(ebc.embedding_bag_configs()))
    qebc.eval()
    if model is ebc:
        return QuantizeResult(qebc, tables)
    # Copy the dense towers but not the float tables (memo maps the EBC to itself), then swap.
    quantized = copy.deepcopy(model, memo={id(ebc): ebc})
    quantized.sparse_arch.embedding_bag_collection = qebc
    quantized.eval()
    return QuantizeResult(quantized, tables)
