"""Every table of a model behind one module: each table on the kernel that serves its format.

`build_embedding_bags` groups encoded tables by kernel (fbgemm TBE, ATen n-bit, codebook bags)
and `QuantEmbeddingBags` runs the groups on plain tensors (TorchScript-friendly), putting their
pooled outputs back in the caller's feature order.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import torch

from embq.artifact.reader import Artifact, load_artifact
from embq.artifact.schema import POOLINGS, QuantizedTable
from embq.errors import ArtifactError
from embq.runtime.codebook_bag import CodebookBagCollection
from embq.runtime.kernel_choice import (
    KERNEL_CODEBOOK,
    KERNEL_NBIT,
    KERNEL_TBE,
    check_kernel_choice,
    resolve_kernels,
    table_kernel,
    tbe_row_alignment,
)
from embq.runtime.nbit import RowwiseNBitBagCollection
from embq.runtime.tbe import CheckedTBE, build_tbe, split_runs
from embq.runtime.validate import SparseCheck


class FeatureGroup(torch.nn.Module):
    """One lookup kernel and the features it serves.

    `features` are indices into the caller's feature order; forward picks those features' bags
    out of the caller's jagged input (fbgemm `permute_2D_sparse_data`; skipped when the kernel
    serves every feature in order, or takes the whole input itself: `whole_input`) and returns
    the kernel's pooled float32 [B, sum of its dims]. The input must have passed the caller's
    `SparseCheck` (the permutation trusts the offsets, and the kernel is called without its
    own check).
    """

    def __init__(
        self,
        kernel: torch.nn.Module,
        features: list[int],
        num_features: int,
        whole_input: bool = False,
    ) -> None:
        import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm.*, which forward calls)

        super().__init__()
        self.kernel = kernel
        self.identity: bool = whole_input or list(features) == list(range(num_features))
        self.register_buffer(
            "features", torch.tensor(features, dtype=torch.int32), persistent=False
        )

    def forward(
        self, values: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor, batch: int
    ) -> torch.Tensor:
        """values int64 [N], offsets int64 [F*B+1], lengths int64 [F, B] of the whole input,
        checked; B = `batch`."""
        if self.identity:
            return self.kernel._lookup_checked_input(values, offsets, batch)
        sub_lengths, sub_values, _ = torch.ops.fbgemm.permute_2D_sparse_data(
            self.features, lengths, values, None, None
        )
        sub_offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(sub_lengths.reshape(-1))
        return self.kernel._lookup_checked_input(sub_values, sub_offsets, batch)


class QuantEmbeddingBags(torch.nn.Module):
    """Pooled lookups of every table of a model, on plain tensors (TorchScript-friendly).

    forward(values int [N], offsets int [F*B+1]) -> float32 [B, sum of dims]: the input is
    key-major in `feature_names` order (a KeyedJaggedTensor's values() / offsets() with those
    keys), checked once by `check` (`embq.runtime.validate.SparseCheck`, DataError) before any
    kernel reads it; the output puts the features side by side in the same order.
    `_lookup_checked_input` is forward without the check, for a caller that ran it (`DLRMCore`).
    """

    def __init__(
        self,
        groups: list[FeatureGroup],
        feature_names: list[str],
        feature_dims: list[int],
        group_features: list[list[int]],
        table_names: list[str],
        feature_rows: list[int],
    ) -> None:
        super().__init__()
        self.groups = torch.nn.ModuleList(groups)
        self.feature_names = list(feature_names)
        self.feature_dims = list(feature_dims)
        self.num_features: int = len(feature_names)
        self.check = SparseCheck(feature_names, table_names, feature_rows)
        # Groups emit their features' columns group by group; `pieces` puts them back in
        # feature order: (group, first column, width) of each run of features that sit side by
        # side in one group's output and in the model's order, concatenated once. (A column
        # gather, index_select on dim 1, took 3 ms for [512, 26 x 64] on one thread here: six
        # times copying the output, which is what the concatenation of slices costs.)
        where = {}
        for g, fs in enumerate(group_features):
            column = 0
            for f in fs:
                where[f] = (g, column)
                column += feature_dims[f]
        pieces: list[list[int]] = []
        for f in range(len(feature_names)):
            g, column = where[f]
            last = pieces[-1] if pieces else None
            if last is not None and last[0] == g and last[1] + last[2] == column:
                last[2] += feature_dims[f]
            else:
                pieces.append([g, column, feature_dims[f]])
        self.pieces: list[tuple[int, int, int]] = [(g, c, w) for g, c, w in pieces]
        self.in_order: bool = len(self.pieces) == 1

    def forward(self, values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        values, offsets, batch = self.check(values, offsets)
        return self._lookup_checked_input(values, offsets, batch)

    def _lookup_checked_input(
        self, values: torch.Tensor, offsets: torch.Tensor, batch: int
    ) -> torch.Tensor:
        """forward of an input that `check` passed (int64, B = `batch`)."""
        lengths = (offsets[1:] - offsets[:-1]).reshape(self.num_features, batch)
        outs: list[torch.Tensor] = []
        for group in self.groups:
            outs.append(group(values, offsets, lengths, batch))
        if self.in_order:
            return outs[0]
        return torch.cat([outs[g].narrow(1, c, w) for g, c, w in self.pieces], dim=1)


def build_embedding_bags(
    tables: list[QuantizedTable], kernel: str | Mapping[str, str] = "auto"
) -> QuantEmbeddingBags:
    """Kernels for encoded tables: one fbgemm TBE per pooling mode and row alignment for the
    row-wise tables (`tbe_row_alignment`), except 4-bit / 2-bit ones with kernel="compact": one
    `RowwiseNBitBagCollection` (ATen, memory-mapped rows) for those; one `CodebookBagCollection`
    for codebook / PQ tables. Feature order: tables in order, each table's feature_names in
    order. `kernel`: one choice for every table, or {table or "*": choice}
    (`resolve_kernels`; tables it leaves out take "auto").

    Raises:
        ConfigError: an unknown kernel choice, or a table the mapping names that is not there.
    """
    choice = resolve_kernels([t.name for t in tables], kernel)
    first, feature_names, feature_dims = {}, [], []
    for t in tables:
        first[t.name] = len(feature_names)
        feature_names.extend(t.feature_names)
        feature_dims.extend([t.dim] * len(t.feature_names))
    num_features = len(feature_names)

    def features_of(group: list[QuantizedTable]) -> list[int]:
        return [first[t.name] + j for t in group for j in range(len(t.feature_names))]

    served_by = {t.name: table_kernel(t.format, choice[t.name]) for t in tables}
    kernels: list[tuple[torch.nn.Module, list[QuantizedTable], bool]] = []
    nbit = [t for t in tables if served_by[t.name] == KERNEL_NBIT]
    if nbit:
        collection = RowwiseNBitBagCollection.from_tables(
            nbit, [first[t.name] for t in nbit], num_features
        )
        kernels.append((collection, nbit, True))  # reads its features from the whole input
    # one TBE per pooling mode and row alignment (a TBE pads all its rows alike)
    tbe_groups: dict[tuple[str, int], list[QuantizedTable]] = {}
    for t in tables:
        if served_by[t.name] == KERNEL_TBE:
            alignment = tbe_row_alignment(int(t.codes.shape[1]), choice[t.name])
            tbe_groups.setdefault((t.pooling, alignment), []).append(t)
    for (pooling, alignment), tbe in sorted(tbe_groups.items()):
        # one TBE per torch thread (see CheckedTBE), over runs of consecutive tables
        runs = split_runs([len(t.feature_names) for t in tbe], torch.get_num_threads())
        bounds = np.concatenate([[0], np.cumsum(runs)])
        groups = [tbe[bounds[k] : bounds[k + 1]] for k in range(len(runs))]
        checked = CheckedTBE(
            [build_tbe(g, pooling, alignment) for g in groups],
            [sum(len(t.feature_names) for t in g) for g in groups],
            [f for t in tbe for f in t.feature_names],
            [t.name for t in tbe for _ in t.feature_names],
            [t.rows for t in tbe for _ in t.feature_names],
            [t.dim for t in tbe for _ in t.feature_names],
        )
        kernels.append((checked, tbe, False))
    codebook = [t for t in tables if served_by[t.name] == KERNEL_CODEBOOK]
    if codebook:
        kernels.append((CodebookBagCollection.from_tables(codebook), codebook, False))
    groups = [FeatureGroup(k, features_of(ts), num_features, whole) for k, ts, whole in kernels]
    return QuantEmbeddingBags(
        groups, feature_names, feature_dims, [features_of(ts) for _, ts, _ in kernels],
        [t.name for t in tables for _ in t.feature_names],
        [t.rows for t in tables for _ in t.feature_names],
    )  # fmt: skip


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


def model_pooling(artifact: Artifact) -> dict[str, str] | None:
    """The manifest's {table: "SUM" | "MEAN"} (in its "model" section), or None."""
    return (artifact.model or {}).get("pooling")


def recorded_kernels(artifact: Artifact) -> dict[str, str]:
    """{table: kernel choice} the artifact records (tables quantized from an `embq plan` plan)."""
    return {name: e.kernel_choice for name, e in artifact.tables.items() if e.kernel_choice}


def load_embedding_bags(
    path: str | os.PathLike | Artifact,
    verify: bool = True,
    kernel: str | Mapping[str, str] | None = None,
) -> QuantEmbeddingBags:
    """The pooled-lookup module of an artifact's tables (any artifact, with or without a model).
    `kernel`: see `build_embedding_bags`; None: the choices the artifact records, else "auto"."""
    if isinstance(kernel, str):
        check_kernel_choice(kernel)  # before reading anything
    artifact = path if isinstance(path, Artifact) else load_artifact(path, verify=verify)
    tables = artifact_tables(artifact, model_pooling(artifact))
    choices = resolve_kernels([t.name for t in tables], kernel, recorded_kernels(artifact))
    return build_embedding_bags(tables, choices)

