"""Chunked quantization of one table larger than RAM: mmap in, incremental out, resumable.

`quantize_table` reads a table file (see embq.embedding.sources) in row chunks, encodes each chunk with an
embq format, and writes the encoded rows into a preallocated table file inside a hidden staging
directory next to the output (``.OUT.embq.partial``). Peak memory is set by the chunk: about
``chunk_rows * dim * 4`` bytes of float32 input plus the encoded rows, never the table.

Resuming: the staging directory holds ``.embq-stream/job.json`` (what is being quantized: input
fingerprint, format, sample settings) and one ``rows-LO-HI.json`` per row range recording how many
rows are safely on disk (the table file is fsynced before the record is updated). A rerun with the
same arguments continues after the last recorded chunk; with different arguments or a changed
input it refuses, and ``resume=False`` (``--no-resume``) starts over. A run that fails before any
row is durable removes the staging directory it made; a later failure keeps it and says so in
its error. Formats that learn table-level
params (codebooks) fit them once on a seeded random sample; the params live in the table file, so
a resumed run encodes with exactly the same ones. The artifact appears at the output path only
when complete (atomic rename).

Distributed (`quantize_table_distributed`, ``torchrun -m embq quantize-table --distributed ...``): rank 0
prepares the staging directory and params, every rank encodes its own contiguous row range into
its rows of the shared table file (disjoint byte ranges, so no coordination is needed while
writing), and after a barrier rank 0 hashes and publishes. This needs a filesystem all ranks see.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from embq.artifact.reader import load_artifact
from embq.artifact.schema import MANIFEST_FILE, check_table_name, table_file_name
from embq.artifact.writer import ArtifactWriter, TableFileWriter
from embq.embedding.configs import DEFAULT_SAMPLE_ROWS, parse_format
from embq.embedding.registry import get_format
from embq.embedding.sources import TableSource, open_table
from embq.errors import ArtifactError, ConfigError, EmbqError, FormatError
from embq.files import publish_directory, read_json_or_none, write_json_atomic
from embq.ranks import process_group, run_phase

DEFAULT_CHUNK_ROWS = 65_536
STATS_SAMPLE_ROWS = 4_096  # rows used for quality stats when the format fits nothing
STATE_DIR = ".embq-stream"  # inside the staging directory; removed before publishing
JOB_FILE = "job.json"
JOB_VERSION = 1

ChunkCallback = Callable[[int], None]


def staging_path(output: str | os.PathLike) -> Path:
    """The hidden staging directory used for `output`: ``.NAME.partial`` next to it."""
    output = Path(output).absolute()
    return output.parent / f".{output.name}.partial"


def row_range(rows: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous rows [lo, hi) of `rank` out of `world`; sizes differ by at most one row."""
    return rows * rank // world, rows * (rank + 1) // world


@dataclass
class TableJob:
    """What one quantize_table call does (everything that must match to resume)."""

    source: TableSource
    format_name: str
    output: Path
    name: str
    feature_names: list[str]
    sample_rows: int
    seed: int
    record_tag: str = ""  # prefixes this table's progress records when an artifact has several

    @property
    def staging(self) -> Path:
        return staging_path(self.output)

    @property
    def table_file(self) -> Path:
        return self.staging / table_file_name(self.name)

    def fingerprint(self) -> dict[str, Any]:
        """JSON identity of the job. chunk_rows is left out: encoding is per row, so chunking
        never changes the output and may differ between a run and its resume."""
        return {"version": JOB_VERSION, "input": self.source.fingerprint(),
                "format": self.format_name, "name": self.name,
                "feature_names": self.feature_names, "sample_rows": self.sample_rows,
                "seed": self.seed}  # fmt: skip


class DirectoryLock:
    """An exclusive, non-blocking flock on the staging directory (POSIX; a no-op elsewhere)."""

    def __init__(self, directory: Path) -> None:
        self._fd: int | None = None
        try:
            import fcntl
        except ImportError:
            return
        self._fd = os.open(directory, os.O_RDONLY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise EmbqError(
                f"another process is writing {directory}; wait for it or stop it first"
            ) from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


# --------------------------------------------------------------------------- sampling and fitting


def _needs_sample(fmt: Any) -> bool:
    """Whether the format learns table-level params from data (codebooks) rather than per row:
    the base `TableFormat.fit` learns nothing, so only formats that override it need a sample."""
    from embq.embedding.formats import TableFormat

    return type(fmt).fit is not TableFormat.fit


def _sample(source: TableSource, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded uniform sample of `n` distinct rows.

    Returns:
        (sorted row indices int64 [n], the rows float32 [n, dim]).
    """
    n = min(n, source.rows)
    rng = np.random.default_rng(seed)
    if n < source.rows:
        idx = np.sort(rng.choice(source.rows, size=n, replace=False))
    else:
        idx = np.arange(n)
    return idx.astype(np.int64), source.take(idx)


def _check_finite(
    rows: np.ndarray, row_ids: np.ndarray, name: str, error: Exception | None
) -> None:
    """Raise FormatError naming the first global row holding NaN/Inf, if any.

    rows: float32 [n, dim]; row_ids: int64 [n], the global index of each row."""
    bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
    if bad.size:
        raise FormatError(
            f"row {int(row_ids[bad[0]])} of table {name!r} holds NaN or Inf ({bad.size} such rows "
            f"among rows {int(row_ids[0])}..{int(row_ids[-1])}); clean the table before quantizing"
        ) from error


def _encode(fmt: Any, rows: np.ndarray, params: dict, first_row: int, name: str) -> np.ndarray:
    """Encode float32 [n, dim] rows starting at global row `first_row`; errors name global rows."""
    try:
        return fmt.encode(rows, params)
    except FormatError as e:
        ids = np.arange(first_row, first_row + rows.shape[0])
        _check_finite(rows, ids, name, e)
        raise FormatError(
            f"table {name!r}, chunk of rows {first_row}..{ids[-1]} (row numbers below count from "
            f"{first_row}): {e}"
        ) from e


def fit_params(job: TableJob, fmt: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Fit table-level params on a seeded sample; also measure quality on it.

    Returns:
        (params for fmt.encode, stats: sample size and reconstruction errors in table units).
    """
    fit = _needs_sample(fmt)
    idx, sample = _sample(job.source, job.sample_rows if fit else STATS_SAMPLE_ROWS, job.seed)
    _check_finite(sample, idx, job.name, None)
    try:
        params = fmt.fit(sample) if fit else {}
    except FormatError as e:
        raise FormatError(
            f"table {job.name!r}: fitting {job.format_name} on {idx.shape[0]} sampled rows "
            f"failed: {e}"
        ) from e
    stats: dict[str, Any] = {"source": job.source.path.name, "source_tensor": job.source.name,
                             "source_dtype": job.source.dtype, "sample_rows": int(idx.shape[0]),
                             "sample_seed": job.seed}  # fmt: skip
    try:
        decoded = fmt.decode(fmt.encode(sample, params), params, job.source.dim)
    except FormatError:
        return params, stats  # the chunk loop will report the offending row by its global index
    err = decoded.astype(np.float64) - sample
    rms = float(np.sqrt(np.mean(np.square(sample, dtype=np.float64))))
    rmse = float(np.sqrt(np.mean(err * err)))
    stats.update(sample_rmse=rmse, sample_relative_rmse=rmse / rms if rms > 0 else 0.0,
                 sample_max_abs_error=float(np.abs(err).max(initial=0.0)))  # fmt: skip
    return params, stats


# --------------------------------------------------------------------------- the three phases


def _discard_unfinished(job: TableJob) -> None:
    """Remove an interrupted run's staging directory (resume=False), if embq made it."""
    staging = job.staging
    state = staging / STATE_DIR
    if staging.exists():
        ours = (state / JOB_FILE).exists() or (staging / MANIFEST_FILE).exists()
        if not ours and any(staging.iterdir()):
            raise ArtifactError(f"{staging} exists but was not made by embq; remove it yourself")
        DirectoryLock(staging).release()  # refuse to delete a directory another run is writing
        shutil.rmtree(staging)


def _prepare(job: TableJob, resume: bool) -> tuple[ArtifactWriter, TableFileWriter, DirectoryLock]:
    """Create or resume the staging directory; fit params once. Runs on one process (rank 0).

    Returns:
        (the artifact writer, the table file open for writing rows, the held lock).
    """
    fmt = get_format(job.format_name)
    fmt.check_dim(job.source.dim)
    staging = job.staging
    state = staging / STATE_DIR
    if not resume:
        _discard_unfinished(job)
    staging.mkdir(parents=True, exist_ok=True)
    lock = DirectoryLock(staging)
    try:
        fingerprint = job.fingerprint()
        record = resumable_record(staging, fingerprint)
        writer = ArtifactWriter(job.output, staging=staging)
        ready = record is not None and record.get("params_ready", False)
        if ready:  # resume: params and stats come from the earlier run, params from the file
            params, stats = None, record.get("stats", {})
        else:
            params, stats = fit_params(job, fmt)
            write_json_atomic(state / JOB_FILE, {"job": fingerprint, "params_ready": False})
            for old in state.glob("rows-*.json"):  # no row of a new table file is written yet
                old.unlink()
        table = writer.begin_table(
            job.name, job.format_name, job.source.rows, job.source.dim, params=params,
            feature_names=job.feature_names, stats=stats, reuse=ready,
        )  # fmt: skip
        if not ready:
            table.sync()
            done = {"job": fingerprint, "params_ready": True, "stats": stats}
            write_json_atomic(state / JOB_FILE, done)
        return writer, table, lock
    except BaseException:
        lock.release()
        raise


def resumable_record(staging: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The job record of an unfinished run in `staging` that this job (`fingerprint`) may resume,
    or None for a fresh staging directory; creates its state directory.

    Raises:
        EmbqError: the record is of a run with other arguments or input.
        ArtifactError: the directory holds files but no job record.
    """
    state = staging / STATE_DIR
    record = read_json_or_none(state / JOB_FILE)
    if record is not None and record.get("job") != fingerprint:
        changed = sorted(k for k in fingerprint if record["job"].get(k) != fingerprint[k])
        raise EmbqError(
            f"{staging} holds an unfinished run with different arguments or input "
            f"(changed: {', '.join(changed) or 'job version'}); rerun with the same arguments "
            "to resume, or pass --no-resume (resume=False) to start over"
        )
    if record is None and any(p.name != STATE_DIR for p in staging.iterdir()):
        raise ArtifactError(
            f"{staging} holds files but no embq job record; remove it or pass --no-resume"
        )
    state.mkdir(exist_ok=True)
    return record


@dataclass
class RunOptions:
    """How rows are pushed through (none of it changes the output)."""

    chunk_rows: int = DEFAULT_CHUNK_ROWS
    progress: bool = True
    checkpoint_seconds: float = 2.0
    on_chunk: ChunkCallback | None = None

    def __post_init__(self) -> None:
        rows = self.chunk_rows
        if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1:
            raise ConfigError(f"chunk_rows must be a positive number of rows, got {rows!r}")
        if self.checkpoint_seconds < 0:
            raise ConfigError(f"checkpoint_seconds must be >= 0, got {self.checkpoint_seconds!r}")


def encode_range(job: TableJob, table: TableFileWriter, lo: int, hi: int, opts: RunOptions) -> None:
    """Encode rows [lo, hi) chunk by chunk, checkpointing every `opts.checkpoint_seconds`."""
    from embq.progress import progress_bar

    fmt = get_format(job.format_name)
    record_path = job.staging / STATE_DIR / f"rows-{job.record_tag}{lo}-{hi}.json"
    record = read_json_or_none(record_path) or {}
    done = int(record.get("rows_done", 0))
    if not 0 <= done <= hi - lo:
        done = 0
    bar = progress_bar(total=hi - lo, initial=done, unit="row", unit_scale=True, desc=job.name,
                       enabled=opts.progress)  # fmt: skip
    last_checkpoint = time.monotonic()
    try:
        pos = lo + done
        while pos < hi:
            stop = min(pos + opts.chunk_rows, hi)
            codes = _encode(fmt, job.source.read(pos, stop), table.params, pos, job.name)
            table.write_rows(pos, codes)
            # A checkpoint costs an fsync; taking one per chunk was ~12% of an int4 run.
            now = time.monotonic()
            if stop == hi or now - last_checkpoint >= opts.checkpoint_seconds:
                table.sync()  # rows reach the disk before the record says they did
                write_json_atomic(record_path, {"rows_done": stop - lo})
                last_checkpoint = now
            bar.update(stop - pos)
            pos = stop
            if opts.on_chunk is not None:
                opts.on_chunk(stop)
    finally:
        bar.close()


def _finish(job: TableJob, writer: ArtifactWriter) -> Path:
    """Hash, write the manifest and rename into place (rank 0, after every row is written)."""
    shutil.rmtree(job.staging / STATE_DIR)
    return writer.publish()


def _rows_on_disk(job: TableJob) -> int:
    """Rows that progress records in the staging directory say are durable."""
    records = (read_json_or_none(p) for p in (job.staging / STATE_DIR).glob("rows-*.json"))
    return sum(int(r.get("rows_done", 0)) for r in records if isinstance(r, dict))


def _after_failure(job: TableJob, created: bool, prepared: bool, error: BaseException) -> BaseException:
    """What a failed run leaves: with no durable row, nothing (the staging directory is removed
    if this run created it); with durable rows, the staging directory and, if the run got as far
    as writing rows, an error that says how to resume or start over. Returns the exception to
    raise."""
    staging = job.staging
    if not staging.exists() or not (staging / STATE_DIR).exists() and (staging / MANIFEST_FILE).exists():
        return error  # nothing left, or a finished table that failed to publish (its error says)
    done = _rows_on_disk(job)
    if done == 0 and created:
        shutil.rmtree(staging, ignore_errors=True)
    if done == 0 or not prepared:  # not ours to describe (e.g. another run holds the lock)
        return error
    hint = (f"{done:,} of {job.source.rows:,} rows are saved in {staging}: rerunning with the "
            "same arguments and unchanged input resumes after them; to start over (e.g. after "
            "fixing the input) pass --no-resume (resume=False) or delete that directory")  # fmt: skip
    if isinstance(error, EmbqError):
        try:
            return type(error)(f"{error}. {hint}")
        except TypeError:  # a subclass with another signature: keep it, with a note
            pass
    error.add_note(hint)
    return error


def _finish_leftover(job: TableJob) -> Path | None:
    """A run killed between writing its manifest and its rename left a complete staging
    directory without job state: check it and publish it."""
    staging = job.staging
    if not (staging / MANIFEST_FILE).exists() or (staging / STATE_DIR).exists():
        return None
    entry = load_artifact(staging, verify=True).tables.get(job.name)
    src = job.source
    same = entry is not None and (entry.format, entry.rows, entry.dim) == (
        job.format_name, src.rows, src.dim
    )
    if not same:
        return None
    publish_directory(staging, job.output)
    return job.output


def _make_job(source: str | os.PathLike | TableSource, format_name: Any,
              output: str | os.PathLike, tensor: str | None, name: str | None,
              feature_names: list[str] | None, sample_rows: int | None,
              seed: int | None) -> TableJob:  # fmt: skip
    config = parse_format(format_name)
    # a codebook's sample comes from its config unless the call sets it
    if sample_rows is None:
        sample_rows = getattr(config, "sample_rows", DEFAULT_SAMPLE_ROWS)
    if seed is None:
        seed = getattr(config, "seed", 0)
    out = Path(output).absolute()
    if os.path.lexists(out):
        raise ArtifactError(
            f"{out} already exists; embq never overwrites an artifact. Choose another output "
            "path or remove the old one."
        )
    if sample_rows < 1:
        raise ConfigError(f"sample_rows must be a positive number of rows, got {sample_rows}")
    src = source if isinstance(source, TableSource) else open_table(source, tensor)
    if src.rows == 0:
        raise FormatError(f"{src.path}: table {src.name!r} has 0 rows; nothing to quantize")
    name = name or src.name.replace("/", "_")
    try:
        check_table_name(name)
    except ArtifactError as e:
        raise ConfigError(f"{e}; choose one with --name (name=...)") from e
    return TableJob(src, str(config), out, name, list(feature_names or []), int(sample_rows), int(seed))


# --------------------------------------------------------------------------- public API


def quantize_table(
    source: str | os.PathLike | TableSource,
    format_name: Any,
    output: str | os.PathLike,
    *,
    tensor: str | None = None,
    name: str | None = None,
    feature_names: list[str] | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    resume: bool = True,
    sample_rows: int | None = None,
    seed: int | None = None,
    progress: bool = True,
    checkpoint_seconds: float = 2.0,
    on_chunk: ChunkCallback | None = None,
) -> Path:
    """Quantize one table file into a one-table artifact, in bounded memory.

    Args:
        source: a table file (.npy, .safetensors, torch.save) or an open TableSource.
        format_name: a format name ("int4", "int8", "pq8x8(seed=3)", ...) or config
            (`embq.embedding.configs`).
        output: the artifact directory to create (X.embq); it must not exist.
        tensor: which tensor of a multi-tensor file.
        name: table name in the artifact (default: the tensor name, or the .npy file stem).
        feature_names: sparse features the table serves (manifest metadata).
        chunk_rows: rows per chunk; memory is about chunk_rows * dim * 4 bytes, times ~3.
        resume: continue an interrupted run with the same arguments (False: start over).
        sample_rows: rows drawn (seeded) to fit table-level params, for formats that have them
            (default: the format config's, 65536).
        seed: the sampling seed (default: the format config's, 0).
        progress: show a progress bar on stderr (`embq.progress`: quiet when not a terminal).
        checkpoint_seconds: how often finished rows are made durable (fsync + progress record);
            a killed run redoes at most this much work. 0: after every chunk.
        on_chunk: called with the global row count done after each chunk (a test hook, and a
            place for custom progress reporting); rows up to the last checkpoint are durable.

    Returns:
        The artifact path.

    Raises:
        FormatError: a zero-row table, a dim the format cannot pack, or NaN/Inf (naming the row).
        ArtifactError: the output exists. EmbqError: resuming a run with other arguments.
        A run that fails before any row is durable removes the staging directory it created;
        one that fails later keeps it, and its error says how many rows a rerun resumes after.
    """
    opts = RunOptions(chunk_rows, progress, checkpoint_seconds, on_chunk)
    job = _make_job(source, format_name, output, tensor, name, feature_names, sample_rows, seed)
    try:
        if resume and (done := _finish_leftover(job)) is not None:
            return done
        if not resume:
            _discard_unfinished(job)
        created, prepared = not job.staging.exists(), False
        try:
            writer, table, lock = _prepare(job, resume=True)
            prepared = True
            try:
                encode_range(job, table, 0, job.source.rows, opts)
                return _finish(job, writer)
            finally:
                table.close()
                lock.release()
        except BaseException as e:
            raised = _after_failure(job, created, prepared, e)
            if raised is e:
                raise
            raise raised from e
    finally:
        if job.source is not source:  # opened here: unmap now rather than at garbage collection
            job.source.close()


def quantize_table_distributed(
    source: str | os.PathLike,
    format_name: Any,
    output: str | os.PathLike,
    *,
    tensor: str | None = None,
    name: str | None = None,
    feature_names: list[str] | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    resume: bool = True,
    sample_rows: int | None = None,
    seed: int | None = None,
    progress: bool = True,
    checkpoint_seconds: float = 2.0,
) -> Path:
    """`quantize_table` split over the ranks of a torch.distributed job (e.g. under torchrun).

    Initialises a gloo process group from the environment if none exists. Each rank encodes rows
    `row_range(rows, rank, world)` of the same input; all ranks must see the same filesystem.
    Arguments are those of `quantize_table`. Returns the artifact path on every rank.
    """
    opts = RunOptions(chunk_rows, progress, checkpoint_seconds)
    with process_group() as (rank, world):
        job = run_phase(
            lambda: _make_job(source, format_name, output, tensor, name, feature_names,
                              sample_rows, seed),  # fmt: skip
            True, "opening the input",
        )
        prepared = run_phase(lambda: _prepare(job, resume), rank == 0, "preparing the output")
        lo, hi = row_range(job.source.rows, rank, world)

        def encode() -> None:
            if rank == 0:
                table = prepared[1]
            else:
                bpr = get_format(job.format_name).bytes_per_row(job.source.dim)
                table = TableFileWriter.open(job.table_file, job.source.rows, bpr)
            try:
                encode_range(job, table, lo, hi, replace(opts, progress=progress and rank == 0))
            finally:
                if rank != 0:
                    table.close()

        try:
            run_phase(encode, True, "encoding rows")
            run_phase(lambda: _finish(job, prepared[0]), rank == 0, "publishing")
            return job.output
        finally:
            if rank == 0:
                prepared[1].close()
                prepared[2].release()
            job.source.close()
