"""Timing callables the way the probe and the planner's verification both do: warm-up calls,
then many calls, the median; several callables in interleaved rounds, so that load from other
processes on a shared machine falls on all of them alike."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def call_seconds(fn: Callable[[Any], Any], inputs: Sequence[Any], min_calls: int = 15,
                 min_seconds: float = 0.1, max_calls: int = 2000, warmup: int = 2) -> list[float]:  # fmt: skip
    """Seconds of each of at least `min_calls` calls of fn(input), cycling over `inputs`, for
    at least `min_seconds` (after `warmup` untimed calls); under torch.inference_mode."""
    import torch

    out: list[float] = []
    with torch.inference_mode():
        for i in range(warmup):
            fn(inputs[i % len(inputs)])
        began = time.perf_counter()
        while len(out) < max_calls and (
            len(out) < min_calls or time.perf_counter() - began < min_seconds
        ):
            x = inputs[len(out) % len(inputs)]
            t = time.perf_counter()
            fn(x)
            out.append(time.perf_counter() - t)
    return out


def median_seconds(fn: Callable[[Any], Any], inputs: Sequence[Any], **kwargs: Any) -> float:
    """The median of `call_seconds`."""
    return float(np.median(call_seconds(fn, inputs, **kwargs)))


def interleaved_medians(fns: dict[str, Callable[[Any], Any]], inputs: Sequence[Any],
                        rounds: int = 5, **kwargs: Any) -> dict[str, float]:  # fmt: skip
    """{name: median seconds per call} of several callables timed in `rounds` rounds that visit
    them in turn (rotating who goes first); each round adds its calls to the pool."""
    names = list(fns)
    pool: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for k in range(len(names)):
            name = names[(k + r) % len(names)]
            pool[name].extend(call_seconds(fns[name], inputs, **kwargs))
    return {n: float(np.median(v)) for n, v in pool.items()}
