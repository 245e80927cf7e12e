"""`quantize_checkpoint`: a DLRM saved as a sharded DCP checkpoint -> one artifact, in bounded
memory, on one process or split over the ranks of a torchrun job.

Every table is read through `CheckpointTable` (row chunks memory-mapped from the .distcp files,
never a whole shard) and encoded with `embq.embedding.stream`'s chunked, resumable machinery.

Outputs (design (a)): rank 0 creates the staging directory ``.OUT.partial``; the ranks share out
the tables whose formats fit params (codebooks), each fitted on a seeded sample drawn from the
whole table (so params equal a one-process run's); rank 0 preallocates each table's one file with
its params; then every rank encodes its contiguous rows
`row_range(rows, rank, world)` of every table into disjoint byte ranges of those files; after a
barrier rank 0 hashes the files and publishes the manifest by an atomic rename. Why (a) rather
than per-rank shard files: the artifact stays the format every loader already reads (one file per
table, so `compact` keeps serving 4/2-bit rows zero-copy from the mapped file, and the digest and
seal cover it unchanged), and its bytes are identical to a one-process run's whatever the world
size. The price is a filesystem all ranks see (NFS, Lustre, one machine's disk); the row split
needs no coordination while writing.

Resume: ``.embq-stream/job.json`` records the job (checkpoint fingerprint, config, formats) and
which tables have their params in place (``fit-<table>.*`` hold fitted params until then); one ``rows-<table>@LO-HI.json`` per rank range records
durable rows. A rerun with the same arguments (any world size) continues; other arguments are
refused; ``resume=False`` starts over. Any rank failing (an error, or a killed process that
breaks the process group) fails every rank with a message; what is left is only the hidden
staging directory, never something at the output path.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from embq.artifact.writer import DENSE_KIND_FP32, ArtifactWriter, TableFileWriter
from embq.checkpoint.metadata import CheckpointIndex, read_index
from embq.checkpoint.model import CheckpointModel, load_config, map_checkpoint, read_dense
from embq.checkpoint.source import CheckpointTable
from embq.embedding.configs import DEFAULT_SAMPLE_ROWS
from embq.embedding.registry import get_format
from embq.embedding.stream import (
    DEFAULT_CHUNK_ROWS,
    JOB_FILE,
    STATE_DIR,
    DirectoryLock,
    RunOptions,
    TableJob,
    encode_range,
    fit_params,
    resumable_record,
    row_range,
    staging_path,
)
from embq.errors import ArtifactError, ConfigError, EmbqError
from embq.files import read_json_or_none, write_json_atomic
from embq.plan import Plan
from embq.ranks import launched_by_torchrun, process_group, run_phase

JOB_VERSION = 1


@dataclass
class _CheckpointJob:
    index: CheckpointIndex
    model: CheckpointModel
    tables: list[TableJob]
    output: Path
    kernels: dict[str, str]  # {table: runtime kernel choice} the plan records

    @property
    def staging(self) -> Path:
        return staging_path(self.output)

    def fingerprint(self) -> dict[str, Any]:
        return {"version": JOB_VERSION, "checkpoint": self.index.fingerprint(),
                "config": self.model.config.to_json(),
                "tables": [[t.name, t.format_name, t.sample_rows, t.seed] for t in self.tables],
                "kernels": self.kernels}  # fmt: skip

    def close(self) -> None:
        for t in self.tables:
            t.source.close()


def _open(checkpoint: str | os.PathLike, config: Any, plan: Any,
          output: str | os.PathLike) -> _CheckpointJob:  # fmt: skip
    import torch

    from embq.embedding.encode import resolve_plan
    from embq.models.dlrm import DLRMConfig
    from embq.models.tables import TableInfo

    out = Path(output).absolute()
    if os.path.lexists(out):
        raise ArtifactError(f"{out} already exists; embq never overwrites an artifact. Choose "
                            "another output path or remove the old one.")  # fmt: skip
    plan = Plan.parse(plan)
    if plan.dense is not None:
        raise ConfigError(
            f"the plan quantizes the dense towers ({plan.dense}), which needs calibration data; "
            "quantize the tables from the checkpoint with a tables-only plan, then run "
            "`embq quantize-dense` on the artifact"
        )
    if not isinstance(config, DLRMConfig):
        config = load_config(config)
    index = read_index(checkpoint)
    model = map_checkpoint(index, config)
    empty = torch.empty(0)
    infos = [TableInfo(t.name, t.rows, t.dim, [t.feature], "SUM", empty) for t in model.tables]
    formats = resolve_plan(infos, plan)
    jobs: list[TableJob] = []
    try:
        for t in model.tables:
            fmt = formats[t.name]
            jobs.append(TableJob(
                CheckpointTable(index, t.key), str(fmt), out, t.name, [t.feature],
                int(getattr(fmt, "sample_rows", DEFAULT_SAMPLE_ROWS)), int(getattr(fmt, "seed", 0)),
                record_tag=f"{t.name}@",
            ))  # fmt: skip
    except BaseException:
        for j in jobs:
            j.source.close()
        raise
    kernels = {t.name: plan.kernel_for(t.name) for t in model.tables}
    kernels = {name: choice for name, choice in kernels.items() if choice is not None}
    return _CheckpointJob(index, model, jobs, out, kernels)


def _discard(job: _CheckpointJob) -> None:
    staging = job.staging
    if not staging.exists():
        return
    if not (staging / STATE_DIR / JOB_FILE).exists() and any(staging.iterdir()):
        raise ArtifactError(f"{staging} exists but was not made by an embq job; remove it yourself")
    DirectoryLock(staging).release()  # refuse to delete a directory another run is writing
    shutil.rmtree(staging)


@dataclass
class _Prepared:
    writer: ArtifactWriter
    files: dict[str, TableFileWriter]
    lock: DirectoryLock

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.lock.release()


def _claim(job: _CheckpointJob, resume: bool) -> DirectoryLock:
    """Rank 0: create or resume the staging directory and its job record; hold its lock."""
    if not resume:
        _discard(job)
    staging, state = job.staging, job.staging / STATE_DIR
    staging.mkdir(parents=True, exist_ok=True)
    lock = DirectoryLock(staging)
    try:
        fingerprint = job.fingerprint()
        record = resumable_record(staging, fingerprint)
        ready = dict((record or {}).get("ready", {}))
        write_json_atomic(state / JOB_FILE, {"job": fingerprint, "ready": ready})
        return lock
    except BaseException:
        lock.release()
        raise


def _ready(job: _CheckpointJob) -> dict[str, Any]:
    """{table: stats} of the tables whose params are already in their table file."""
    return dict((read_json_or_none(job.staging / STATE_DIR / JOB_FILE) or {}).get("ready", {}))


def _fit_file(job: _CheckpointJob, name: str, suffix: str) -> Path:
    return job.staging / STATE_DIR / f"fit-{name}.{suffix}"


def _fit_share(job: _CheckpointJob, rank: int, world: int, progress: bool) -> None:
    """Every rank fits its share of the tables that still need params (codebooks first, the
    largest first), each on a seeded sample of the WHOLE table, so params equal a one-process
    run's; params go to a staging file, then the stats record that says they are complete."""
    from safetensors.numpy import save_file

    from embq.embedding.configs import parse_format
    from embq.progress import progress_bar

    ready = _ready(job)
    todo = [t for t in job.tables if t.name not in ready]
    todo.sort(key=lambda t: (not parse_format(t.format_name).fits_params, -t.source.rows))
    mine = todo[rank::world]
    for t in progress_bar(mine, enabled=progress, desc="fitting", unit="table"):
        params, stats = fit_params(t, get_format(t.format_name))
        save_file({k: v for k, v in params.items()}, str(_fit_file(job, t.name, "safetensors")))
        write_json_atomic(_fit_file(job, t.name, "json"), {"stats": stats})


def _prepare(job: _CheckpointJob, lock: DirectoryLock) -> _Prepared:
    """Rank 0: the table files (fitted params in their headers, rows preallocated), towers and
    model section; marks each table ready in the job record once its file is durable."""
    from safetensors.numpy import load_file

    state = job.staging / STATE_DIR
    files: dict[str, TableFileWriter] = {}
    try:
        ready = _ready(job)
        fingerprint = job.fingerprint()
        writer = ArtifactWriter(job.output, staging=job.staging)
        for t in job.tables:
            reuse = t.name in ready
            if reuse:
                params, stats = None, ready[t.name]
            else:
                for old in state.glob(f"rows-{t.name}@*.json"):  # its file is about to be new
                    old.unlink()
                params = load_file(str(_fit_file(job, t.name, "safetensors")))
                stats = read_json_or_none(_fit_file(job, t.name, "json"))["stats"]
            files[t.name] = writer.begin_table(
                t.name, t.format_name, t.source.rows, t.source.dim, params=params,
                feature_names=t.feature_names, stats=stats, reuse=reuse,
                kernel_choice=job.kernels.get(t.name),
            )  # fmt: skip
            if not reuse:
                files[t.name].sync()
                ready[t.name] = stats
                write_json_atomic(state / JOB_FILE, {"job": fingerprint, "ready": ready})
        writer.add_dense(read_dense(job.index, job.model), meta={"kind": DENSE_KIND_FP32})
        config = job.model.config
        writer.set_model({"type": "dlrm", "config": config.to_json(),
                          "pooling": {t.name: "SUM" for t in job.tables}})  # fmt: skip
        return _Prepared(writer, files, lock)
    except BaseException:
        for f in files.values():
            f.close()
        raise


def _encode_rows(job: _CheckpointJob, prepared: _Prepared | None, rank: int, world: int,
                 opts: RunOptions) -> None:  # fmt: skip
    """This rank's rows of every table, into the shared table files."""
    for t in job.tables:
        lo, hi = row_range(t.source.rows, rank, world)
        if prepared is not None:
            table = prepared.files[t.name]
        else:
            if not t.table_file.exists():
                raise EmbqError(
                    f"rank {rank} does not see {t.table_file}, which rank 0 created: every rank "
                    "writes its rows into the artifact's table files, so the output must be on "
                    "a filesystem all ranks share (e.g. NFS, or one machine's disk)"
                )
            bpr = get_format(t.format_name).bytes_per_row(t.source.dim)
            table = TableFileWriter.open(t.table_file, t.source.rows, bpr)
        try:
            encode_range(t, table, lo, hi, opts)
        finally:
            if prepared is None:
                table.close()


def _publish(job: _CheckpointJob, prepared: _Prepared) -> Path:
    for f in prepared.files.values():
        f.close()
    shutil.rmtree(job.staging / STATE_DIR)
    return prepared.writer.publish()


def _phase(distributed: bool) -> Callable[[Callable[[], Any], bool, str], Any]:
    """run_phase for a process group (a lost rank becomes an EmbqError), or a plain call."""
    if not distributed:
        return lambda fn, here, what: fn() if here else None

    def phase(fn: Callable[[], Any], here: bool, what: str) -> Any:
        try:
            return run_phase(fn, here, what)
        except EmbqError:
            raise
        except RuntimeError as e:  # gloo/nccl: a peer died (killed rank) or timed out
            raise EmbqError(
                f"lost another rank while {what} ({type(e).__name__}: {e}); the job failed and "
                "left only its hidden staging directory: rerun the same command to resume"
            ) from e

    return phase


def _hint(error: BaseException, staging: Path) -> BaseException:
    """The error to raise: with a note on how to resume when unfinished work is kept."""
    if not staging.exists() or not isinstance(error, EmbqError) or "resume" in str(error):
        return error
    try:
        return type(error)(f"{error}. Unfinished work is kept in {staging}: rerunning the same "
                           "command resumes it; --no-resume (resume=False) starts over")  # fmt: skip
    except TypeError:  # a subclass with another signature: keep it as it is
        return error


def quantize_checkpoint(
    checkpoint: str | os.PathLike,
    config: Any,
    plan: Any,
    output: str | os.PathLike,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    resume: bool = True,
    progress: bool = True,
    checkpoint_seconds: float = 2.0,
    distributed: bool | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> Path:
    """Quantize the DLRM in a DCP checkpoint directory into an artifact (`embq.load` reads it).

    Args:
        checkpoint: the directory `dcp.save` wrote (e.g. from a DistributedModelParallel).
        config: the model's `DLRMConfig`, or a path to its JSON.
        plan: a tables plan (`embq.Plan` or what `Plan.parse` reads); dense towers stay fp32.
        output: the artifact directory to create.
        chunk_rows: rows per chunk (memory is about chunk_rows * dim * 12 bytes per rank).
        resume: continue an interrupted run with the same arguments (False: start over).
        progress: progress bars on stderr (rank 0 only).
        checkpoint_seconds: how often finished rows are made durable.
        distributed: split rows over the ranks of torch.distributed (gloo, from the torchrun
            environment if no group exists); None: when WORLD_SIZE > 1.
        on_chunk: called after each chunk with the row count done in the current table (tests).

    Returns:
        The artifact path, on every rank.

    Raises:
        DataError: an unreadable, corrupt or incomplete checkpoint. ConfigError: the config
        and checkpoint disagree, or a bad plan. ArtifactError: the output exists. EmbqError:
        another rank failed or died.
    """
    import torch.distributed as dist

    if distributed is None:
        distributed = dist.is_available() and (dist.is_initialized() or launched_by_torchrun())
    with process_group() if distributed else nullcontext((0, 1)) as (rank, world):
        phase = _phase(distributed)
        opts = RunOptions(chunk_rows, progress and rank == 0, checkpoint_seconds, on_chunk)
        job = phase(lambda: _open(checkpoint, config, plan, output), True, "opening the checkpoint")
        staging_existed = job.staging.exists()
        prepared: _Prepared | None = None
        lock: DirectoryLock | None = None
        try:
            lock = phase(lambda: _claim(job, resume), rank == 0, "preparing the output")
            phase(lambda: _fit_share(job, rank, world, opts.progress), True, "fitting params")
            prepared = phase(lambda: _prepare(job, lock), rank == 0, "preparing the tables")
            phase(lambda: _encode_rows(job, prepared, rank, world, replace(opts)), True,
                  "encoding rows")  # fmt: skip
            phase(lambda: _publish(job, prepared), rank == 0, "publishing")
            return job.output
        except BaseException as e:
            if rank == 0 and prepared is None and not staging_existed and job.staging.exists():
                if lock is not None:
                    lock.release()
                    lock = None
                shutil.rmtree(job.staging, ignore_errors=True)  # nothing durable was made
            raised = _hint(e, job.staging)
            if raised is e:
                raise
            raise raised from e
        finally:
            if prepared is not None:
                prepared.close()
            elif lock is not None:
                lock.release()
            job.close()
