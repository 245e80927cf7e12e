"""Raw Criteo files -> a prepared dataset directory (see `embq.data.prepared`), in bounded memory.

Transforms (one pass per mode, chunk by chunk, with a progress bar over input bytes):

- dense: log(1 + max(x, 0)), missing -> 0. (TorchRec's `tsv_to_npys` instead shifts by the
  column minimum, which needs the whole column; this transform is streaming and per-row.)
- categorical, mode "hash": the raw 32-bit hash modulo the feature's table size, missing -> hash 0,
  as TorchRec's `InMemoryBinaryCriteoIterDataPipe(hashes=...)` applies it.
- categorical, mode "frequency": a first pass counts each feature's values; values seen at least
  `min_frequency` times get contiguous ids 1..K (sorted by hash value),
  everything else (rare or missing) shares id 0 (TorchRec's `sparse_to_contiguous` idea).

The output layout is TorchRec's Criteo `.npy` layout (dense float32 (N, 13), sparse int64 (N, 26),
labels int32 (N, 1)) plus summary.json.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from embq.data.criteo import CAT_NAMES, INT_NAMES, N_CAT, N_INT, ReadReport, read_criteo
from embq.data.npy_writer import NpyAppender
from embq.data.prepared import DENSE_FILE, LABELS_FILE, SPARSE_FILE, SUMMARY_FILE
from embq.errors import ConfigError, DataError

DEFAULT_TABLE_SIZE = 100_000


def dense_transform(ints: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """log(1 + max(x, 0)) as float32, 0 where missing."""
    return np.log1p(np.maximum(np.where(missing, 0, ints), 0)).astype(np.float32)


def _count_values(paths: list[Path], strict: bool, bar: tqdm) -> list[dict]:
    """Per-feature {hash: count} over all valid rows (memory ~ distinct values, not rows)."""
    uniques = [np.empty(0, np.uint32)] * N_CAT
    counts = [np.empty(0, np.int64)] * N_CAT
    for chunk in read_criteo(paths, ReadReport(), strict=strict):
        count_chunk(chunk.cats, chunk.cat_missing, uniques, counts)
        bar.update(len(chunk))
    return [{"values": u, "counts": c} for u, c in zip(uniques, counts)]


def merge_counts(values: np.ndarray, counts: np.ndarray, more_values: np.ndarray,
                 more_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two {value: count} tables as (sorted values, int64 counts) -> their sum, sorted."""
    merged, inverse = np.unique(np.concatenate([values, more_values]), return_inverse=True)
    total = np.concatenate([counts, more_counts])
    return merged, np.bincount(inverse, weights=total, minlength=len(merged)).astype(np.int64)


def count_chunk(cats: np.ndarray, missing: np.ndarray, uniques: list[np.ndarray],
                counts: list[np.ndarray]) -> None:
    """Add one chunk's present categorical values (n, 26) to the per-feature counts, in place."""
    for f in range(N_CAT):
        vals, cnt = np.unique(cats[~missing[:, f], f], return_counts=True)
        uniques[f], counts[f] = merge_counts(uniques[f], counts[f], vals, cnt)


def sparse_ids(cats: np.ndarray, missing: np.ndarray, sizes: list[int],
               vocab: list[np.ndarray] | None) -> np.ndarray:
    """Raw hashes (n, 26) -> int64 ids: hash % size (hash mode, missing -> hash 0) or the
    position in the feature's sorted vocabulary + 1 (frequency mode, rare or missing -> 0)."""
    ids = np.empty(cats.shape, dtype=np.int64)
    for f in range(N_CAT):
        raw = np.where(missing[:, f], 0, cats[:, f]).astype(np.int64)
        if vocab is None:
            ids[:, f] = raw % sizes[f]
        else:
            pos = np.searchsorted(vocab[f], raw)
            hit = (pos < len(vocab[f])) & ~missing[:, f]
            hit[hit] = vocab[f][pos[hit]] == raw[hit]
            ids[:, f] = np.where(hit, pos + 1, 0)
    return ids


def table_sizes(table_size: int | list[int]) -> list[int]:
    """Hash mode's per-feature table sizes from one size or a list of 26."""
    sizes = [table_size] * N_CAT if isinstance(table_size, int) else list(table_size)
    if len(sizes) != N_CAT or min(sizes) < 1:
        raise ConfigError(f"Expected one table size >= 1 per categorical feature ({N_CAT}).")
    return sizes


def check_request(paths: list[Path], output: Path, mode: str) -> None:
    """Refuse an existing output, an unknown mode or a missing input before any work."""
    if output.exists():
        raise ConfigError(f"{output} already exists; choose another --output or remove it first.")
    if mode not in ("hash", "frequency"):
        raise ConfigError(f"mode must be 'hash' or 'frequency', got {mode!r}.")
    for p in paths:
        if not p.is_file():
            raise DataError(f"Criteo input {p} does not exist or is not a file.")


def require_rows(paths: list[Path], report: ReadReport) -> None:
    """Refuse inputs in which no line was a valid row."""
    if report.rows_read == 0:
        raise DataError(f"No valid Criteo rows in {', '.join(map(str, paths))} "
                        f"({report.rows_refused} lines refused).")


def build_summary(*, dataset_name: str, paths: list[Path], report: ReadReport, clicks: int,
                  mode: str, min_frequency: int, sizes: list[int], seen: list[np.ndarray],
                  int_missing: np.ndarray, cat_missing: np.ndarray) -> dict:
    """summary.json's content (the same for one process and for torchrun ranks)."""
    require_rows(paths, report)
    rows = report.rows_read
    return {
        "dataset": dataset_name,
        "inputs": [str(p) for p in paths],
        "rows_read": rows,
        "rows_refused": report.rows_refused,
        "refused_examples": [str(r) for r in report.refusals[:20]],
        "click_rate": clicks / rows,
        "mode": mode,
        "min_frequency": min_frequency if mode == "frequency" else None,
        "dense_transform": "log(1 + max(x, 0)), missing -> 0",
        "dense_feature_names": INT_NAMES,
        "sparse_feature_names": CAT_NAMES,
        "num_embeddings": sizes,
        "cardinalities": {n: int(s.sum()) for n, s in zip(CAT_NAMES, seen)},
        "missing_rates": {**{n: float(m / rows) for n, m in zip(INT_NAMES, int_missing)},
                          **{n: float(m / rows) for n, m in zip(CAT_NAMES, cat_missing)}},
    }


def prepare_criteo(inputs: list[str | os.PathLike], output: str | os.PathLike,
                   table_size: int | list[int] = DEFAULT_TABLE_SIZE, mode: str = "hash",
                   min_frequency: int = 2, strict: bool = False, progress: bool = True,
                   dataset_name: str = "criteo") -> dict:
    """Read raw Criteo-format files and write a prepared dataset directory `output`.

    Returns the summary (also written to summary.json): rows_read, rows_refused, the first
    refused lines, per-feature table sizes, cardinalities (distinct ids seen) and missing rates.
    """
    paths = [Path(p) for p in inputs]
    output = Path(output)
    check_request(paths, output, mode)

    vocab = None
    if mode == "frequency":
        with tqdm(unit="row", desc="count values", disable=not progress) as bar:
            counted = _count_values(paths, strict, bar)
        vocab = [c["values"][c["counts"] >= min_frequency] for c in counted]  # sorted
        sizes = [len(v) + 1 for v in vocab]
    else:
        sizes = table_sizes(table_size)

    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    report = ReadReport()
    seen = [np.zeros(s, dtype=bool) for s in sizes]  # bounded by the table sizes
    int_missing = np.zeros(N_INT, np.int64)
    cat_missing = np.zeros(N_CAT, np.int64)
    clicks = 0
    try:
        with NpyAppender(partial / DENSE_FILE, np.float32, N_INT) as dense_out, \
             NpyAppender(partial / SPARSE_FILE, np.int64, N_CAT) as sparse_out, \
             NpyAppender(partial / LABELS_FILE, np.int32, 1) as label_out, \
             tqdm(unit="row", desc="prepare", disable=not progress) as bar:
            for chunk in read_criteo(paths, report, strict=strict):
                dense_out.append(dense_transform(chunk.ints, chunk.int_missing))
                ids = sparse_ids(chunk.cats, chunk.cat_missing, sizes, vocab)
                for f in range(N_CAT):
                    seen[f][ids[:, f]] = True
                sparse_out.append(ids)
                label_out.append(chunk.labels.reshape(-1, 1))
                int_missing += chunk.int_missing.sum(0)
                cat_missing += chunk.cat_missing.sum(0)
                clicks += int(chunk.labels.sum())
                bar.update(len(chunk))
        summary = build_summary(dataset_name=dataset_name, paths=paths, report=report,
                                clicks=clicks, mode=mode, min_frequency=min_frequency,
                                sizes=sizes, seen=seen, int_missing=int_missing,
                                cat_missing=cat_missing)
        (partial / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        os.replace(partial, output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return summary
