"""Post-training quantization of DLRM's dense towers (bottom and top MLPs).

Methods: round-to-nearest min/max ('rtn'), LAPQ ('lapq'), BRECQ ('brecq'), multipoint
('multipoint') and SPARQ ('sparq'), behind one entry point:

    from embq.dense import quantize
    towers = quantize(model, method="brecq", w_bits=4, a_bits=8, calib=batches)

Layout: `core/` holds what every method shares (quantizers and observers, the fake-quantized
towers, calibration), `methods/` one module per method, `configs` the typed method configs,
`serialize` the pickle-free storage (`save_quantized` / `load_quantized`, `to_tensors` /
`from_tensors` for the artifact). Importing this package is cheap: torch loads with the first
name used from it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "METHODS": "embq.dense.api",
    "quantize": "embq.dense.api",
    "CalibrationCache": "embq.dense.core.calibration",
    "DenseQuantConfig": "embq.dense.core.calibration",
    "QuantizedDLRMTowers": "embq.dense.core.fakequant",
    "from_tensors": "embq.dense.serialize",
    "load_quantized": "embq.dense.serialize",
    "save_quantized": "embq.dense.serialize",
    "to_tensors": "embq.dense.serialize",
    "DenseConfig": "embq.dense.configs",
    "parse_dense": "embq.dense.configs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'embq.dense' has no attribute {name!r}")
