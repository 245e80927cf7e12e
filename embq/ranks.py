"""What every torch.distributed job of embq needs: a gloo group from torchrun's environment, and
phases after which all ranks agree whether every rank succeeded (a failed rank fails the job on
every rank with a message, never a hang or a half-finished output)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from embq.errors import EmbqError


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def process_group() -> Iterator[tuple[int, int]]:
    """(rank, world size) of the current group, initialising gloo from the environment when no
    group exists yet (and destroying it afterwards)."""
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo")
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        if created:
            dist.destroy_process_group()


def agree(ok: bool) -> bool:
    """All ranks say whether they succeeded; True only if every rank did (a barrier, too)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def run_phase(fn: Callable[[], Any], run_here: bool, what: str) -> Any:
    """Run `fn` where `run_here`, then make every rank raise if any rank failed."""
    result, error = None, None
    if run_here:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks know
            error = e
    if not agree(error is None):
        if error is not None:
            raise error
        raise EmbqError(f"another rank failed while {what}; see its error message above")
    return result


def all_gather_int64(values: np.ndarray) -> list[np.ndarray]:
    """Every rank's 1-D int64 array (lengths may differ), in rank order, on every rank."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    local = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64).reshape(-1))
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([local.numel()], dtype=torch.int64))
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.int64)
    padded[: local.numel()] = local
    out = [torch.zeros(longest, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(out, padded)
    return [o[: int(s.item())].numpy() for o, s in zip(out, sizes)]


def all_gather_text(text: str) -> list[str]:
    """Every rank's UTF-8 string, in rank order (as bytes in int64 tensors: no pickle)."""
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    return [bytes(a.astype(np.uint8)).decode("utf-8") for a in all_gather_int64(raw)]


def all_reduce_max(values: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    """Element-wise max over ranks of a 1-D integer or bool array (same dtype back), sent `chunk`
    values at a time so the message stays bounded whatever the array's length."""
    import torch
    import torch.distributed as dist

    out = np.array(values, copy=True)
    for lo in range(0, len(out), chunk):
        part = torch.from_numpy(out[lo: lo + chunk].astype(np.int32))
        dist.all_reduce(part, op=dist.ReduceOp.MAX)
        out[lo: lo + chunk] = part.numpy().astype(out.dtype)
    return out
