"""float16 helpers: the fp16 range, rounding to fp16, and stepping through fp16 values.

fbgemm's row formats keep their scale and bias in fp16, so every search rounds candidates to
fp16 before it scores them. Large arrays round through torch's vectorised cast, bit-identical
to numpy's `astype(float16)` (ties, subnormals, overflow to inf included) and ~10x faster.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
F16 = np.float16
FP16_MAX = 65504.0  # the largest finite fp16 value

_SMALL = 2048  # below this many values numpy's cast beats torch's call overhead


def _torch():
    import torch  # lazy: importing the formats stays light

    return torch


def to_fp16(x: np.ndarray) -> np.ndarray:
    """float32 -> float16, round to nearest even. Large arrays go through torch's vectorised
    cast, bit-identical to numpy's `astype(float16)` (ties, subnormals, overflow to inf
    included) and ~10x faster."""
    a = np.ascontiguousarray(x, dtype=F32)
    if a.size < _SMALL:
        with np.errstate(over="ignore"):
            return a.astype(F16)
    return _torch().from_numpy(a).to(_torch().float16).numpy()


def fp16_round(x: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest fp16 (ties to even) and return them as float32."""
    a = np.ascontiguousarray(x, dtype=F32)
    if a.size < _SMALL:
        with np.errstate(over="ignore"):
            return a.astype(F16).astype(F32)
    t = _torch()
    return t.from_numpy(a).to(t.float16).to(t.float32).numpy()



def fp16_step(v: np.ndarray, k: int) -> np.ndarray:
    """The fp16 value k steps (ulps) away from fp16 value v (float32 in, float32 out)."""
    h = v.astype(F16).view(np.int16).astype(np.int32)
    # fp16 bit patterns are monotone in value for each sign; walk in value order
    key = np.where(h < 0, -(h & 0x7FFF), h) + k
    out = np.where(key < 0, (-key) | 0x8000, key).astype(np.uint16).view(F16)
    return out.astype(F32)

