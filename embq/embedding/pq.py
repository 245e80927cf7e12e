"""pq<M>x<bits>: faiss product quantization of a table's rows.

Byte layout: [ceil(M*bits/8) B of faiss PQ codes] per row, plus the table params
{"centroids": float32 [M, 2^bits, dim/M]}. faiss is imported only when PQ is fitted or used.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from embq.embedding.codebook import F32, load_faiss
from embq.embedding.formats import TableFormat, as_rows, check_codes
from embq.errors import FormatError


class PQFormat(TableFormat):
    """pq<M>x<bits>: faiss ProductQuantizer over M sub-vectors of dim/M values, 2^bits
    centroids each. Table params: {"centroids": float32 [M, 2^bits, dim/M]}."""

    sparse_type = None

    def __init__(self, m: int, nbits: int, name: str | None = None) -> None:
        if m < 1 or not 1 <= nbits <= 16:
            raise FormatError(f"pq{m}x{nbits}: need M >= 1 and 1 <= bits <= 16")
        self.m, self.nbits = m, nbits
        self.name = name or f"pq{m}x{nbits}"
        self.bits = 0  # set per dim: M * nbits / dim bits per value; see bits_per_value

    def bits_per_value(self, dim: int) -> float:
        return self.m * self.nbits / dim

    def check_dim(self, dim: int) -> None:
        super().check_dim(dim)
        if dim % self.m:
            raise FormatError(f"{self.name}: dim {dim} is not a multiple of M={self.m}")

    def bytes_per_row(self, dim: int) -> int:
        self.check_dim(dim)
        return (self.m * self.nbits + 7) // 8

    def min_fit_rows(self) -> int:
        return 1 << self.nbits

    def fit(self, sample: Any) -> dict[str, np.ndarray]:
        faiss = load_faiss()

        x = as_rows(sample, "sample")
        self.check_dim(x.shape[1])
        k = 1 << self.nbits
        if x.shape[0] < k:
            raise FormatError(
                f"{self.name}: fit needs at least {k} sample rows (2^bits centroids), got "
                f"{x.shape[0]}; sample more rows or use fewer bits"
            )
        pq = faiss.ProductQuantizer(x.shape[1], self.m, self.nbits)
        pq.cp.min_points_per_centroid = 1  # small samples train (less well) without warnings
        pq.train(x)
        cents = faiss.vector_to_array(pq.centroids).reshape(self.m, k, x.shape[1] // self.m)
        return {"centroids": cents.astype(F32)}

    def _pq(self, params: dict[str, np.ndarray] | None, dim: int):
        faiss = load_faiss()

        if not params or "centroids" not in params:
            raise FormatError(f"{self.name}: params['centroids'] missing; call fit(sample) first")
        cents = np.ascontiguousarray(params["centroids"], dtype=F32)
        if cents.shape != (self.m, 1 << self.nbits, dim // self.m):
            raise FormatError(f"{self.name}: centroids have shape {cents.shape}, not for dim {dim}")
        pq = faiss.ProductQuantizer(dim, self.m, self.nbits)
        faiss.copy_array_to_vector(cents.ravel(), pq.centroids)
        return pq

    def encode(self, rows: Any, params: dict[str, np.ndarray] | None = None) -> np.ndarray:
        x = as_rows(rows)
        self.check_dim(x.shape[1])
        pq = self._pq(params, x.shape[1])
        if x.shape[0] == 0:
            return np.zeros((0, self.bytes_per_row(x.shape[1])), np.uint8)
        return pq.compute_codes(x)

    def decode(self, codes: Any, params: dict[str, np.ndarray] | None, dim: int) -> np.ndarray:
        c = check_codes(codes, self.bytes_per_row(dim), self.name)
        pq = self._pq(params, dim)
        if c.shape[0] == 0:
            return np.zeros((0, dim), F32)
        return pq.decode(c)
