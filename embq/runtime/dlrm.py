"""The quantized DLRM on plain tensors: the dot interaction, the dense towers' container, the
scriptable core that TorchScript exports, and the eager model that takes a KeyedJaggedTensor.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from embq.errors import DataError
from embq.runtime.bags import QuantEmbeddingBags
from embq.runtime.validate import NO_TABLE, SparseCheck, check_dense


class DotInteraction(torch.nn.Module):
    """DLRM's pairwise dot interaction: TorchRec's `InteractionArch`, equal bit for bit (the same
    bmm and concatenations), with the upper triangle of each [F + 1, F + 1] product picked by one
    flat index_select instead of a 2-D advanced index: 1.24 ms instead of 1.64 ms at batch 512
    with 26 features of dim 64 (one thread, this project's VM).

    forward(dense [B, D], sparse [B, F, D]) -> [B, D + F + F choose 2].
    """

    def __init__(self, num_sparse_features: int) -> None:
        super().__init__()
        self.F: int = int(num_sparse_features)
        rows, cols = torch.triu_indices(self.F + 1, self.F + 1, offset=1)
        self.register_buffer("flat_indices", rows * (self.F + 1) + cols, persistent=False)

    def forward(self, dense_features: torch.Tensor, sparse_features: torch.Tensor) -> torch.Tensor:
        if self.F <= 0:
            return dense_features
        combined = torch.cat((dense_features.unsqueeze(1), sparse_features), dim=1)
        products = torch.bmm(combined, combined.transpose(1, 2))
        square = (self.F + 1) * (self.F + 1)  # explicit: -1 is ambiguous for an empty batch
        pairs = products.reshape(products.shape[0], square).index_select(1, self.flat_indices)
        return torch.cat((dense_features, pairs), dim=1)


class DenseTowers(NamedTuple):
    """A DLRM's dense part: bottom MLP, feature interaction, top MLP (scriptable modules).

    dense_arch: float32 [B, n_dense] -> [B, D]; inter_arch: ([B, D], [B, F, D]) -> [B, K];
    over_arch: [B, K] -> [B, 1].
    """

    dense_arch: torch.nn.Module
    inter_arch: torch.nn.Module
    over_arch: torch.nn.Module




class DLRMCore(torch.nn.Module):
    """A quantized DLRM on plain tensors: the module that TorchScript exports.

    forward(dense float32 [B, n_dense], values int [N], offsets int [F*B+1]) -> logits float32
    [B]; values / offsets are key-major in `feature_names` order (see the module docstring).
    The input is checked first, here, so that an exported file is safe on its own: the sparse
    input by the embeddings' `SparseCheck` (offsets inside `values`, ids inside their tables),
    the dense input by `check_dense` (shape, finite); a refusal is an embq.errors.DataError
    (under TorchScript a torch.jit.Error carrying "embq.errors.DataError: ..."). Then it
    computes what TorchRec's DLRM computes: bottom MLP, pooled embeddings [B, F, D], pairwise
    dot interaction, top MLP.
    """

    def __init__(
        self,
        embeddings: QuantEmbeddingBags,
        towers: DenseTowers,
        embedding_dim: int,
        dense_in_features: int,
    ) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.dense_arch = towers.dense_arch
        self.inter_arch = towers.inter_arch
        self.over_arch = towers.over_arch
        self.num_features: int = embeddings.num_features
        self.embedding_dim: int = int(embedding_dim)
        self.dense_in_features: int = int(dense_in_features)

    def forward(
        self, dense: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor
    ) -> torch.Tensor:
        values, offsets, batch = self.embeddings.check(values, offsets)
        dense = check_dense(dense, batch, self.dense_in_features)
        if batch == 0:
            return torch.zeros(0, dtype=torch.float32)
        embedded_dense = self.dense_arch(dense)
        pooled = self.embeddings._lookup_checked_input(values, offsets, batch)
        sparse = pooled.reshape(-1, self.num_features, self.embedding_dim)
        return self.over_arch(self.inter_arch(embedded_dense, sparse)).reshape(-1)


class InferenceDLRM(torch.nn.Module):
    """The eager inference model: forward(dense float32 [B, n_dense], sparse KeyedJaggedTensor)
    -> logits float32 [B]. The KJT may hold its keys in any order, and extra keys are ignored;
    the inputs are checked by `core` (DataError: shapes, offsets, ids outside a table, NaN).

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

    def forward(self, dense: torch.Tensor, sparse) -> torch.Tensor:
        values, offsets = self.sparse_inputs(sparse, batch=self._batch_of(dense))
        return self.core(dense, values, offsets)

    def _batch_of(self, dense: torch.Tensor) -> int:
        if (
            not isinstance(dense, torch.Tensor)
            or dense.ndim != 2
            or dense.shape[1] != self.dense_in_features
        ):
            got = list(dense.shape) if isinstance(dense, torch.Tensor) else type(dense).__name__
            raise DataError(f"dense must be float32 [B, {self.dense_in_features}], got {got}")
        return int(dense.shape[0])

    def sparse_inputs(self, sparse, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [N], offsets [F*B+1]) in `feature_names` order from a KJT (checked by the
        core, not here; a KJT with its keys in another order has its offsets checked before
        they are used to reorder it)."""
        if not all(hasattr(sparse, a) for a in ("keys", "values", "offsets", "stride")):
            raise DataError(f"sparse must be a KeyedJaggedTensor, got {type(sparse).__name__}")
        keys = list(sparse.keys())
        missing = [f for f in self.feature_names if f not in keys]
        if missing:
            raise DataError(
                f"the sparse input lacks features {missing}; the model needs {self.feature_names}"
            )
        if sparse.variable_stride_per_key() or sparse.stride() != batch:
            raise DataError(
                f"every sparse feature needs exactly B={batch} bags (one per dense row)"
            )
        values, offsets = sparse.values(), sparse.offsets()
        if keys == self.feature_names:
            return values, offsets
        if len(set(keys)) != len(keys):
            raise DataError(f"the sparse input repeats a feature: {keys}")
        # only the offsets' structure here: the ids are checked by the core, in model order
        structure = SparseCheck(keys, [""] * len(keys), [NO_TABLE] * len(keys))
        structure.check_offsets(values, offsets)
        bounds = offsets[0::batch].tolist() if batch > 0 else [0] * (len(keys) + 1)
        lengths = (offsets[1:] - offsets[:-1]).reshape(len(keys), batch)
        order = [keys.index(f) for f in self.feature_names]
        values = torch.cat([values[bounds[k] : bounds[k + 1]] for k in order])
        counts = lengths[order].reshape(-1).to(torch.int64)
        return values, torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
