"""fbgemm's inference TBE (`IntNBitTableBatchedEmbeddingBagsCodegen`) for row-wise tables, behind
an id range check, split into one TBE per torch thread.
"""

from __future__ import annotations

import numpy as np
import torch

from embq.artifact.schema import QuantizedTable
from embq.embedding.registry import get_format
from embq.errors import ConfigError
from embq.runtime.kernel_choice import TBE_ROW_ALIGNMENT
from embq.runtime.quant_ebc import tbe_weight_pair
from embq.runtime.scripted import CheckedLookups
from embq.runtime.validate import SparseCheck

# Lookup kernels that spread their tables over threads do so for batches of at least this many
# ids: below it a fork (and waking a pool thread) costs more than it saves (n-bit kernel measured
# on 2 cores: slower at 33k ids, 1.3x faster at 66k, 1.4x at 266k).
PARALLEL_MIN_IDS = 65536


def build_tbe(
    tables: list[QuantizedTable], pooling: str, row_alignment: int = TBE_ROW_ALIGNMENT
) -> torch.nn.Module:
    """One fbgemm `IntNBitTableBatchedEmbeddingBagsCodegen` for row-wise tables of any mix of
    formats, all pooled with `pooling`, each row padded to a multiple of `row_alignment` bytes.
    forward(indices, offsets) -> float32 [B, sum of dims], features in table order (each
    table's feature_names in order).

    The module checks neither ids nor offsets (BoundsCheckMode.NONE): wrap it in `CheckedTBE`,
    whose check (`SparseCheck`) costs a fraction of fbgemm's FATAL mode, which besides lets
    negative ids through and rewrites a non-zero offsets[0].
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



class CheckedTBE(CheckedLookups, torch.nn.Module):
    """TBEs (`build_tbe`) behind the input check (`embq.runtime.validate.SparseCheck`): offsets
    that leave `values`, or an id outside [0, rows) of its table, raise
    embq.errors.DataError naming what is wrong (under TorchScript a torch.jit.Error carrying
    "embq.errors.DataError: ...") before any TBE reads anything.

    `parts`: the tables split into runs of consecutive features, one TBE each (`part_features`:
    how many features each serves). fbgemm's CPU TBE looks its tables up on one thread, so a
    model loaded under several torch threads gets one part per thread, and a batch of at least
    `parallel_min_ids` ids runs the parts as parallel tasks (torch.jit.fork, torch's inter-op
    pool): the lookups are bound by memory latency, so each core adds misses in flight. Eager
    calls run the module's TorchScript copy (ScriptedCopy) on torch.get_num_threads(); a
    scripted module uses its attribute `threads` (1 unless set on the loaded module). One part
    reads the whole input, with no slicing.

    forward(values int64 [N], offsets int64 [F * B + 1]) -> float32 [B, sum of dims], the
    features (`feature_names`, key-major) in order. `_lookup_checked_input` is the same without the
    check, for a caller that ran it already (`embq.runtime.bags.QuantEmbeddingBags`).
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
        self.check = SparseCheck(feature_names, table_names, feature_rows)
        self.num_features: int = len(feature_rows)
        self.out_dim: int = int(sum(feature_dims))
        self.threads: int = 1  # tasks of a scripted forward (see the class docstring)
        self.parallel_min_ids: int = PARALLEL_MIN_IDS

    def _lookup(
        self, values: torch.Tensor, offsets: torch.Tensor, batch: int, threads: int
    ) -> torch.Tensor:
        """The lookups of an input already checked (int64, B = `batch`)."""
        if batch == 0:
            return torch.zeros(0, self.out_dim, dtype=torch.float32)
        if len(self.parts) == 1:
            for part in self.parts:
                return part(values, offsets)
        starts: list[int] = offsets[0::batch].tolist()
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

