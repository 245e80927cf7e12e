"""`prepare_criteo` split over the ranks of a torchrun job (gloo), with outputs byte-identical to
one process.

- Ranks split the input files into contiguous runs balanced by bytes (a gzip file cannot be split
  inside), so rank r's rows come after rank r-1's in the output, as in one process's file order.
- Pass 1: each rank parses its files once, stages the transformed dense rows, raw hashes (-1 where
  missing) and labels in its own directory, and counts values (frequency mode).
- Frequency counts are merged exactly, feature by feature, in rounds over slices of the 32-bit
  hash space: each round all-gathers at most about `merge_values` values per rank, so messages
  stay bounded whatever the cardinality (Terabyte features reach 4e7 values). Every rank gets the
  whole vocabulary, as one process builds it (sorted values counted >= min_frequency).
- Rank 0 preallocates the three .npy files with their final headers; each rank maps its staged
  rows to ids and writes them at its row offset (disjoint byte ranges of a shared filesystem).
- Statistics (rows, refusals, clicks, missing counts, ids seen) are summed / or-ed across ranks,
  so summary.json is the one-process summary too.

Staging needs about as much disk as the output. A failed rank fails every rank after the phase
it failed in (`embq.ranks.run_phase`); the output appears only when all ranks finished, by rank
0's rename of the `.partial` directory; a failure removes it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from embq.data.criteo import N_CAT, N_INT, ReadReport, read_criteo
from embq.data.npy_writer import NpyAppender, preallocate_npy, read_rows, write_rows_at
from embq.data.prepared import DENSE_FILE, LABELS_FILE, SPARSE_FILE, SUMMARY_FILE
from embq.data.preprocess import (
    DEFAULT_TABLE_SIZE,
    build_summary,
    check_request,
    count_chunk,
    dense_transform,
    merge_counts,
    require_rows,
    sparse_ids,
    table_sizes,
)
from embq.progress import progress_bar
from embq.ranks import all_gather_int64, all_gather_text, all_reduce_max, process_group, run_phase

RAW_FILE = "raw_hashes.npy"
DEFAULT_MERGE_VALUES = 1 << 22  # values per rank per all-gather round: 32 MiB of int64
DEFAULT_CHUNK_ROWS = 1 << 18


def split_files(sizes: list[int], world: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) ranges of file indices, one per rank, balanced by bytes: file i goes
    to the rank whose share of the total holds the file's middle byte. Ranks may get no file."""
    total = sum(sizes)
    if total == 0:
        sizes, total = [1] * len(sizes), len(sizes)
    owner, start = [], 0
    for size in sizes:
        owner.append(min(world - 1, (2 * start + size) * world // (2 * max(total, 1))))
        start += size
    return [(sum(o < r for o in owner), sum(o <= r for o in owner)) for r in range(world)]


def _stage(paths: list[Path], staging: Path, strict: bool, frequency: bool,
           show: bool) -> tuple[ReadReport, np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Pass 1 over this rank's files: staged arrays, the read report, stats and value counts."""
    report = ReadReport()
    stats = np.zeros(1 + N_INT + N_CAT, np.int64)  # clicks, int missing, cat missing
    uniques = [np.empty(0, np.uint32)] * N_CAT
    counts = [np.empty(0, np.int64)] * N_CAT
    staging.mkdir()
    with NpyAppender(staging / DENSE_FILE, np.float32, N_INT) as dense_out, \
         NpyAppender(staging / RAW_FILE, np.int64, N_CAT) as raw_out, \
         NpyAppender(staging / LABELS_FILE, np.int32, 1) as label_out, \
         progress_bar(unit="row", desc="prepare: read (rank 0)", enabled=show) as bar:
        for chunk in read_criteo(paths, report, strict=strict):
            dense_out.append(dense_transform(chunk.ints, chunk.int_missing))
            raw_out.append(np.where(chunk.cat_missing, -1, chunk.cats.astype(np.int64)))
            label_out.append(chunk.labels.reshape(-1, 1))
            if frequency:
                count_chunk(chunk.cats, chunk.cat_missing, uniques, counts)
            stats[0] += int(chunk.labels.sum())
            stats[1: 1 + N_INT] += chunk.int_missing.sum(0)
            stats[1 + N_INT:] += chunk.cat_missing.sum(0)
            bar.update(len(chunk))
    return report, stats, uniques, counts


def merge_vocab(uniques: list[np.ndarray], counts: list[np.ndarray], min_frequency: int,
                merge_values: int = DEFAULT_MERGE_VALUES) -> list[np.ndarray]:
    """Per feature, the sorted values whose count summed over all ranks is >= min_frequency.

    The hash space [0, 2**32) is cut into equal slices, as many as the largest rank's distinct
    count / merge_values: hashes are near uniform, so a round sends about merge_values values
    per rank (a skewed feature sends more per round, never more in total).
    """
    vocab = []
    for f in range(N_CAT):
        longest = int(max(a[0] for a in all_gather_int64(np.array([len(uniques[f])]))))
        rounds = max(1, -(-longest // merge_values))
        bounds = np.array([(b << 32) // rounds for b in range(rounds + 1)], dtype=np.int64)
        cuts = np.searchsorted(uniques[f].astype(np.int64), bounds)
        kept = []
        for b in range(rounds):
            lo, hi = int(cuts[b]), int(cuts[b + 1])
            values = np.concatenate(all_gather_int64(uniques[f][lo:hi]))
            summed = np.concatenate(all_gather_int64(counts[f][lo:hi]))
            merged, total = merge_counts(np.empty(0, np.int64), np.empty(0, np.int64), values, summed)
            kept.append(merged[total >= min_frequency].astype(np.uint32))
        vocab.append(np.concatenate(kept))
    return vocab


def _merge_reports(report: ReadReport, stats: np.ndarray) -> tuple[ReadReport, list[int], np.ndarray]:
    """All ranks' read reports and stats -> (merged report, rows per rank, summed stats)."""
    local = np.concatenate([[report.rows_read, report.rows_refused], stats])
    gathered = all_gather_int64(local)
    examples = [json.loads(t) for t in all_gather_text(json.dumps([str(r) for r in report.refusals[:20]]))]
    merged = ReadReport(rows_read=int(sum(g[0] for g in gathered)),
                        rows_refused=int(sum(g[1] for g in gathered)))
    merged.refusals = [e for rank_examples in examples for e in rank_examples][:20]
    return merged, [int(g[0]) for g in gathered], np.sum([g[2:] for g in gathered], axis=0)


def _write_rows(staging: Path, partial: Path, first_row: int, sizes: list[int],
                vocab: list[np.ndarray] | None, chunk_rows: int, show: bool) -> list[np.ndarray]:
    """Pass 2: this rank's staged rows -> ids, written at its offset; returns the ids seen."""
    seen = [np.zeros(s, dtype=bool) for s in sizes]
    rows = int(np.load(staging / LABELS_FILE, mmap_mode="r").shape[0])
    with progress_bar(total=rows, unit="row", desc="prepare: write (rank 0)", enabled=show) as bar:
        for lo in range(0, rows, chunk_rows):
            hi = min(lo + chunk_rows, rows)
            hashes = read_rows(staging / RAW_FILE, np.int64, N_CAT, lo, hi)
            ids = sparse_ids(np.maximum(hashes, 0), hashes < 0, sizes, vocab)
            for f in range(N_CAT):
                seen[f][ids[:, f]] = True
            write_rows_at(partial / DENSE_FILE, first_row + lo,
                          read_rows(staging / DENSE_FILE, np.float32, N_INT, lo, hi))
            write_rows_at(partial / SPARSE_FILE, first_row + lo, ids)
            write_rows_at(partial / LABELS_FILE, first_row + lo,
                          read_rows(staging / LABELS_FILE, np.int32, 1, lo, hi))
            bar.update(hi - lo)
    return seen


def prepare_criteo_ranks(inputs: list[str | os.PathLike], output: str | os.PathLike,
                         table_size: int | list[int] = DEFAULT_TABLE_SIZE, mode: str = "hash",
                         min_frequency: int = 2, strict: bool = False, progress: bool = True,
                         dataset_name: str = "criteo", merge_values: int = DEFAULT_MERGE_VALUES,
                         chunk_rows: int = DEFAULT_CHUNK_ROWS) -> dict:
    """`embq.data.preprocess.prepare_criteo` over the ranks of a torch.distributed job.

    Initialises gloo from the environment (torchrun) when no group exists. Every rank must see
    the inputs and `output`'s parent on a shared filesystem. Arguments are those of
    `prepare_criteo`, plus `merge_values` (values per rank per all-gather round when merging
    frequency counts) and `chunk_rows` (rows per write). Returns the summary on every rank.
    """
    paths = [Path(p) for p in inputs]
    output = Path(output)
    partial = output.with_name(output.name + ".partial")
    with process_group() as (rank, world):
        show = progress and rank == 0

        def start() -> None:
            check_request(paths, output, mode)
            if mode == "hash":
                table_sizes(table_size)
            if rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)

        run_phase(start, True, "checking the request")
        staging = partial / f".rank-{rank}"
        try:
            lo, hi = split_files([p.stat().st_size for p in paths], world)[rank]
            report, stats, uniques, counts = run_phase(
                lambda: _stage(paths[lo:hi], staging, strict, mode == "frequency", show),
                True, "reading its input files")
            merged, rows_per_rank, summed = _merge_reports(report, stats)
            require_rows(paths, merged)  # the same on every rank
            vocab = None
            if mode == "frequency":
                vocab = merge_vocab(uniques, counts, min_frequency, merge_values)
                sizes = [len(v) + 1 for v in vocab]
            else:
                sizes = table_sizes(table_size)
            del uniques, counts
            total = merged.rows_read

            def allocate() -> None:
                preallocate_npy(partial / DENSE_FILE, np.float32, (total, N_INT))
                preallocate_npy(partial / SPARSE_FILE, np.int64, (total, N_CAT))
                preallocate_npy(partial / LABELS_FILE, np.int32, (total, 1))

            run_phase(allocate, rank == 0, "creating the output arrays")
            first_row = sum(rows_per_rank[:rank])
            seen = run_phase(lambda: _write_rows(staging, partial, first_row, sizes, vocab,
                                                 chunk_rows, show),  # fmt: skip
                             True, "writing its rows")
            shutil.rmtree(staging)
            seen = [all_reduce_max(s) for s in seen]
            summary = build_summary(
                dataset_name=dataset_name, paths=paths, report=merged, clicks=int(summed[0]),
                mode=mode, min_frequency=min_frequency, sizes=sizes, seen=seen,
                int_missing=summed[1: 1 + N_INT], cat_missing=summed[1 + N_INT:])

            def publish() -> None:
                (partial / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
                os.replace(partial, output)

            run_phase(publish, rank == 0, "publishing the output")
            return summary
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
            raise
