"""Stages that record their completion, so a pipeline run again does only what is not done.

A stage has inputs (files or directories), parameters (its config section) and one output (a
file or directory) that it publishes atomically (every embq verb does). When it finishes, a
record `<workdir>/.stages/<name>.done.json` keeps the fingerprints of its inputs and output and
its parameters. The next run skips the stage when the record exists and the inputs, parameters
and output all still match; otherwise the stage is redone: its recorded output (provably this
pipeline's) is removed first. An output the pipeline has no record of is never removed: the
stage stops and says so. A stage killed half-way leaves no record and is redone from its start
(the verbs clean up their own partial outputs).

Fingerprints are cheap enough for Terabyte inputs: per file its size, mtime and a sha256 of its
first and last MiB (a changed file keeps neither its mtime nor, almost surely, those bytes).
Since a redone stage's output gets new fingerprints, every stage after it is redone too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embq.errors import ConfigError
from embq.files import staged_file

RECORDS_DIR = ".stages"
EDGE_BYTES = 1 << 20


def file_fingerprint(path: Path) -> dict[str, Any]:
    """Size, mtime (ns) and sha256 of the first and last MiB of one file."""
    st = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(EDGE_BYTES))
        if st.st_size > EDGE_BYTES:
            f.seek(max(EDGE_BYTES, st.st_size - EDGE_BYTES))
            digest.update(f.read(EDGE_BYTES))
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "edges_sha256": digest.hexdigest()}


def fingerprint(path: str | os.PathLike) -> dict[str, Any] | None:
    """A file's fingerprint, a directory's {relative path: fingerprint} of every file under it,
    or None when nothing is there."""
    path = Path(path)
    if path.is_file():
        return file_fingerprint(path)
    if path.is_dir():
        return {str(p.relative_to(path)): file_fingerprint(p)
                for p in sorted(path.rglob("*")) if p.is_file()}  # fmt: skip
    return None


@dataclass
class Stage:
    """One step: `run()` must create `output` (atomically) from `inputs` as `params` say.

    `run` may return a dict of notes (e.g. the verb's JSON line) kept in the record."""

    name: str
    inputs: list[Path]
    output: Path
    run: Callable[[], dict[str, Any] | None]
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageResult:
    name: str
    status: str  # "skipped" (complete), "ran" (first time) or "redone" (stale or incomplete)
    seconds: float
    record: dict[str, Any]


def record_path(workdir: Path, name: str) -> Path:
    return workdir / RECORDS_DIR / f"{name}.done.json"


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # missing or torn: the stage is not known to be complete


def why_stale(stage: Stage, record: dict[str, Any] | None) -> str | None:
    """None when `record` proves the stage complete for its current inputs and params, else why
    it must run."""
    if record is None:
        return "no completion record"
    if record.get("params") != json.loads(json.dumps(stage.params)):
        return "its parameters changed"
    now = {str(p): fingerprint(p) for p in stage.inputs}
    if record.get("inputs") != now:
        changed = [p for p in now if record.get("inputs", {}).get(p) != now[p]]
        return f"its inputs changed ({', '.join(changed) or 'the list of inputs'})"
    if record.get("output") != fingerprint(stage.output):
        return f"its output {stage.output} is missing or changed"
    return None


def run_stage(stage: Stage, workdir: Path, log: Callable[[str], None] = print) -> StageResult:
    """Skip `stage` if its record says it is complete, else (re)do it and record it."""
    path = record_path(workdir, stage.name)
    record = _read_record(path)
    reason = why_stale(stage, record)
    if reason is None:
        log(f"[{stage.name}] complete, skipped (record {path})")
        return StageResult(stage.name, "skipped", 0.0, record or {})
    for p in stage.inputs:
        if not p.exists():
            raise ConfigError(f"stage {stage.name}: input {p} does not exist")
    if stage.output.exists() or stage.output.is_symlink():
        if record is None or record.get("output_path") != str(stage.output):
            raise ConfigError(
                f"stage {stage.name}: {stage.output} exists but this pipeline has no record of "
                "writing it; move it away (or choose another --workdir) and run again")
        # Recorded as ours: a stale result of this very stage.
        if stage.output.is_dir():
            shutil.rmtree(stage.output)
        else:
            stage.output.unlink()
    status = "ran" if record is None else "redone"
    log(f"[{stage.name}] running ({reason})")
    path.unlink(missing_ok=True)
    started = time.perf_counter()
    notes = stage.run() or {}
    seconds = time.perf_counter() - started
    if not stage.output.exists():
        raise ConfigError(f"stage {stage.name} finished without writing {stage.output}")
    record = {"stage": stage.name, "params": json.loads(json.dumps(stage.params)),
              "inputs": {str(p): fingerprint(p) for p in stage.inputs},
              "output_path": str(stage.output), "output": fingerprint(stage.output),
              "seconds": round(seconds, 3), "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                          time.gmtime()),
              "notes": notes}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    log(f"[{stage.name}] done in {seconds:.1f} s")
    return StageResult(stage.name, status, seconds, record)
