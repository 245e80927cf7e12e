"""Noticing that a published artifact's files changed on disk after they were checked.

Artifacts are immutable once published: publish a new artifact and swap it in atomically (a
new directory, or a symlink flipped with `ln -sfn`), never edit one in place. A server that
memory-maps table files cannot survive an in-place edit: a table file truncated under a
"compact" kernel kills the process with SIGBUS on the next lookup of a page past the new end,
and bytes rewritten in place change its answers without a restart. So a server records each
file's state when its checksum matched and compares the disk with it (`FileStates.changes`):
another inode at the path (replaced), a size, modification or status-change time that moved
(truncated, grown, rewritten; the status-change time cannot be set back by hand), or a file
gone. Torch-free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FileState:
    """What `os.stat` says about one file: device, inode, size (bytes), modification and
    status-change times (ns)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: str | os.PathLike) -> FileState | None:
        """The file's state (following symlinks, as readers open it), or None if it is gone."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def describe_change(name: str, before: FileState, after: FileState | None) -> str | None:
    """What happened to file `name` between two states, in words, or None if nothing did."""
    if after == before:
        return None
    if after is None:
        return f"{name} was removed"
    if (after.dev, after.ino) != (before.dev, before.ino):
        return f"{name} was replaced by another file"
    if after.size < before.size:
        return f"{name} was truncated from {before.size} to {after.size} bytes"
    if after.size > before.size:
        return f"{name} grew from {before.size} to {after.size} bytes"
    return f"{name} was modified in place"


class FileStates:
    """The states of a set of files at one moment, to compare the disk with later.

    Args:
        states: {path: state}; a None state stands for a file that was missing then.
        root: paths are named relative to it in messages (when below it).
    """

    def __init__(self, states: dict[Path, FileState | None], root: Path | None = None) -> None:
        self.states = dict(states)
        self.root = root

    @classmethod
    def of(cls, paths: list[Path], root: Path | None = None) -> FileStates:
        """The files' states now."""
        return cls({Path(p): FileState.of(p) for p in paths}, root)

    def _name(self, path: Path) -> str:
        if self.root is not None and path.is_relative_to(self.root):
            return str(path.relative_to(self.root))
        return str(path)

    def changes(self) -> list[str]:
        """One sentence per file whose state on disk differs from the recorded one."""
        out = []
        for path, before in self.states.items():
            after = FileState.of(path)
            if before is None:
                if after is not None:
                    out.append(f"{self._name(path)} appeared")
                continue
            change = describe_change(self._name(path), before, after)
            if change is not None:
                out.append(change)
        return out
