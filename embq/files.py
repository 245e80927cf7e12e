"""Writing files so that a crash never leaves something half-written that looks whole.

Every output embq publishes (artifacts, models, quantized towers, TorchScript files, prepared
datasets, job records) is built under a hidden temporary name next to its destination and
renamed into place when complete. Directories are never renamed over anything that exists:
nothing a user already had is lost.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from embq.errors import ArtifactError, EmbqError


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or new file in directory `path` durable (a no-op where directories cannot
    be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish_directory(
    staging: Path, path: Path, error: type[EmbqError] = ArtifactError
) -> None:
    """Rename a finished staging directory to `path`, never replacing anything there."""
    if os.path.lexists(path):
        raise error(
            f"{path} appeared while it was being written; the finished output is left in "
            f"{staging}. Move it into place yourself."
        )
    try:
        # On POSIX a rename onto an existing *empty* directory succeeds; onto anything else it
        # fails. Either way nothing a user had is lost.
        os.rename(staging, path)
    except OSError as e:
        raise error(f"cannot move {staging} to {path}: {e}") from e
    fsync_dir(path.parent)


@contextmanager
def staged_directory(
    path: str | os.PathLike, error: type[EmbqError] = ArtifactError
) -> Iterator[Path]:
    """Build a directory under a hidden temporary sibling name; publish it at `path` when the
    block succeeds, remove it when the block fails. `path` must not exist."""
    path = Path(path)
    if os.path.lexists(path):
        raise error(f"{path} already exists; choose a new output path or remove it first.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        fsync_dir(tmp)
        publish_directory(tmp, path, error)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[Path]:
    """Write a file under a hidden temporary sibling name and rename it onto `path` (replacing
    an older file there) when the block succeeds; remove it when the block fails. The file
    gets the usual mode (0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Replace `path` atomically with JSON (a kill leaves the old or the new file, never half)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def read_json_or_none(path: str | os.PathLike) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
