"""The compiled (numba) kernels, loaded on first use, or None where they cannot run.

numba takes ~0.3 s to import and compiles each kernel once (cached in `__pycache__`), so the
kernels load lazily. Where numba is missing or broken, or EMBQ_NO_NUMBA=1, every caller runs its
numpy path instead: the numpy paths are the references the kernels are tested against and give
the same bits.
"""

from __future__ import annotations

import os
import threading
from types import ModuleType
from typing import NamedTuple


class Kernels(NamedTuple):
    """The kernel modules: GREEDY, encoder and helpers; the better search; the min/max encoder;
    the cb4-shared encoder."""

    greedy: ModuleType
    opt: ModuleType
    minmax: ModuleType
    codebook: ModuleType


_LOADED: list = []  # [Kernels or None], filled on first use
_LOCK = threading.Lock()


def compiled_kernels() -> Kernels | None:
    """The compiled kernel modules, or None where numba is unavailable or disabled with
    EMBQ_NO_NUMBA=1."""
    if not _LOADED:
        with _LOCK:
            if not _LOADED:
                found = None
                if os.environ.get("EMBQ_NO_NUMBA", "") in ("", "0"):
                    try:
                        from embq.embedding import (
                            kernels_codebook,
                            kernels_greedy,
                            kernels_minmax,
                            kernels_opt,
                        )

                        found = Kernels(kernels_greedy, kernels_opt, kernels_minmax, kernels_codebook)
                    except ImportError:  # numba missing or broken: the numpy paths are exact too
                        found = None
                _LOADED.append(found)
    return _LOADED[0]


def kernel_engine() -> str:
    """"numba" where the compiled kernels run, else "numpy"."""
    return "numpy" if compiled_kernels() is None else "numba"
