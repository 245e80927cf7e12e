"""Pooled lookups of 4-bit / 2-bit row-wise tables on ATen's n-bit embedding-bag ops, reading the
artifact's memory-mapped rows in place (the runtime's "compact" kernel choice).
"""

from __future__ import annotations

import numpy as np
import torch

from embq.artifact.schema import POOLINGS, QuantizedTable
from embq.embedding.registry import get_format
from embq.errors import ArtifactError, ConfigError
from embq.runtime.scripted import CheckedLookups
from embq.runtime.tbe import PARALLEL_MIN_IDS
from embq.runtime.validate import NO_TABLE, SparseCheck


class _NBitTable(torch.nn.Module):
    """One 4-bit or 2-bit row-wise table of a `RowwiseNBitBagCollection`: its fused rows as the
    buffer `weight` (uint8 [rows, packed codes + 4], the artifact's bytes, not copied) and where
    its features sit in the caller's input."""

    def __init__(
        self,
        name: str,
        weight: torch.Tensor,
        bits: int,
        dim: int,
        pooling: str,
        first: int,
        feature_names: list[str],
    ) -> None:
        super().__init__()
        if bits not in (4, 2):
            raise ConfigError(
                f"table {name!r}: the ATen n-bit kernel takes 4 or 2 bits, not {bits}"
            )
        if pooling not in POOLINGS:
            raise ConfigError(f"table {name!r}: pooling {pooling!r} is not one of {POOLINGS}")
        per_byte = 8 // bits
        if weight.dtype != torch.uint8 or weight.ndim != 2 or (
            weight.shape[1] != dim // per_byte + 4 or dim % per_byte
        ):
            raise ArtifactError(
                f"table {name!r}: int{bits} rows of dim {dim} must be uint8 "
                f"[rows, {dim // per_byte + 4}], got {weight.dtype} {list(weight.shape)}"
            )
        self.register_buffer("weight", weight)
        self.name: str = name
        self.bits: int = int(bits)
        self.dim: int = int(dim)
        self.rows: int = int(weight.shape[0])
        self.mean: bool = pooling == "MEAN"
        self.first: int = int(first)
        self.count: int = len(feature_names)
        self.feature_names = list(feature_names)


class RowwiseNBitBagCollection(CheckedLookups, torch.nn.Module):
    """Pooled lookups of 4-bit / 2-bit row-wise tables with ATen's
    `quantized::embedding_bag_{4,2}bit_rowwise_offsets`, one call per table (CPU).

    Those ops read fbgemm's fused rows with qparams LAST (packed codes, fp16 scale, fp16 bias) --
    exactly embq's row-wise bytes -- so the tables are used in place (memory-mapped artifact rows
    stay memory-mapped). The op always SUMs (its `mode` argument is ignored); MEAN tables divide
    by the bag length here (an empty bag pools to 0, as in fbgemm's TBE).

    The module takes the caller's WHOLE input, key-major over `num_features` features, and each
    table reads its own features' bags (`first` .. `first + count - 1`) in place, so no
    permutation is needed when it serves only some of the features.

    The input is checked (`embq.runtime.validate.SparseCheck`: offsets inside `values`, each
    table's ids in [0, rows)) before any op reads it -- the ops' own bounds checks are not part
    of their contract -- with embq.errors.DataError naming what is wrong (under TorchScript a
    torch.jit.Error carrying "embq.errors.DataError: ..."). `_lookup_checked_input` skips the
    check, for a caller that ran it already.

    Threads: with torch.get_num_threads() > 1, a batch of at least `parallel_min_ids` ids spreads
    the tables over that many tasks (torch.jit.fork, torch's inter-op pool), each looking up its
    own tables: the lookups are bound by memory latency, so each core adds misses
    in flight. (OMP_WAIT_POLICY=ACTIVE defeats this: OpenMP threads busy-waiting after an op
    take the cores the tasks need; the default policy and PASSIVE are fine.)

    The tables are fixed once built: the per-table lists the loops read (`weights`, ...) hold the
    same tensors as the `tables` submodules' `weight` buffers, which state_dict lists.

    forward(values int64 [N], offsets int64 [num_features * B + 1]) -> float32
    [B, sum of its tables' count * dim], tables in order, each table's features in order.
    """

    # Eager calls run the module's TorchScript copy (ScriptedCopy): its per-table overhead is
    # ~2 us against ~5 us for the Python loop, which matters at small batches (26 tables at
    # batch 1: ~50 us vs ~130 us), and its tasks run in parallel.

    def __init__(self, tables: list[_NBitTable], num_features: int) -> None:
        super().__init__()
        if not tables:
            raise ConfigError("a RowwiseNBitBagCollection needs at least one table")
        self.tables = torch.nn.ModuleList(tables)
        self.num_features: int = int(num_features)
        self.out_dim: int = sum(t.count * t.dim for t in tables)
        self.any_mean: bool = any(t.mean for t in tables)
        self.parallel_min_ids: int = PARALLEL_MIN_IDS
        self.threads: int = 1  # tasks of a scripted forward (see forward)
        # Per table, as lists: TorchScript loops over them with a real loop (a ModuleList loop
        # is unrolled, and the executor's first runs of a 26-fold unrolled graph take seconds).
        # Lists stay unannotated: TorchScript infers their types from the (non-empty) values.
        self.weights = [t.weight for t in tables]
        self.table_names = [t.name for t in tables]
        self.table_bits = [t.bits for t in tables]
        self.table_rows = [t.rows for t in tables]
        self.table_means = [t.mean for t in tables]
        self.table_firsts = [t.first for t in tables]
        self.table_counts = [t.count for t in tables]
        # Per feature of the caller's input: its name and table ("" for features other kernels
        # serve, whose ids are not checked here) and the rows of that table; and the position of
        # its table's first feature.
        names, table_of = [""] * num_features, [""] * num_features
        limit = [NO_TABLE] * num_features
        table_first = list(range(num_features))
        for t in tables:
            for j in range(t.count):
                names[t.first + j] = t.feature_names[j]
                table_of[t.first + j] = t.name
                limit[t.first + j] = t.rows
                table_first[t.first + j] = t.first
        self.feature_names = names
        self.check = SparseCheck(names, table_of, limit)
        self.register_buffer(
            "table_first", torch.tensor(table_first, dtype=torch.int64), persistent=False
        )

    @classmethod
    def from_tables(
        cls, tables: list[QuantizedTable], first: list[int], num_features: int
    ) -> RowwiseNBitBagCollection:
        """From encoded tables; first[i] is the position of tables[i]'s first feature in the
        caller's feature order (its features follow it, in order)."""
        modules = []
        for t, start in zip(tables, first):
            codes = t.codes
            if isinstance(codes, np.ndarray):
                # memory-mapped (mode "c": writable, so from_numpy takes it without a copy) or
                # in-memory rows; ascontiguousarray copies only rows that are not contiguous
                codes = torch.from_numpy(np.ascontiguousarray(codes))
            codes = codes.contiguous()  # the ops read contiguous rows only (no copy if they are)
            modules.append(
                _NBitTable(
                    t.name,
                    codes,
                    get_format(t.format).bits,
                    t.dim,
                    t.pooling,
                    start,
                    list(t.feature_names),
                )
            )
        return cls(modules, num_features)

    def _cuts(self, starts: list[int], tasks: int) -> list[int]:
        """Table indices [0, ..., len(tables)] cutting the tables into at most `tasks` runs of
        about equal numbers of ids."""
        sizes: list[int] = []
        for i in range(len(self.weights)):
            first = self.table_firsts[i]
            sizes.append(starts[first + self.table_counts[i]] - starts[first])
        total = sum(sizes)
        cuts: list[int] = [0]
        done = 0
        for i in range(len(sizes) - 1):
            done += sizes[i]
            if len(cuts) < tasks and done * tasks >= total * len(cuts):
                cuts.append(i + 1)
        cuts.append(len(sizes))
        return cuts

    def _pool(
        self,
        values: torch.Tensor,
        relative: torch.Tensor,
        lengths: torch.Tensor,
        starts: list[int],
        batch: int,
        lo: int,
        hi: int,
    ) -> list[torch.Tensor]:
        """pooled [B, count * dim] of tables lo .. hi - 1 (one op call each)."""
        outs: list[torch.Tensor] = []
        for i in range(lo, hi):
            first = self.table_firsts[i]
            count = self.table_counts[i]
            ids = values[starts[first] : starts[first + count]]
            bag_offsets = relative[first * batch : (first + count) * batch]
            if self.table_bits[i] == 4:
                pooled = torch.ops.quantized.embedding_bag_4bit_rowwise_offsets(
                    self.weights[i], ids, bag_offsets, False, 0, False, None, None, False
                )
            else:
                pooled = torch.ops.quantized.embedding_bag_2bit_rowwise_offsets(
                    self.weights[i], ids, bag_offsets, False, 0, False, None, None, False
                )
            if self.table_means[i]:
                divisor = lengths[first * batch : (first + count) * batch].clamp(min=1)
                pooled = pooled / divisor.to(torch.float32).unsqueeze(1)
            if count > 1:  # [count * B, dim], feature-major -> [B, count * dim]
                pooled = pooled.reshape(count, batch, -1).transpose(0, 1).reshape(batch, -1)
            outs.append(pooled)
        return outs

    def _lookup(
        self, values: torch.Tensor, offsets: torch.Tensor, batch: int, threads: int
    ) -> torch.Tensor:
        """The lookups of an input already checked (int64, B = `batch`)."""
        if batch == 0:
            return torch.zeros(0, self.out_dim, dtype=torch.float32)
        values = values.contiguous()  # the ops take contiguous ids only
        bounds = offsets[0::batch]  # [F + 1]: where each feature's ids start in `values`
        starts: list[int] = bounds.tolist()
        cuts: list[int] = [0, len(self.weights)]
        if threads > 1 and len(self.weights) > 1 and values.numel() >= self.parallel_min_ids:
            cuts = self._cuts(starts, threads)
        # every bag's offset relative to the first id of its table, for all tables at once
        relative = (
            offsets[:-1].reshape(self.num_features, batch)
            - bounds.index_select(0, self.table_first).unsqueeze(1)
        ).reshape(-1)
        lengths = offsets[1:] - offsets[:-1] if self.any_mean else offsets[:0]
        futures: list[torch.jit.Future[list[torch.Tensor]]] = []
        for k in range(1, len(cuts) - 1):
            futures.append(
                torch.jit.fork(
                    self._pool, values, relative, lengths, starts, batch, cuts[k], cuts[k + 1]
                )
            )
        outs = self._pool(values, relative, lengths, starts, batch, cuts[0], cuts[1])
        for future in futures:
            outs.extend(torch.jit.wait(future))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
