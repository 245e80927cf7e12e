"""The index of a torch.distributed.checkpoint (DCP) directory, read without loading any tensor.

A DCP directory (what `dcp.save` with the default `FileSystemWriter` writes, e.g. from a TorchRec
`DistributedModelParallel` state dict) holds ``.metadata`` and one ``__R_N.distcp`` file per
writer. ``.metadata`` is a pickle of `torch.distributed.checkpoint.metadata.Metadata`: for every
state-dict key the global shape, dtype and saved chunks (offsets and sizes), and for every chunk
where its bytes lie (file, byte offset, length).

embq never unpickles user files with the stock unpickler: `_MetadataUnpickler` resolves only the
handful of plain classes DCP's metadata is made of (an allowlist, the pattern Python's pickle
documentation gives for "restricting globals"); anything else is refused with an EmbqError.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embq.errors import DataError

METADATA_FILE = ".metadata"
_DCP_META = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    (_DCP_META, n)
    for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
              "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}  # fmt: skip
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only: torch dtypes and the allowlisted classes above."""

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise DataError(
            f"the checkpoint's {METADATA_FILE} refers to {module}.{name}, which is not part of "
            "torch.distributed.checkpoint metadata; embq does not unpickle arbitrary objects"
        )


@dataclass(frozen=True)
class SavedChunk:
    """One saved piece of a tensor: where it sits in the tensor and where its bytes are.

    Attributes:
        offsets: the chunk's first index along each dim of the global tensor.
        sizes: the chunk's extent along each dim.
        file: the .distcp file holding it (absolute path).
        offset: byte offset of the chunk's record in `file`.
        length: byte length of the record.
    """

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: Path
    offset: int
    length: int


@dataclass(frozen=True)
class SavedTensor:
    """One tensor of the checkpoint (a state-dict key), as saved chunks."""

    key: str
    shape: tuple[int, ...]
    dtype: str  # "float32", "bfloat16", ... (torch dtype name without "torch.")
    chunks: tuple[SavedChunk, ...]

    @property
    def nbytes(self) -> int:
        from math import prod

        import torch

        return prod(self.shape) * getattr(torch, self.dtype).itemsize


@dataclass(frozen=True)
class CheckpointIndex:
    """What a DCP directory holds: its tensors by key (non-tensor entries are listed apart)."""

    path: Path
    tensors: dict[str, SavedTensor]
    other_keys: tuple[str, ...]

    def fingerprint(self) -> dict[str, Any]:
        """Identity of the checkpoint for resuming: metadata and every data file's size and mtime."""
        files = sorted({c.file for t in self.tensors.values() for c in t.chunks} |
                       {self.path / METADATA_FILE})  # fmt: skip
        out = {}
        for f in files:
            st = f.stat()
            out[f.name] = [st.st_size, st.st_mtime_ns]
        return {"path": str(self.path.resolve()), "files": out}


def _read_pickled_metadata(path: Path) -> Any:
    meta_path = path / METADATA_FILE
    if not path.is_dir():
        raise DataError(f"checkpoint {path} is not a directory; give a torch.distributed.checkpoint "
                        "directory (the checkpoint_id passed to dcp.save)")  # fmt: skip
    if not meta_path.is_file():
        raise DataError(
            f"{path} has no {METADATA_FILE}: not a torch.distributed.checkpoint directory, or an "
            "incomplete one (dcp.save writes .metadata last, after every rank's data)"
        )
    try:
        with open(meta_path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except DataError:
        raise
    except Exception as e:  # truncated or corrupt pickle: EOFError, UnpicklingError, ...
        raise DataError(f"cannot read {meta_path}: {type(e).__name__}: {e}. Is the checkpoint "
                        "complete and written by torch.distributed.checkpoint?") from e  # fmt: skip


def _tensor_entry(path: Path, key: str, md: Any, storage: dict) -> SavedTensor:
    dtype = str(md.properties.dtype).removeprefix("torch.")
    shape = tuple(int(s) for s in md.size)
    chunks = []
    for i, chunk in enumerate(md.chunks):
        offsets = tuple(int(o) for o in chunk.offsets)
        info = storage.get((key, offsets))  # a chunk is identified by its offsets
        if info is None:
            raise DataError(f"{path / METADATA_FILE}: chunk {i} of {key!r} at {list(offsets)} "
                            "has no storage record; the checkpoint is incomplete")  # fmt: skip
        if getattr(info, "transform_descriptors", None):
            raise DataError(
                f"{key!r} in {path} was saved with storage transforms "
                f"{list(info.transform_descriptors)} (e.g. compression); embq reads plain "
                "FileSystemWriter checkpoints in bounded memory only. Re-save without extensions."
            )
        file = path / str(info.relative_path)
        chunks.append(SavedChunk(offsets, tuple(int(s) for s in chunk.sizes), file,
                                 int(info.offset), int(info.length)))  # fmt: skip
    return SavedTensor(key, shape, dtype, tuple(chunks))


def _check_files(path: Path, tensors: dict[str, SavedTensor]) -> None:
    sizes: dict[Path, int] = {}
    for t in tensors.values():
        for c in t.chunks:
            if c.file not in sizes:
                if not c.file.is_file():
                    raise DataError(f"checkpoint {path} is incomplete: {c.file.name} (holding "
                                    f"{t.key!r}) is missing")  # fmt: skip
                sizes[c.file] = c.file.stat().st_size
            if c.offset < 0 or c.offset + c.length > sizes[c.file]:
                raise DataError(
                    f"checkpoint {path} is truncated or corrupt: {t.key!r} needs bytes "
                    f"{c.offset}..{c.offset + c.length} of {c.file.name}, which has "
                    f"{sizes[c.file]} bytes"
                )


def read_index(path: str | os.PathLike) -> CheckpointIndex:
    """Read a DCP directory's metadata (no tensor data) and check its files are all there.

    Raises:
        DataError: not a DCP directory, a corrupt or incomplete one, a transformed (compressed)
            one, or metadata holding objects other than DCP's own.
    """
    path = Path(path).absolute()
    meta = _read_pickled_metadata(path)
    sd_meta = getattr(meta, "state_dict_metadata", None)
    storage = getattr(meta, "storage_data", None)
    if not isinstance(sd_meta, dict) or not isinstance(storage, dict):
        raise DataError(f"{path / METADATA_FILE} does not hold torch.distributed.checkpoint "
                        f"Metadata (got {type(meta).__name__})")  # fmt: skip
    by_index = {(k.fqn, tuple(int(o) for o in k.offset)): v for k, v in storage.items()}
    tensors, other = {}, []
    for key, md in sd_meta.items():
        if type(md).__name__ == "TensorStorageMetadata":
            tensors[key] = _tensor_entry(path, key, md, by_index)
        else:
            other.append(key)
    _check_files(path, tensors)
    return CheckpointIndex(path, tensors, tuple(other))


def is_float_dtype(dtype: str) -> bool:
    """Whether embq reads tensors of `dtype` (a torch dtype name) as table or tower values."""
    return dtype in _FLOAT_DTYPES
