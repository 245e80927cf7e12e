"""Pooled lookups of codebook / PQ tables, for which fbgemm has no kernel.

`CodebookBag` keeps one table's encoded rows (uint8, the artifact's bytes: the table stays
compressed in memory) and its table-level params, and computes bag-pooled embeddings with
batched torch ops: gather the code rows of all ids, decode them to float32 (unpack the 4-bit
codes, look the centroids up), and SUM / MEAN them per bag. PQ bags skip the decoding: their
sums are sums of centroids, pooled by one `embedding_bag` over the centroid table. There are no
per-row Python loops, and both modules are TorchScript-scriptable (`torch.jit.script`).

Byte layouts (see embq.codebook)::

    cb4-row     [dim/2 B packed 4-bit codes][16 x fp16 centroids]       value = centroid[code]
    cb4-shared  [dim/2 B packed 4-bit codes][fp16 scale][fp16 offset]
                value = offset + scale * codebook[code]
    pq<M>x<b>   [ceil(M*b/8) B, sub-quantizer m's code in bits m*b .. m*b+b-1, LSB first]
                value[m*dim/M : (m+1)*dim/M] = centroids[m, code_m]

Decoding follows the numpy decoders in embq.codebook operation for operation (same float32
products and sums), so decoded rows are bit-identical to `TableFormat.decode`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from embq.errors import FormatError
from embq.runtime.validate import SparseCheck

_K16 = 16


def _format_kind(format_name: str) -> str:
    """ "row", "shared" or "pq": which decoder a format's rows need (a string, so TorchScript
    can compare it; module-level constants are not visible to scripted code)."""
    family = format_name.split("(")[0]  # "cb4-shared(sample_rows=2000)" is cb4-shared too
    if family == "cb4-row":
        return "row"
    if family == "cb4-shared":
        return "shared"
    if family.startswith("pq"):
        return "pq"
    raise FormatError(
        f"{format_name} is not a codebook format; row-wise formats go to fbgemm's TBE"
    )


class CodebookBag(torch.nn.Module):
    """Pooled lookups in one codebook / PQ table.

    Args:
        format_name: "cb4-row", "cb4-shared" or "pq<M>x<bits>".
        codes: uint8 [rows, bytes_per_row], the encoded rows (kept as given, not copied when
            already a contiguous uint8 tensor: pass a memory-mapped one to keep it on disk).
        params: the format's table-level params ({"codebook": float32 [16]} for cb4-shared,
            {"centroids": float32 [M, 2^bits, dim/M]} for PQ, {} for cb4-row).
        dim: values per row.
        pooling: "SUM" or "MEAN" (the mean of an empty bag is 0, like fbgemm's).
        name: the table's name (for error messages).
    """

    def __init__(
        self,
        format_name: str,
        codes: torch.Tensor,
        params: dict[str, Any],
        dim: int,
        pooling: str = "SUM",
        name: str = "",
    ) -> None:
        super().__init__()
        if pooling not in ("SUM", "MEAN"):
            raise FormatError(f"pooling must be SUM or MEAN, got {pooling!r}")
        self.kind: str = _format_kind(format_name)
        self.dim: int = int(dim)
        self.rows: int = int(codes.shape[0])
        self.pooling: str = pooling
        self.m: int = 1
        self.nbits: int = 4
        codebook = torch.zeros(0)
        if self.kind == "shared":
            codebook = torch.as_tensor(np.asarray(params["codebook"], np.float32)).reshape(_K16)
        elif self.kind == "pq":
            cents = torch.as_tensor(np.asarray(params["centroids"], np.float32))
            self.m, self.nbits = int(cents.shape[0]), int(cents.shape[1]).bit_length() - 1
            if cents.shape[1] != 1 << self.nbits or cents.shape[0] * cents.shape[2] != self.dim:
                raise FormatError(
                    f"{format_name}: centroids of shape {list(cents.shape)} do not fit dim {dim}"
                )
            # flat [M * 2^bits, dim / M]: sub-quantizer m's code c is row m * 2^bits + c
            codebook = cents.reshape(-1, cents.shape[2]).contiguous()
        self.register_buffer("codes", torch.as_tensor(codes, dtype=torch.uint8))
        self.check = SparseCheck([name], [name], [self.rows])
        self.register_buffer("codebook", codebook)
        # 2^(max(e, 1) - 25) for every fp16 exponent e, exact (see _fp16)
        pow2 = torch.tensor([2.0 ** (max(e, 1) - 25) for e in range(32)], dtype=torch.float32)
        self.register_buffer("_pow2", pow2, persistent=False)
        self.register_buffer("_shifts", torch.arange(8, dtype=torch.uint8), persistent=False)
        self.register_buffer(
            "_bit_weights",
            torch.ones(1, dtype=torch.int64) << torch.arange(self.nbits),
            persistent=False,
        )
        self.register_buffer(
            "_sub_base", torch.arange(self.m, dtype=torch.int64) << self.nbits, persistent=False
        )

    def _fp16(self, raw: torch.Tensor) -> torch.Tensor:
        """Little-endian fp16 bytes uint8 [n, 2k] -> float32 [n, k], exactly.

        TorchScript has no dtype-reinterpreting view, so the bits are decoded by hand: a finite
        fp16 is (mantissa + 1024 if normal) * 2^(max(exponent, 1) - 25), a product of an integer
        below 2^11 and a power of two, which float32 holds exactly. (Encoders refuse Inf/NaN.)
        """
        bits = raw[:, 0::2].to(torch.int32) | (raw[:, 1::2].to(torch.int32) << 8)
        exponent = (bits >> 10) & 31
        mantissa = (bits & 1023) + (exponent > 0).to(torch.int32) * 1024
        value = mantissa.to(torch.float32) * self._pow2[exponent]
        return torch.where((bits >> 15) > 0, -value, value)

    def _unpack4(self, packed: torch.Tensor) -> torch.Tensor:
        """uint8 [n, dim/2] -> int64 codes [n, dim]; element 0 is the low nibble."""
        low = (packed & 15).to(torch.int64)
        high = (packed >> 4).to(torch.int64)
        return torch.stack([low, high], dim=2).reshape(packed.shape[0], 2 * packed.shape[1])

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Decode rows `ids` (int [n]) to float32 [n, dim]."""
        rows = self.codes.index_select(0, ids)
        half = self.dim // 2
        if self.kind == "row":
            cents = self._fp16(rows[:, half:])  # [n, 16]
            return torch.gather(cents, 1, self._unpack4(rows[:, :half]))
        if self.kind == "shared":
            qp = self._fp16(rows[:, half:])  # [n, 2]: scale, offset
            levels = self.codebook[self._unpack4(rows[:, :half])]
            return qp[:, 1:2] + qp[:, 0:1] * levels
        return self.codebook[self._pq_rows(rows)].reshape(-1, self.dim)

    def _pq_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """PQ code rows uint8 [n, bytes] -> int64 [n, M]: the `codebook` row of each
        sub-quantizer's centroid (sub-quantizer m's code c is row m * 2^bits + c)."""
        # bits LSB-first across the row, sub-quantizer m in bits m*nbits .. m*nbits+nbits-1
        if self.nbits == 8:
            sub = rows[:, : self.m].to(torch.int64)
        else:
            bits = ((rows.unsqueeze(2) >> self._shifts) & 1).reshape(rows.shape[0], -1)
            bits = bits[:, : self.m * self.nbits].reshape(-1, self.m, self.nbits).to(torch.int64)
            sub = (bits * self._bit_weights).sum(dim=2)
        return sub + self._sub_base

    def _pq_pooled(self, ids: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """SUM-pooled PQ bags (bag b starts at ids[starts[b]]) without decoding any row: the
        sum of a bag is, sub-quantizer by sub-quantizer, a sum of centroids, so one
        embedding_bag over the small [M * 2^bits, dim / M] centroid table pools all M * B
        (sub-quantizer, bag) pairs, with the codes laid out sub-quantizer-major."""
        rows = self.codes.index_select(0, ids)
        n, num_bags = rows.shape[0], starts.shape[0]
        # sub-quantizer-major [M, n] (transposed while still uint8 where codes are bytes)
        if self.nbits == 8:
            sub = rows[:, : self.m].t().contiguous().to(torch.int64) + self._sub_base.unsqueeze(1)
        else:
            sub = self._pq_rows(rows).t().contiguous()
        flat = sub.reshape(-1)  # sub-quantizer m's codes at m*n .. m*n+n-1
        bag_starts = torch.arange(self.m).unsqueeze(1) * n + starts.unsqueeze(0)
        pooled = torch.nn.functional.embedding_bag(
            flat, self.codebook, bag_starts.reshape(-1), mode="sum"
        )  # [M * B, dim / M], sub-quantizer-major
        return pooled.reshape(self.m, num_bags, -1).transpose(0, 1).reshape(num_bags, self.dim)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Pooled embeddings of bags, the input checked first (`SparseCheck`, DataError).

        Args:
            ids: int32/int64 [N] row ids, bag after bag.
            offsets: int [num_bags + 1]; bag b holds ids[offsets[b] : offsets[b + 1]]
                (offsets[0] == 0, offsets[-1] == N).
        Returns:
            float32 [num_bags, dim].
        """
        ids, offsets, _ = self.check(ids, offsets)
        return self.pool(ids, offsets)

    def pool(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """forward without the check, for a caller that ran it (the collection)."""
        lengths = (offsets[1:] - offsets[:-1]).to(torch.int64)
        num_bags = lengths.shape[0]
        if self.kind == "pq":
            out = self._pq_pooled(ids, (offsets[:-1] - offsets[0]).to(torch.int64))
        else:
            bag_of_id = torch.repeat_interleave(torch.arange(num_bags, device=ids.device), lengths)
            out = torch.zeros(num_bags, self.dim, dtype=torch.float32, device=ids.device)
            out.index_add_(0, bag_of_id, self.decode(ids))
        if self.pooling == "MEAN":
            out = out / lengths.clamp(min=1).unsqueeze(1).to(torch.float32)
        return out


class CodebookBagCollection(torch.nn.Module):
    """Pooled lookups for several features served by codebook / PQ tables.

    Features are ordered table by table (each table's `feature_names` in order);
    `feature_names` / `feature_dims` list them. forward takes the features' ids in that order,
    key-major like a KeyedJaggedTensor: all B bags of feature 0, then of feature 1, ...
    """

    def __init__(
        self, bags: list[CodebookBag], feature_counts: list[int], feature_names: list[str]
    ) -> None:
        super().__init__()
        if not bags:
            raise FormatError("a CodebookBagCollection needs at least one table")
        self.bags = torch.nn.ModuleList(bags)
        # List attributes stay unannotated: TorchScript infers their types from the (non-empty)
        # values, and warns about `list[...]` annotations in __init__.
        self.feature_names = list(feature_names)
        self.feature_dims = [b.dim for b, n in zip(bags, feature_counts) for _ in range(n)]
        self.num_features: int = len(self.feature_names)
        self._counts = list(feature_counts)
        table_of = [b.check.table_names[0] for b, n in zip(bags, feature_counts) for _ in range(n)]
        rows = [b.rows for b, n in zip(bags, feature_counts) for _ in range(n)]
        self.check = SparseCheck(self.feature_names, table_of, rows)

    @classmethod
    def from_tables(cls, tables: list) -> CodebookBagCollection:
        """From encoded tables (objects with format, codes, params, dim, pooling, feature_names,
        such as embq.torchrec.QuantizedTable)."""
        bags, counts, names = [], [], []
        for t in tables:
            codes = torch.from_numpy(np.ascontiguousarray(t.codes))
            bags.append(CodebookBag(t.format, codes, t.params, t.dim, t.pooling, t.name))
            counts.append(len(t.feature_names))
            names.extend(t.feature_names)
        return cls(bags, counts, names)

    def forward(self, values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Pooled embeddings.

        Args:
            values: int [N] ids of every feature, key-major in `feature_names` order.
            offsets: int [F * B + 1] bag offsets into `values`, checked (`SparseCheck`).
        Returns:
            float32 [B, sum of feature_dims], features side by side in `feature_names` order.
        """
        values, offsets, batch = self.check(values, offsets)
        return self._lookup_checked_input(values, offsets, batch)

    def _lookup_checked_input(
        self, values: torch.Tensor, offsets: torch.Tensor, batch: int
    ) -> torch.Tensor:
        """forward of an input that `SparseCheck` passed (int64, B = `batch`)."""
        outs: list[torch.Tensor] = []
        first = 0
        for i, bag in enumerate(self.bags):
            count = self._counts[i]
            off = offsets[first * batch : (first + count) * batch + 1]
            ids = values[int(off[0]) : int(off[-1])]
            pooled = bag.pool(ids, off - off[0])  # [count * B, D], feature-major
            outs.append(pooled.reshape(count, batch, -1).transpose(0, 1).reshape(batch, -1))
            first += count
        return torch.cat(outs, dim=1)
