"""How much each table's format costs in log loss, measured one table at a time on calibration
rows (as HAWQ / BRECQ measure a layer's sensitivity), and a cheap proxy for models too big for
that.

Exact: the calibration rows' bottom-MLP output and every table's pooled fp32 embeddings are
computed once; for (table t, format f) only t's pooled output changes -- its rows at the ids the
calibration rows look up are encoded in f, decoded and pooled again -- and the interaction and
top MLP run on the cached rest. The increase of the mean log loss (nats, vs fp32) is the
sensitivity.

Proxy (Fisher / HAWQ-style, no forward pass per format): with g_n the gradient of row n's loss
w.r.t. t's pooled embedding, a row's loss grows by about (g_n . e_n)^2 / 2 when the pooled
embedding moves by e_n; keeping the diagonal and summing over the rows that look up each id,

    proxy(t, f) = 1 / (2N) sum_ids sum_d w[id, d] err[id, d]^2,   w[id, d] = sum_(n: id in bag n) (s_n g_n,d)^2

with err the decoded row's error and s_n = 1 (SUM) or 1 / bag length (MEAN): the frequency-
weighted squared reconstruction error of the rows the calibration ids touch, weighted per
dimension by the loss's sensitivity there. Only touched rows are decoded.

What the search uses (`Sensitivity.predicted`) is the measurement made monotone in precision:
no format is predicted to lose less than fp32 (0), and no format is predicted to lose less than
the best one with more bits per value (fp32 > fp16 > int8 > int4 = cb4 > int2; PQ by its code
bits per value, pq32x8 at dim 64 has 4), plus a hair, so that a coarser format is never chosen
for a measured gain that is calibration noise (a 4-row table's int2 measuring below its int4).
The raw measurements stay in the JSON.

Results are cached as JSON keyed by the model's digest, the calibration rows and the formats.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from embq.embedding.configs import parse_format
from embq.embedding.registry import get_format
from embq.errors import ConfigError, DataError, FormatError
from embq.hardware.encodings import Encodings
from embq.hardware.top import IncrementalTop
from embq.models.tables import find_tables

CACHE_VERSION = 1
CHUNK = 16384  # calibration rows per forward pass
MONOTONE_STEP = 1e-9  # nats a coarser grid is predicted to lose at least beyond a finer one


@dataclass
class Calibration:
    """Calibration rows with what the float model computes before the interaction.

    bottom float32 [N, D] (bottom MLP output), pooled float32 [N, F, D] (fp32 pooled
    embeddings, features in the EBC's order), labels float32 [N], ids {feature: (values int64
    [nnz], offsets int64 [N + 1])}, grad: d(row loss)/d pooled, [N, F, D] (computed on demand).
    """

    bottom: torch.Tensor
    pooled: torch.Tensor
    labels: torch.Tensor
    features: list[str]
    ids: dict[str, tuple[torch.Tensor, torch.Tensor]]
    digest: str
    grad: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return int(self.labels.shape[0])


def _pool(weight_rows: torch.Tensor, inverse: torch.Tensor, offsets: torch.Tensor,
          pooling: str) -> torch.Tensor:  # fmt: skip
    return F.embedding_bag(inverse, weight_rows, offsets[:-1], mode=pooling.lower(),
                           include_last_offset=False)  # fmt: skip


@torch.no_grad()
def collect(model: torch.nn.Module, batches: Iterable, rows: int | None = None) -> Calibration:
    """Run the float model's bottom MLP and pool every table over calibration `batches`
    (objects with .dense, .sparse KJT, .labels), up to `rows` rows."""
    tables = find_tables(model)
    features = [f for t in tables for f in t.feature_names]
    dense, labels, values = [], [], {f: [] for f in features}
    lengths: dict[str, list[torch.Tensor]] = {f: [] for f in features}
    n = 0
    for batch in batches:
        dense.append(batch.dense.float())
        labels.append(batch.labels.float().reshape(-1))
        jagged = batch.sparse.to_dict()
        for f in features:
            values[f].append(jagged[f].values().to(torch.int64))
            lengths[f].append(jagged[f].lengths().to(torch.int64))
        n += len(labels[-1])
        if rows is not None and n >= rows:
            break
    if not labels:
        raise DataError("no calibration rows: give at least one batch")
    dense_all = torch.cat(dense)
    label_all = torch.cat(labels)
    keep = len(label_all) if rows is None else min(rows, len(label_all))
    ids = {}
    for f in features:
        lens = torch.cat(lengths[f])[:keep]
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lens, 0)])
        ids[f] = (torch.cat(values[f])[: int(offsets[-1])], offsets)
    bottom = torch.cat([model.dense_arch(dense_all[s : s + CHUNK])
                        for s in range(0, keep, CHUNK)])  # fmt: skip
    pooled = torch.empty(keep, len(features), bottom.shape[1])
    for t in tables:
        for f in t.feature_names:
            v, o = ids[f]
            pooled[:, features.index(f)] = _pool(t.weight.float(), v, o, t.pooling)
    digest = hashlib.sha256()
    for arr in (dense_all[:keep], label_all[:keep], *[x for f in features for x in ids[f]]):
        digest.update(arr.numpy().tobytes())
    return Calibration(bottom, pooled, label_all[:keep], features, ids, digest.hexdigest())


def mean_loss(model: torch.nn.Module, cal: Calibration, pooled: torch.Tensor | None = None) -> float:
    """Mean log loss (nats, float64 sum) of the top of the model over the calibration rows."""
    pooled = cal.pooled if pooled is None else pooled
    total = 0.0
    with torch.no_grad():
        for s in range(0, cal.rows, CHUNK):
            z = model.over_arch(model.inter_arch(dense_features=cal.bottom[s : s + CHUNK],
                                                 sparse_features=pooled[s : s + CHUNK]))  # fmt: skip
            total += float(F.binary_cross_entropy_with_logits(
                z.reshape(-1).double(), cal.labels[s : s + CHUNK].double(), reduction="sum"))  # fmt: skip
    return total / cal.rows


def loss_gradient(model: torch.nn.Module, cal: Calibration) -> torch.Tensor:
    """d(row n's log loss)/d pooled[n], float32 [N, F, D] (one backward pass, chunked)."""
    if cal.grad is None:
        grad = torch.empty_like(cal.pooled)
        for s in range(0, cal.rows, CHUNK):
            p = cal.pooled[s : s + CHUNK].clone().requires_grad_(True)
            z = model.over_arch(model.inter_arch(dense_features=cal.bottom[s : s + CHUNK], sparse_features=p))
            loss = F.binary_cross_entropy_with_logits(z.reshape(-1), cal.labels[s : s + CHUNK],
                                                      reduction="sum")  # fmt: skip
            (g,) = torch.autograd.grad(loss, p)
            grad[s : s + CHUNK] = g
        cal.grad = grad
    return cal.grad


def model_digest(model: torch.nn.Module) -> str:
    """sha256 over the model's tensors (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class Sensitivity:
    """Per table and format: "loss" (measured increase of the mean log loss, nats; exact method
    only), "proxy" (the Fisher proxy, nats) and "mse" (mean squared error of the decoded rows,
    weighted by how often the calibration ids look them up).

    Attributes:
        method: "exact" or "proxy" (which one `predicted` returns).
        base_loss: fp32 mean log loss on the calibration rows.
        calib_rows: number of calibration rows.
        tables: {table: {"rows", "dim", "ids_per_row", "touched", "formats": {format: {...}}}}.
        seconds: how long it took (0 when read from the cache).
    """

    method: str
    base_loss: float
    calib_rows: int
    tables: dict[str, dict[str, Any]]
    seconds: float = 0.0
    key: str = ""
    cached: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def measured(self, table: str, fmt: str) -> float:
        """The raw measurement for (table, format): "loss" (exact) or "proxy"."""
        entry = self.tables[table]["formats"][str(parse_format(fmt))]
        return float(entry["loss"] if self.method == "exact" else entry["proxy"])

    def predicted(self, table: str, fmt: str) -> float:
        """The loss increase the search uses for (table, format): the measurement, made
        monotone in precision (see the module docstring)."""
        name = str(parse_format(fmt))
        cache = self.extra.setdefault("_predicted", {})
        if table not in cache:
            cache[table] = monotone({f: self.measured(table, f) for f in self.formats(table)},
                                    int(self.tables[table]["dim"]))  # fmt: skip
        return cache[table][name]

    def formats(self, table: str) -> list[str]:
        return list(self.tables[table]["formats"])

    def rank_correlation(self) -> float | None:
        """Spearman correlation of the proxy with the measured increase over every (table,
        format) but fp32; None without measurements."""
        from scipy.stats import spearmanr

        pairs = [(e["proxy"], e["loss"]) for t in self.tables.values()
                 for f, e in t["formats"].items() if f != "fp32" and e.get("loss") is not None]  # fmt: skip
        if len(pairs) < 3:
            return None
        rho = spearmanr([p for p, _ in pairs], [m for _, m in pairs]).statistic
        return float(rho)

    def to_json(self) -> dict[str, Any]:
        extra = {k: v for k, v in self.extra.items() if not k.startswith("_")}
        return {"version": CACHE_VERSION, "method": self.method, "base_loss": self.base_loss,
                "calib_rows": self.calib_rows, "seconds": self.seconds, "key": self.key,
                "tables": self.tables, "extra": extra}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Sensitivity:
        if data.get("version") != CACHE_VERSION:
            raise ConfigError(f"sensitivity cache version {data.get('version')} is not "
                              f"{CACHE_VERSION}")  # fmt: skip
        return cls(data["method"], data["base_loss"], data["calib_rows"], data["tables"],
                   data.get("seconds", 0.0), data.get("key", ""), True, data.get("extra", {}))  # fmt: skip


def bits_per_value(fmt: str, dim: int) -> float:
    """Code bits per value of a format at `dim` (qparams and codebooks left out)."""
    config = parse_format(fmt)
    if config.kind in ("float", "rowwise"):
        return float(config.bits)  # type: ignore[attr-defined]
    if config.kind == "pq":
        return config.m * config.bits / dim  # type: ignore[attr-defined]
    return 4.0  # cb4-row, cb4-shared


def monotone(measured: dict[str, float], dim: int) -> dict[str, float]:
    """{format: loss} with every loss at least 0 and at least the best loss among formats with
    more bits per value (at `dim`), plus MONOTONE_STEP."""
    out = {f: max(0.0, v) for f, v in measured.items()}
    levels = sorted({bits_per_value(f, dim) for f in out}, reverse=True)
    floor = 0.0
    for i, bits in enumerate(levels):
        here = [f for f in out if bits_per_value(f, dim) == bits]
        if i > 0:
            for f in here:
                out[f] = max(out[f], floor + MONOTONE_STEP)
        floor = max(floor, min(out[f] for f in here))
    return out


def _id_weights(cal: Calibration, grad: torch.Tensor, feature: str, inverse: torch.Tensor,
                touched: int, pooling: str) -> torch.Tensor:  # fmt: skip
    """w[u, d] = sum over the bags that look id u up of (s_n g_n,d)^2, float64 [touched, D]."""
    values, offsets = cal.ids[feature]
    lengths = offsets[1:] - offsets[:-1]
    bag = torch.repeat_interleave(torch.arange(cal.rows), lengths)
    g = grad[:, cal.features.index(feature)].double()[bag]
    if pooling == "MEAN":
        g = g / lengths[bag].clamp(min=1).double().unsqueeze(1)
    w = torch.zeros(touched, g.shape[1], dtype=torch.float64)
    return w.index_add_(0, inverse, g * g)


def table_sensitivity(model: torch.nn.Module, cal: Calibration, formats: list[str], *,
                      method: str = "exact", encodings: Encodings | None = None,
                      cache_dir: str | os.PathLike | None = None,
                      progress: bool = True) -> Sensitivity:  # fmt: skip
    """Every table's sensitivity to every format in `formats` that can store it (formats a
    table cannot take -- a dim that does not pack, fewer rows than PQ centroids -- are left
    out), on the calibration rows.

    Args:
        model: the float TorchRec DLRM.
        cal: `collect`'s calibration rows.
        formats: format names.
        method: "exact" (a forward pass of the top per table and format; the proxy is computed
            too) or "proxy" (no forward pass per format).
        encodings: fitted params shared with the caller (fitted here otherwise).
        cache_dir: read / write the result as JSON there (None: no cache).
        progress: a bar over the tables.
    """
    from tqdm import tqdm

    if method not in ("exact", "proxy"):
        raise ConfigError(f"sensitivity method must be 'exact' or 'proxy', got {method!r}")
    names = sorted({str(parse_format(f)) for f in formats})
    tables = find_tables(model)
    key = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "model": model_digest(model),
                                     "data": cal.digest, "formats": names,
                                     "method": method}).encode()).hexdigest()  # fmt: skip
    path = Path(cache_dir) / f"sensitivity-{key[:20]}.json" if cache_dir else None
    if path is not None and path.is_file():
        return Sensitivity.from_json(json.loads(path.read_text(encoding="utf-8")))
    began = time.perf_counter()
    encodings = encodings or Encodings(tables)
    grad = loss_gradient(model, cal)
    top = None
    if method == "exact":
        top = IncrementalTop(model, cal.bottom, cal.pooled, cal.labels)
        top.check()
    base = top.loss() if top is not None else mean_loss(model, cal)
    out: dict[str, dict[str, Any]] = {}
    bar = tqdm(tables, desc=f"sensitivity ({method})", unit="table", disable=not progress)
    for t in bar:
        all_ids = torch.cat([cal.ids[f][0] for f in t.feature_names])
        touched, _ = torch.unique(all_ids, return_inverse=True)
        positions = [cal.features.index(f) for f in t.feature_names]
        inverses = [torch.searchsorted(touched, cal.ids[f][0]) for f in t.feature_names]
        fp32_rows = t.weight[touched].detach().float()
        weights = sum(_id_weights(cal, grad, f, inv, len(touched), t.pooling)
                      for f, inv in zip(t.feature_names, inverses))  # fmt: skip
        counts = sum(torch.bincount(inv, minlength=len(touched)) for inv in inverses).double()
        entry = {"rows": t.rows, "dim": t.dim, "touched": int(len(touched)),
                 "ids_per_row": float(len(all_ids)) / cal.rows, "formats": {}}  # fmt: skip
        for fmt in names:
            codec = get_format(fmt)
            try:
                codec.check_dim(t.dim)
            except FormatError:
                continue
            if t.rows < codec.min_fit_rows():
                continue
            bar.set_postfix(table=t.name, format=fmt, refresh=False)
            if fmt == "fp32":  # the calibration's own rows: nothing changes
                entry["formats"][fmt] = {"proxy": 0.0, "mse": 0.0, "loss": 0.0 if top is not None else None}
                continue
            decoded = encodings.decoded_rows(t.name, fmt, touched.numpy())
            err = (decoded.double() - fp32_rows.double())
            sq = (err * err).sum(1)
            result = {"proxy": float(0.5 * (weights * err * err).sum() / cal.rows),
                      "mse": float((counts * sq).sum() / max(1.0, float(counts.sum())) / t.dim),
                      "loss": None}  # fmt: skip
            if top is not None:
                changed = {p: _pool(decoded, inv, cal.ids[f][1], t.pooling)
                           for p, f, inv in zip(positions, t.feature_names, inverses)}  # fmt: skip
                result["loss"] = top.loss(changed) - base
            entry["formats"][fmt] = result
        out[t.name] = entry
    result = Sensitivity(method, base, cal.rows, out, round(time.perf_counter() - began, 2), key)
    if path is not None:
        from embq.files import staged_file

        with staged_file(path) as tmp:
            tmp.write_text(json.dumps(result.to_json()), encoding="utf-8")
    return result
