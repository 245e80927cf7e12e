"""Splitting row work between this thread and a persistent pool: one thread per usable core.

The compiled kernels (`embq.embedding.compiled`) and numpy both release the GIL inside their
loops, so threads give real parallelism. `run_rows` shares small row pieces (a core slowed by
other work on the machine simply takes fewer); `run_chunks` maps a function over work items.
"""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from embq.threads import usable_cores

_POOL: list = []  # [(pid, ThreadPoolExecutor)]
_LOCK = threading.Lock()


def kernel_threads() -> int:
    """Threads the row-wise searches use (this one plus pool threads): one per usable core."""
    return usable_cores()


def _pool(workers: int) -> ThreadPoolExecutor:
    """A persistent thread pool (recreated after a fork: pool threads do not survive one)."""
    pid = os.getpid()
    with _LOCK:
        if not _POOL or _POOL[0][0] != pid:
            _POOL[:] = [(pid, ThreadPoolExecutor(workers, thread_name_prefix="embq-rows"))]
        return _POOL[0][1]


def run_rows(fn, n: int, most: int = 8192, least: int = 256) -> None:
    """Call fn(r0, r1) over pieces [r0, r1) covering range(n): this thread and up to
    (cores - 1) pool threads take pieces until none are left. For GIL-free kernels; pieces are
    small (about n / (4 cores), at least `least` and at most `most` rows) so that a core slowed
    by other work on the machine simply takes fewer of them."""
    if n <= 0:
        return
    workers = usable_cores()
    size = max(1, min(most, max(least, -(-n // (4 * workers)))))
    pieces = [(r0, min(n, r0 + size)) for r0 in range(0, n, size)]
    if workers <= 1 or len(pieces) == 1:
        for r0, r1 in pieces:
            fn(r0, r1)
        return
    counter = itertools.count()  # next() on a count is atomic under the GIL
    errors: list = []

    def drain() -> None:
        while not errors:
            k = next(counter)
            if k >= len(pieces):
                return
            try:
                fn(*pieces[k])
            except BaseException as e:  # noqa: BLE001  (re-raised in the caller)
                errors.append(e)
                return

    pool = _pool(workers)
    futs = [pool.submit(drain) for _ in range(min(workers, len(pieces)) - 1)]
    drain()
    for f in futs:
        if not f.cancel():  # started: wait for its current piece
            f.result()
    if errors:
        raise errors[0]


def chunk_rows(n: int, most: int, least: int = 256) -> int:
    """Rows per work item: at most `most`, but small enough to give every core work."""
    return max(least, min(most, -(-n // usable_cores())))


def run_chunks(fn, items: list) -> None:
    """Call fn(item) for every item on a thread pool with one thread per core (numpy and
    torch release the GIL inside their loops), or in this thread when one worker suffices."""
    workers = min(len(items), usable_cores())
    if workers <= 1:
        for it in items:
            fn(it)
        return
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fn, items))
