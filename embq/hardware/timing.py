"""Timing callables the way the probe and the planner's verification both do: warm-up calls,
then many calls, the median; several callables in interleaved rounds, so that load from other
processes on a shared machine falls on all of them alike.

Two clocks are read around every call: the wall clock, and the calling thread's CPU clock
(`time.thread_time`). With one torch thread every kernel runs on the calling thread, so its CPU
time is the call's latency on an idle machine, without the time the OS gave other processes:
the probe and the verification use it by default ("cpu"), which keeps the latency model's
check meaningful on a shared machine; "wall" is reported beside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

CLOCKS = ("cpu", "wall")


def call_seconds(fn: Callable[[Any], Any], inputs: Sequence[Any], min_calls: int = 15,
                 min_seconds: float = 0.1, max_calls: int = 2000, warmup: int = 2,
                 clock: str = "cpu") -> list[float]:  # fmt: skip
    """Seconds (by `clock`) of each of at least `min_calls` calls of fn(input), cycling over
    `inputs`, for at least `min_seconds` of wall time (after `warmup` untimed calls); under
    torch.inference_mode."""
    return _calls(fn, inputs, min_calls, min_seconds, max_calls, warmup)[clock]


def _calls(fn: Callable[[Any], Any], inputs: Sequence[Any], min_calls: int, min_seconds: float,
           max_calls: int, warmup: int) -> dict[str, list[float]]:  # fmt: skip
    import torch

    out: dict[str, list[float]] = {"cpu": [], "wall": []}
    with torch.inference_mode():
        for i in range(warmup):
            fn(inputs[i % len(inputs)])
        began = time.perf_counter()
        while len(out["wall"]) < max_calls and (
            len(out["wall"]) < min_calls or time.perf_counter() - began < min_seconds
        ):
            x = inputs[len(out["wall"]) % len(inputs)]
            c, t = time.thread_time(), time.perf_counter()
            fn(x)
            out["wall"].append(time.perf_counter() - t)
            out["cpu"].append(time.thread_time() - c)
    return out


def median_seconds(fn: Callable[[Any], Any], inputs: Sequence[Any], **kwargs: Any) -> float:
    """The median of `call_seconds`."""
    return float(np.median(call_seconds(fn, inputs, **kwargs)))


def interleaved_medians(fns: dict[str, Callable[[Any], Any]], inputs: Sequence[Any],
                        rounds: int = 5, min_calls: int = 15, min_seconds: float = 0.1,
                        max_calls: int = 2000) -> dict[str, dict[str, float]]:  # fmt: skip
    """{name: {"cpu": median, "wall": median}} seconds per call of several callables timed in
    `rounds` rounds that visit them in turn (rotating who goes first)."""
    names = list(fns)
    pool: dict[str, dict[str, list[float]]] = {n: {"cpu": [], "wall": []} for n in names}
    for r in range(rounds):
        for k in range(len(names)):
            name = names[(k + r) % len(names)]
            got = _calls(fns[name], inputs, min_calls, min_seconds, max_calls, 2)
            for clock in CLOCKS:
                pool[name][clock].extend(got[clock])
    return {n: {c: float(np.median(v[c])) for c in CLOCKS} for n, v in pool.items()}
