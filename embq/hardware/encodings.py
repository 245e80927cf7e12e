"""A model's tables in candidate formats, made once: table-level params (codebooks, PQ
centroids) fitted once per (table, format), rows decoded only where the calibration ids look,
whole tables encoded on demand for verification (kept while they fit a memory bound).

Everything equals what `embq.quantize` makes: params come from `fit_params` with the format's
own sample and seed, whole tables from `encode_table`, and row-wise formats encode each row on
its own, so the decoded rows of a subset are those of the whole table (tested).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from embq.artifact.schema import QuantizedTable
from embq.embedding.configs import parse_format
from embq.embedding.encode import encode_table, fit_params
from embq.embedding.registry import get_format
from embq.models.tables import TableInfo


class Encodings:
    """Params, decoded rows and encoded tables of `tables` in any format, cached.

    Args:
        tables: the model's tables (`embq.models.tables.find_tables`).
        max_bytes: encoded tables kept (least recently used dropped beyond it).
    """

    def __init__(self, tables: list[TableInfo], max_bytes: int = 2 << 30) -> None:
        self.tables = {t.name: t for t in tables}
        self.max_bytes = int(max_bytes)
        self._params: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        self._encoded: OrderedDict[tuple[str, str], QuantizedTable] = OrderedDict()

    def params(self, table: str, fmt: Any) -> dict[str, np.ndarray]:
        """The format's table-level params for `table`, fitted once."""
        key = (table, str(parse_format(fmt)))
        if key not in self._params:
            self._params[key] = fit_params(self.tables[table], key[1])
        return self._params[key]

    def decoded_rows(self, table: str, fmt: Any, ids: np.ndarray) -> torch.Tensor:
        """float32 [len(ids), dim]: rows `ids` of `table` encoded in `fmt` and decoded."""
        info = self.tables[table]
        name = str(parse_format(fmt))
        cached = self._encoded.get((table, name))
        codec = get_format(name)
        if cached is not None:
            codes = np.asarray(cached.codes)[ids]
            params = cached.params
        else:
            params = self.params(table, name)
            rows = info.weight[torch.from_numpy(np.asarray(ids, dtype=np.int64))]
            codes = codec.encode(rows.detach().to(torch.float32).numpy(), params)
        return torch.from_numpy(codec.decode(codes, params, info.dim))

    def table(self, table: str, fmt: Any) -> QuantizedTable:
        """The whole table encoded in `fmt`, as `encode_table` encodes it."""
        key = (table, str(parse_format(fmt)))
        if key in self._encoded:
            self._encoded.move_to_end(key)
            return self._encoded[key]
        encoded = encode_table(self.tables[table], key[1], params=self.params(*key))
        self._encoded[key] = encoded
        while len(self._encoded) > 1 and self._held() > self.max_bytes:
            self._encoded.popitem(last=False)
        return encoded

    def _held(self) -> int:
        return sum(int(t.codes.nbytes) for t in self._encoded.values())
