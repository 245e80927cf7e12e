"""Artifact -> inference modules: fbgemm kernels for row-wise tables, codebook bags else.

`load_inference_model(path)` turns an artifact written by `embq quantize` into an eager module,
`forward(dense float32 [B, n_dense], sparse KeyedJaggedTensor) -> logits float32 [B]`:

- row-wise tables (fp32, fp16, int8, int4, int2 and their searches) go into fbgemm's
  `IntNBitTableBatchedEmbeddingBagsCodegen` (kernel "fbgemm-tbe"), CPU /
  `EmbeddingLocation.HOST`, one module per pooling mode and row size, holding every such table
  whatever its format (the kernel mixes weight types). Their bytes are copied from the
  artifact's memory-mapped rows as they are (the TBE keeps qparams first): nothing is
  re-quantized and the tables stay compressed in memory. By default (kernel="auto") a row of at
  most 64 bytes is padded to the next power of two, so that no row straddles two cache lines:
  with uniform ids over large tables a straddling row costs a second memory access, which is
  most of a lookup (`scripts/bench_serving.py --quick`: int4 rows of dim 64, 36 bytes, look up
  ~1.7x faster padded to 64 bytes than unpadded, fbgemm's CPU default). Ids are range-checked
  by `CheckedTBE` before the TBE reads them;
- kernel="compact" keeps the memory footprint at the artifact's size instead: 4-bit and 2-bit
  tables are looked up by ATen's `quantized::embedding_bag_{4,2}bit_rowwise_offsets`
  (`RowwiseNBitBagCollection`, kernel "aten-nbit"), which reads the artifact's fused rows
  (codes, fp16 scale, fp16 bias) in place: the rows stay memory-mapped (shared between
  processes serving the same file), nothing is copied. One op call per table, tables spread
  over torch's threads for large batches. kernel="tbe" puts every row-wise table in the TBE
  with unpadded rows;
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
A scripted module cannot read torch's thread count: its lookups run on one thread unless told
otherwise, e.g. `for g in m.embeddings.groups.children(): if hasattr(g.kernel, "threads"):
g.kernel.threads = 2` (eager models follow torch.get_num_threads()). TBE tables are split into
one TBE per torch thread when the model is loaded (`CheckedTBE`): export under the thread count
the server will use.
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
from embq.errors import ArtifactError, ConfigError, DataError
from embq.kernel_choice import KERNEL_CHOICES  # "auto", "compact", "tbe": see the docstring
from embq.model import DLRMConfig
from embq.torchrec import POOLINGS, QuantizedTable, is_rowwise, tbe_weight_pair

METADATA_FILE = "embq_metadata.json"  # extra file inside exported TorchScript archives

# Lookup kernels, as named in `inference_metadata` ("kernel" of each table).
KERNEL_TBE = "fbgemm-tbe"  # fbgemm IntNBitTableBatchedEmbeddingBagsCodegen
KERNEL_NBIT = "aten-nbit"  # ATen quantized::embedding_bag_{4,2}bit_rowwise_offsets
KERNEL_CODEBOOK = "codebook-bag"  # embq.codebook_bag
CACHE_LINE = 64  # bytes: x86-64 and most ARM server cores
TBE_ROW_ALIGNMENT = 1  # fbgemm's default for the CPU TBE: rows unpadded
# Lookup kernels that spread their tables over threads do so for batches of at least this many
# ids: below it a fork (and waking a pool thread) costs more than it saves (n-bit kernel measured
# on 2 cores: slower at 33k ids, 1.3x faster at 66k, 1.4x at 266k).
PARALLEL_MIN_IDS = 65536


def check_kernel_choice(kernel: str) -> str:
    """`kernel` if it is one of KERNEL_CHOICES, else ConfigError."""
    if kernel not in KERNEL_CHOICES:
        raise ConfigError(f"kernel must be one of {KERNEL_CHOICES}, got {kernel!r}")
    return kernel


def table_kernel(format_name: str, kernel: str = "auto") -> str:
    """The lookup kernel (KERNEL_NBIT, KERNEL_TBE or KERNEL_CODEBOOK) that serves a table of
    `format_name` under the `kernel` choice."""
    check_kernel_choice(kernel)
    if not is_rowwise(format_name):
        return KERNEL_CODEBOOK
    from embq.formats import get_format

    fmt = get_format(format_name)
    if kernel == "compact" and fmt.sparse_type in ("INT4", "INT2") and fmt.bits in (4, 2):
        return KERNEL_NBIT
    return KERNEL_TBE


def tbe_row_alignment(row_bytes: int, kernel: str = "auto") -> int:
    """The TBE `row_alignment` for rows of `row_bytes` (codes + qparams) under `kernel`: with
    "auto", the smallest power of two holding a row of at most one cache line, so that every
    row lies inside one line (the TBE's rows start at multiples of their padded size, in a
    64-byte aligned buffer); otherwise, and for rows longer than a line, fbgemm's CPU default
    (unpadded rows)."""
    check_kernel_choice(kernel)
    if kernel != "auto" or row_bytes > CACHE_LINE:
        return TBE_ROW_ALIGNMENT
    alignment = 1
    while alignment < row_bytes:
        alignment *= 2
    return alignment


def table_memory_bytes(
    format_name: str, rows: int, file_bytes: int, bytes_per_row: int, kernel: str = "auto"
) -> int:
    """Bytes a loaded table holds in memory: the TBE's padded rows (TBE tables are copied), or
    the table file's size for kernels that read the memory-mapped file in place."""
    if table_kernel(format_name, kernel) != KERNEL_TBE:
        return int(file_bytes)
    alignment = tbe_row_alignment(bytes_per_row, kernel)
    return int(rows) * (-(-int(bytes_per_row) // alignment) * alignment)


# --------------------------------------------------------------------------- embedding lookups


def build_tbe(
    tables: list[QuantizedTable], pooling: str, row_alignment: int = TBE_ROW_ALIGNMENT
) -> torch.nn.Module:
    """One fbgemm `IntNBitTableBatchedEmbeddingBagsCodegen` for row-wise tables of any mix of
    formats, all pooled with `pooling`, each row padded to a multiple of `row_alignment` bytes.
    forward(indices, offsets) -> float32 [B, sum of dims], features in table order (each
    table's feature_names in order).

    The module does not check ids (BoundsCheckMode.NONE): wrap it in `CheckedTBE`, whose check
    costs a fraction of fbgemm's FATAL mode (one min / max over the ids in the common case).
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
        bounds_check_mode=BoundsCheckMode.NONE,
        weight_lists=weights,
        output_dtype=SparseType.FP32,
        row_alignment=row_alignment,
    )


def first_feature_out_of_range(
    values: torch.Tensor, starts: list[int], feature_rows: list[int], min_rows: int
) -> int:
    """The first feature f whose ids values[starts[f] : starts[f + 1]] leave [0, feature_rows[f]),
    or -1: one min / max over every id when they all lie below `min_rows` (the smallest table),
    else a min / max per feature."""
    if values.numel() == 0:
        return -1
    low, high = torch.aminmax(values)
    if int(low) >= 0 and int(high) < min_rows:
        return -1
    for f in range(len(feature_rows)):
        if starts[f + 1] > starts[f]:
            low, high = torch.aminmax(values[starts[f] : starts[f + 1]])
            if int(low) < 0 or int(high) >= feature_rows[f]:
                return f
    return -1


def id_out_of_range_message(ids: torch.Tensor, rows: int, feature: str, table: str) -> str:
    """The message naming the first of one feature's `ids` outside [0, rows), or "" if none is."""
    bad = ((ids < 0) | (ids >= rows)).nonzero()
    if bad.numel() == 0:
        return ""
    message = "id {} of feature '{}' is outside its table's {} rows (table '{}')"
    return message.format(int(ids[int(bad[0, 0])]), feature, rows, table)


class ScriptedCopy:
    """Mixin for modules whose eager calls run a TorchScript copy of themselves
    (`scripted_copy()`: made on first use, and again after an attribute of the module is set;
    it shares the module's tensors, nothing is copied). torch.jit.fork runs tasks in parallel
    only inside TorchScript, and a scripted loop costs less per op than Python's. The copy is no
    part of the module's state, and scripting the module leaves it out."""

    __jit_ignored_attributes__ = ["_scripted"]
    _scripted: Any = None

    @torch.jit.unused
    def scripted_copy(self) -> Any:
        scripted = self.__dict__.get("_scripted")
        if scripted is None:
            # in __dict__, not registered as a submodule (setattr would register a Module)
            scripted = self.__dict__["_scripted"] = torch.jit.script(self)
        return scripted

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_scripted"] = None  # copies and pickles script themselves again
        return state

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name != "_scripted" and self.__dict__.get("_scripted") is not None:
            self.__dict__["_scripted"] = None  # re-scripted on the next call, with the change


class CheckedTBE(ScriptedCopy, torch.nn.Module):
    """TBEs (`build_tbe`) behind a range check of their ids: an id outside [0, rows) of its
    table raises embq.errors.DataError naming the feature, id and table (under TorchScript a
    torch.jit.Error carrying "embq.errors.DataError: ...") before any TBE reads anything.

    `parts`: the tables split into runs of consecutive features, one TBE each (`part_features`:
    how many features each serves). fbgemm's CPU TBE looks its tables up on one thread, so a
    model loaded under several torch threads gets one part per thread, and a batch of at least
    `parallel_min_ids` ids runs the parts as parallel tasks (torch.jit.fork, torch's inter-op
    pool): the lookups are bound by memory latency, so each core adds misses in flight. Eager
    calls check the ids, then run the module's TorchScript copy (ScriptedCopy) on
    torch.get_num_threads(); a scripted module uses its attribute `threads` (1 unless set on
    the loaded module). One part reads the whole input, with no slicing.

    forward(values int64 [N], offsets int64 [F * B + 1]) -> float32 [B, sum of dims], the
    features (`feature_names`, key-major) in order.
    """

    def __init__(
        self, parts: list[torch.nn.Module], part_features: list[int], feature_names: list[str],
        table_names: list[str], feature_rows: list[int], feature_dims: list[int],
    ) -> None:  # fmt: skip
        super().__init__()
        if not parts or len(parts) != len(part_features) or sum(part_features) != len(feature_rows):
            raise ConfigError(f"parts serving {part_features} features do not cover {len(feature_rows)}")
        self.parts = torch.nn.ModuleList(parts)
        self.part_firsts = [int(f) for f in np.concatenate([[0], np.cumsum(part_features)])]
        self.feature_names = list(feature_names)
        self.table_names = list(table_names)  # the table behind each feature
        self.feature_rows = [int(r) for r in feature_rows]
        self.min_rows: int = min(self.feature_rows)
        self.num_features: int = len(self.feature_rows)
        self.out_dim: int = int(sum(feature_dims))
        self.threads: int = 1  # tasks of a scripted forward (see the class docstring)
        self.parallel_min_ids: int = PARALLEL_MIN_IDS

    def _check(self, values: torch.Tensor, starts: list[int]) -> None:
        f = first_feature_out_of_range(values, starts, self.feature_rows, self.min_rows)
        if f >= 0:
            ids = values[starts[f] : starts[f + 1]]
            raise DataError(
                id_out_of_range_message(
                    ids, self.feature_rows[f], self.feature_names[f], self.table_names[f]
                )
            )

    @torch.jit.export
    def lookup(
        self, values: torch.Tensor, offsets: torch.Tensor, threads: int, check: bool
    ) -> torch.Tensor:
        """forward with the ids range-checked first if `check`, and the parts run as parallel
        tasks when `threads` > 1 and the batch is large enough."""
        batch = (offsets.shape[0] - 1) // self.num_features
        if batch == 0:
            return torch.zeros(0, self.out_dim, dtype=torch.float32)
        starts: list[int] = offsets[0::batch].tolist()
        if check:
            self._check(values, starts)
        if len(self.parts) == 1:
            for part in self.parts:
                return part(values, offsets)
        forked = threads > 1 and values.numel() >= self.parallel_min_ids
        futures: list[torch.jit.Future[torch.Tensor]] = []
        outs: list[torch.Tensor] = []
        for i in range(1 if forked else 0, len(self.part_firsts) - 1):
            if forked:  # parts 1.. as tasks; part 0 runs here once they are handed out
                futures.append(torch.jit.fork(self._part, i, values, offsets, starts, batch))
            else:
                outs.append(self._part(i, values, offsets, starts, batch))
        if forked:
            outs.append(self._part(0, values, offsets, starts, batch))
        for future in futures:
            outs.append(torch.jit.wait(future))
        return torch.cat(outs, dim=1)

    def _part(
        self, i: int, values: torch.Tensor, offsets: torch.Tensor, starts: list[int], batch: int
    ) -> torch.Tensor:
        """Part i's lookups: its features' ids and bag offsets, sliced out of the input."""
        first, last = self.part_firsts[i], self.part_firsts[i + 1]
        part_values = values[starts[first] : starts[last]]
        part_offsets = offsets[first * batch : last * batch + 1] - starts[first]
        out = torch.zeros(0)
        for j, part in enumerate(self.parts):  # a ModuleList takes constant indices only
            if j == i:
                out = part(part_values, part_offsets)
        return out

    @torch.jit.unused
    def _eager_forward(self, values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """forward, in eager mode: the ids checked here (DataError), then the scripted copy's
        lookup on torch's thread count (its per-call overhead is a third of the TBE's Python
        forward: ~12 us against ~30 us for 26 tables at batch 1)."""
        batch = (offsets.shape[0] - 1) // self.num_features
        if batch > 0:
            self._check(values, offsets[0::batch].tolist())
        return self.scripted_copy().lookup(values, offsets, torch.get_num_threads(), False)

    def forward(self, values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            return self._eager_forward(values, offsets)
        return self.lookup(values, offsets, self.threads, True)


def split_runs(sizes: list[int], parts: int) -> list[int]:
    """How many consecutive items each of at most `parts` runs takes, balancing the sums of
    `sizes` (e.g. tables' feature counts) across runs; no run is empty."""
    parts = max(1, min(parts, len(sizes)))
    total, counts, done, taken = sum(sizes), [], 0, 0
    for k in range(1, parts + 1):
        start = taken
        # extend the run until it reaches its share (leaving one item for each run after it)
        while taken < len(sizes) - (parts - k) and (taken == start or done * parts < total * k):
            done += sizes[taken]
            taken += 1
        counts.append(taken - start)
    counts[-1] += len(sizes) - taken
    return counts


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


class RowwiseNBitBagCollection(ScriptedCopy, torch.nn.Module):
    """Pooled lookups of 4-bit / 2-bit row-wise tables with ATen's
    `quantized::embedding_bag_{4,2}bit_rowwise_offsets`, one call per table (CPU).

    Those ops read fbgemm's fused rows with qparams LAST (packed codes, fp16 scale, fp16 bias) --
    exactly embq's row-wise bytes -- so the tables are used in place (memory-mapped artifact rows
    stay memory-mapped). The op always SUMs (its `mode` argument is ignored); MEAN tables divide
    by the bag length here (an empty bag pools to 0, as in fbgemm's TBE).

    The module takes the caller's WHOLE input, key-major over `num_features` features, and each
    table reads its own features' bags (`first` .. `first + count - 1`) in place, so no
    permutation is needed when it serves only some of the features.

    Ids are checked before any op reads them (the ops' own bounds checks are not part of their
    contract): an id outside [0, rows) of its table raises embq.errors.DataError naming the
    feature, id and table (under TorchScript a torch.jit.Error -- a RuntimeError when the tables
    were spread over threads -- whose message carries "embq.errors.DataError: ..."). The check
    is one min / max over all ids when they all lie below the smallest table's rows, else one
    vectorized comparison (small batches) or a min / max per table (large ones, and each
    thread's own tables when they are spread over threads).

    Threads: with torch.get_num_threads() > 1, a batch of at least `parallel_min_ids` ids spreads
    the tables over that many tasks (torch.jit.fork, torch's inter-op pool), each checking and
    looking up its own tables: the lookups are bound by memory latency, so each core adds misses
    in flight. (OMP_WAIT_POLICY=ACTIVE defeats this: OpenMP threads busy-waiting after an op
    take the cores the tasks need; the default policy and PASSIVE are fine.)

    The tables are fixed once built: the per-table lists the loops read (`weights`, ...) hold the
    same tensors as the `tables` submodules' `weight` buffers, which state_dict lists.

    forward(values int64 [N], offsets int64 [num_features * B + 1]) -> float32
    [B, sum of its tables' count * dim], tables in order, each table's features in order.
    """

    # At most this many ids are range-checked with one per-id comparison (it materializes a
    # limit per id); more are checked with a min / max per table.
    VECTOR_CHECK_IDS = 16384
    # Eager calls run the module's TorchScript copy (ScriptedCopy): its per-table overhead is
    # ~2 us against ~5 us for the Python loop, which matters at small batches (26 tables at
    # batch 1: ~50 us vs ~130 us), and its tasks run in parallel.

    def __init__(self, tables: list[_NBitTable], num_features: int) -> None:
        super().__init__()
        if not tables:
            raise ConfigError("a RowwiseNBitBagCollection needs at least one table")
        self.tables = torch.nn.ModuleList(tables)
        self.num_features: int = int(num_features)
        self.min_rows: int = min(t.rows for t in tables)
        self.out_dim: int = sum(t.count * t.dim for t in tables)
        self.any_mean: bool = any(t.mean for t in tables)
        self.vector_check_ids: int = self.VECTOR_CHECK_IDS
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
        # Per feature of the caller's input: its name ("" for features other kernels serve), the
        # rows of the table serving it (int64 max for the others) and the position of its
        # table's first feature.
        names = [""] * num_features
        limit = [torch.iinfo(torch.int64).max] * num_features
        table_first = list(range(num_features))
        for t in tables:
            for j in range(t.count):
                names[t.first + j] = t.feature_names[j]
                limit[t.first + j] = t.rows
                table_first[t.first + j] = t.first
        self.feature_names = names
        self.register_buffer(
            "feature_rows", torch.tensor(limit, dtype=torch.int64), persistent=False
        )
        self.register_buffer(
            "table_first", torch.tensor(table_first, dtype=torch.int64), persistent=False
        )

    @classmethod
    def from_tables(
        cls, tables: list[QuantizedTable], first: list[int], num_features: int
    ) -> RowwiseNBitBagCollection:
        """From encoded tables; first[i] is the position of tables[i]'s first feature in the
        caller's feature order (its features follow it, in order)."""
        from embq.formats import get_format

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

    def _out_of_range(self, values: torch.Tensor, starts: list[int]) -> str:
        """The error message naming the first id outside its table."""
        for i in range(len(self.weights)):
            for j in range(self.table_counts[i]):
                f = self.table_firsts[i] + j
                message = id_out_of_range_message(
                    values[starts[f] : starts[f + 1]],
                    self.table_rows[i],
                    self.feature_names[f],
                    self.table_names[i],
                )
                if message:
                    return message
        negative = (values < 0).nonzero()  # in a feature another kernel serves
        if negative.numel() > 0:
            k = int(negative[0, 0])
            return "id {} (position {} of the ids) is negative".format(int(values[k]), k)
        return "an id is outside its table's rows"

    def _ids_in_range(
        self, values: torch.Tensor, bounds: torch.Tensor, starts: list[int]
    ) -> bool:
        """Whether every id of this collection's features lies in [0, rows of its table) and no
        id at all is negative."""
        n = values.numel()
        if n == 0:
            return True
        low, high = torch.aminmax(values)
        if int(low) < 0:
            return False
        if int(high) < self.min_rows:
            return True
        if n <= self.vector_check_ids:
            limit = torch.repeat_interleave(
                self.feature_rows, bounds[1:] - bounds[:-1], dim=0, output_size=n
            )
            return not bool((values >= limit).any())
        for i in range(len(self.weights)):
            start = starts[self.table_firsts[i]]
            stop = starts[self.table_firsts[i] + self.table_counts[i]]
            if stop > start and int(values[start:stop].max()) >= self.table_rows[i]:
                return False
        return True

    @torch.jit.unused
    def _eager_forward(self, values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """forward, in eager mode: the scripted copy's `lookup` on torch's intra-op thread count,
        with its refusals as DataError."""
        try:
            return self.scripted_copy().lookup(values, offsets, torch.get_num_threads())
        except (torch.jit.Error, RuntimeError) as e:  # RuntimeError: resumed after a fork
            if "embq.errors.DataError" not in str(e):
                raise
            batch = max((offsets.shape[0] - 1) // self.num_features, 1)
            raise DataError(
                self._out_of_range(values, offsets[0::batch].tolist())
            ) from None

    def forward(self, values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Pooled lookups (see the class docstring). Eager calls spread the tables over
        torch.get_num_threads() tasks; TorchScript cannot read that setting, so a scripted
        module uses its attribute `threads` (1 unless set on the loaded module)."""
        if not torch.jit.is_scripting():
            return self._eager_forward(values, offsets)
        return self.lookup(values, offsets, self.threads)

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
        check: bool,
    ) -> tuple[list[torch.Tensor], bool]:
        """(pooled [B, count * dim] of tables lo .. hi - 1 (one op call each), whether all were
        looked up). `check`: range-check each table's ids (min / max) before its op, and stop
        at the first table with an id outside it (the caller raises, so that a forked task's
        refusal surfaces as the same error)."""
        outs: list[torch.Tensor] = []
        for i in range(lo, hi):
            first = self.table_firsts[i]
            count = self.table_counts[i]
            ids = values[starts[first] : starts[first + count]]
            if check and ids.numel() > 0:
                low, high = torch.aminmax(ids)
                if int(low) < 0 or int(high) >= self.table_rows[i]:
                    return outs, False
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
        return outs, True

    @torch.jit.export
    def lookup(self, values: torch.Tensor, offsets: torch.Tensor, threads: int) -> torch.Tensor:
        """forward, with the tables spread over up to `threads` tasks (see the class docstring)
        when the batch holds at least `parallel_min_ids` ids."""
        batch = (offsets.shape[0] - 1) // self.num_features
        if batch == 0:
            return torch.zeros(0, self.out_dim, dtype=torch.float32)
        values = values.contiguous()  # the ops take contiguous ids only
        bounds = offsets[0::batch]  # [F + 1]: where each feature's ids start in `values`
        starts: list[int] = bounds.tolist()
        cuts: list[int] = [0, len(self.weights)]
        if threads > 1 and len(self.weights) > 1 and values.numel() >= self.parallel_min_ids:
            cuts = self._cuts(starts, threads)
        # One task: one check of every id first. Several: each task checks its own tables, one
        # by one; a min / max over every id would run on torch's intra-op threads, whose
        # busy-waiting afterwards would take the cores the tasks need.
        forked = len(cuts) > 2
        if not forked and not self._ids_in_range(values, bounds, starts):
            raise DataError(self._out_of_range(values, starts))
        # every bag's offset relative to the first id of its table, for all tables at once
        relative = (
            offsets[:-1].reshape(self.num_features, batch)
            - bounds.index_select(0, self.table_first).unsqueeze(1)
        ).reshape(-1)
        lengths = offsets[1:] - offsets[:-1] if self.any_mean else offsets[:0]
        futures: list[torch.jit.Future[tuple[list[torch.Tensor], bool]]] = []
        for k in range(1, len(cuts) - 1):
            futures.append(
                torch.jit.fork(
                    self._pool,
                    values,
                    relative,
                    lengths,
                    starts,
                    batch,
                    cuts[k],
                    cuts[k + 1],
                    forked,
                )
            )
        outs, ok = self._pool(values, relative, lengths, starts, batch, cuts[0], cuts[1], forked)
        for future in futures:
            more, done = torch.jit.wait(future)
            outs.extend(more)
            ok = ok and done
        if not ok:
            raise DataError(self._out_of_range(values, starts))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


class FeatureGroup(torch.nn.Module):
    """One lookup kernel and the features it serves.

    `features` are indices into the caller's feature order; forward picks those features' bags
    out of the caller's jagged input (fbgemm `permute_2D_sparse_data`; skipped when the kernel
    serves every feature in order, or takes the whole input itself: `whole_input`) and returns
    the kernel's pooled float32 [B, sum of its dims].
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


def build_embedding_bags(
    tables: list[QuantizedTable], kernel: str = "auto"
) -> QuantEmbeddingBags:
    """Kernels for encoded tables: one fbgemm TBE per pooling mode and row alignment for the
    row-wise tables (`tbe_row_alignment`), except 4-bit / 2-bit ones with kernel="compact": one
    `RowwiseNBitBagCollection` (ATen, memory-mapped rows) for those; one `CodebookBagCollection`
    for codebook / PQ tables. Feature order: tables in order, each table's feature_names in
    order.

    Raises:
        ConfigError: kernel is not one of KERNEL_CHOICES.
    """
    from embq.codebook_bag import CodebookBagCollection

    first, feature_names, feature_dims = {}, [], []
    for t in tables:
        first[t.name] = len(feature_names)
        feature_names.extend(t.feature_names)
        feature_dims.extend([t.dim] * len(t.feature_names))
    num_features = len(feature_names)

    def features_of(group: list[QuantizedTable]) -> list[int]:
        return [first[t.name] + j for t in group for j in range(len(t.feature_names))]

    served_by = {t.name: table_kernel(t.format, kernel) for t in tables}
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
            alignment = tbe_row_alignment(int(t.codes.shape[1]), kernel)
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
        groups, feature_names, feature_dims, [features_of(ts) for _, ts, _ in kernels]
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
    path: str | os.PathLike | Artifact, verify: bool = True, kernel: str = "auto"
) -> QuantEmbeddingBags:
    """The pooled-lookup module of an artifact's tables (any artifact, with or without a model).
    `kernel`: see `build_embedding_bags`."""
    check_kernel_choice(kernel)  # before reading anything
    artifact = path if isinstance(path, Artifact) else load_artifact(path, verify=verify)
    return build_embedding_bags(
        artifact_tables(artifact, _model_section(artifact, required=False).get("pooling")),
        kernel,
    )


# --------------------------------------------------------------------------- dense towers


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


DenseLoader = Callable[[DLRMConfig, dict[str, torch.Tensor], dict[str, Any]], DenseTowers]
# meta "kind" -> the loader, or "module:function" naming one (imported on first use, so kinds
# whose code lives elsewhere, e.g. embq.dense, need no import here). The one dispatch table.
DENSE_LOADERS: dict[str, DenseLoader | str] = {
    "embq-dense-ptq": "embq.dense.runtime_towers:load_towers",  # towers from embq.dense
}


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
    """TorchRec's DenseArch / OverArch with the float state dict loaded, and `DotInteraction`
    (TorchRec's InteractionArch, faster)."""
    from torchrec.models.dlrm import DenseArch, OverArch, choose

    n = len(config.sparse_feature_names)
    towers = DenseTowers(
        DenseArch(config.dense_in_features, list(config.dense_arch)),
        DotInteraction(num_sparse_features=n),
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


def inference_metadata(
    artifact: str | os.PathLike | Artifact, kernel: str = "auto"
) -> dict[str, Any]:
    """What a server needs to know about an artifact, as JSON-able data.

    `kernel`: the kernel choice the model is (or will be) loaded with (see
    `load_inference_model`); it decides each table's "kernel" entry.

    Returns:
        {"model": "dlrm" | None,
         "tables": [{name, format, kernel ("aten-nbit" | "fbgemm-tbe" | "codebook-bag"), rows,
                     dim, bytes (the table file, bytes), bytes_per_row, memory_bytes (what the
                     loaded kernel holds: `table_memory_bytes`), feature_names, pooling,
                     stats}],
         "table_bytes": total bytes of the table files,
         "memory_bytes": total memory_bytes of the tables,
         "fp32_bytes": what the same tables take in fp32 (rows * dim * 4),
         "formats": {format: number of tables},
         "dense": {"kind", "bytes"} | None,
         "inputs": {"dense": {"shape": [None, n_dense], "dtype": "float32"} | None,
                    "sparse": {"feature_names": [...], "table_rows": {feature: rows},
                               "values": "int64 [N], key-major in feature_names order",
                               "offsets": "int64 [F * B + 1]"}},
         "output": "logits float32 [B]" | None}
    """
    check_kernel_choice(kernel)  # before reading anything
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
                "kernel": table_kernel(e.format, kernel),
                "rows": e.rows,
                "dim": e.dim,
                "bytes": e.bytes,
                "bytes_per_row": e.bytes_per_row,
                "memory_bytes": table_memory_bytes(
                    e.format, e.rows, e.bytes, e.bytes_per_row, kernel
                ),
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
        "memory_bytes": sum(t["memory_bytes"] for t in tables),
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


def load_inference_model(
    path: str | os.PathLike, verify: bool = True, kernel: str = "auto"
) -> InferenceDLRM:
    """An artifact written by `embq quantize` as an eager inference model (eval mode).

    Args:
        path: the artifact directory.
        verify: check every file's sha256 while loading (reads each byte once).
        kernel: "auto" (default): every row-wise table in fbgemm's TBE, rows of at most 64 bytes
            padded to a power of two (fastest lookups; an int4 row of dim 64 takes 64 bytes
            instead of 36); "compact": 4-bit / 2-bit row-wise tables on ATen's n-bit
            embedding-bag ops over the memory-mapped rows (nothing copied: the least memory),
            the others in the TBE unpadded; "tbe": every row-wise table in the TBE, unpadded.
            Codebook / PQ tables use embq.codebook_bag in every case. The choices agree up to
            float32 rounding ("auto" and "tbe" run the same kernel and agree exactly).

    Raises:
        ArtifactError: not a DLRM artifact, tables that disagree with its config, dense towers
            of an unknown kind, or anything `load_artifact` refuses.
        ConfigError: an unknown kernel choice.
    """
    check_kernel_choice(kernel)  # before reading anything
    artifact = load_artifact(path, verify=verify)
    config = _dlrm_config(artifact)
    pooling = _model_section(artifact).get("pooling")
    tables = {t.name: t for t in artifact_tables(artifact, pooling)}
    ordered = [tables[config.table_name(f)] for f in config.sparse_feature_names]
    embeddings = build_embedding_bags(ordered, kernel)
    meta = artifact.dense_meta
    if meta is None:
        raise ArtifactError(
            f"{artifact.path} has no dense towers (dense.safetensors); it cannot predict"
        )
    towers = load_dense_towers(config, artifact.dense(), meta)
    core = DLRMCore(embeddings, towers, config.embedding_dim).eval()
    model = InferenceDLRM(
        core,
        config.dense_in_features,
        list(config.num_embeddings),
        inference_metadata(artifact, kernel),
    )
    return model.eval()


def export_torchscript(
    artifact_path: str | os.PathLike, out_path: str | os.PathLike, kernel: str = "auto"
) -> Path:
    """Script the artifact's inference model and save it (TorchScript, `torch.jit.save`).

    The saved module takes (dense float32 [B, n_dense], values int64 [N], offsets int64
    [F*B+1]) and returns logits float32 [B] (see the module docstring); the tables inside stay
    in their compressed formats. `inference_metadata` is stored as the extra file
    "embq_metadata.json". The file is written to a temporary name and renamed into place.
    `kernel`: as in `load_inference_model`. Ids outside their table raise a torch.jit.Error
    (or RuntimeError) before any kernel reads them: "embq.errors.DataError: id ... of feature
    ..." for row-wise tables (`CheckedTBE` and the "aten-nbit" kernel check them),
    embq.codebook_bag's own bounds-check errors for codebook / PQ tables.

    Returns:
        out_path.
    """
    model = load_inference_model(artifact_path, kernel=kernel)
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
