"""Encoded tables as TorchRec's own quantized modules: the quant `EmbeddingBagCollection` (fbgemm
TBE) for row-wise tables, and a mixed collection when codebook / PQ tables join them.

embq's row-wise bytes go UNCHANGED into TorchRec's quant EBC (`table_name_to_quantized_weights`),
i.e. into fbgemm's `IntNBitTableBatchedEmbeddingBagsCodegen`; codebook / PQ formats have no
fbgemm kernel and are looked up by `embq.runtime.codebook_bag.CodebookBagCollection`.
"""

from __future__ import annotations

import numpy as np
import torch

from embq.artifact.schema import QuantizedTable
from embq.embedding.registry import get_format
from embq.errors import FormatError
from embq.runtime.validate import check_kjt


def is_rowwise(format_name: str) -> bool:
    """Whether fbgemm's TBE reads this format's rows directly (it has an fbgemm SparseType)."""
    return get_format(format_name).sparse_type is not None


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
    sparse_type = get_format(format_name).sparse_type
    if sparse_type is None:
        raise FormatError(f"{format_name} has no fbgemm kernel; it is served by embq.runtime.codebook_bag")
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
        sparse_type = get_format(t.format).sparse_type
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
        from embq.runtime.codebook_bag import CodebookBagCollection

        rowwise = [t for t in tables if is_rowwise(t.format)]
        codebook = [t for t in tables if not is_rowwise(t.format)]
        self.rowwise = build_torchrec_qebc(rowwise) if rowwise else None
        self.codebook = CodebookBagCollection.from_tables(codebook)
        self._configs = configs
        self._codebook_keys = self.codebook.feature_names
        self._rows = {f: t.rows for t in tables for f in t.feature_names}
        self._tables = {f: t.name for t in tables for f in t.feature_names}

    def embedding_bag_configs(self) -> list:
        """The float model's `EmbeddingBagConfig`s (DLRM's SparseArch reads names and dims)."""
        return self._configs

    def is_weighted(self) -> bool:
        return False

    def forward(self, features):
        from torchrec.sparse.jagged_tensor import KeyedTensor

        # the permutation below and TorchRec's TBE trust the KJT's offsets: check them (and the
        # ids) first, the one check of embq.runtime.validate
        check_kjt(features, self._rows, self._tables)
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
