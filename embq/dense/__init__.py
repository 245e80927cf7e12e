"""Post-training quantization of DLRM's dense towers (bottom and top MLPs).

Methods: round-to-nearest min/max ('rtn'), LAPQ ('lapq'), BRECQ ('brecq'), multipoint
('multipoint') and SPARQ ('sparq'), behind one entry point:

    from embq.dense import quantize
    towers = quantize(model, method="brecq", w_bits=4, a_bits=8, calib=batches)

Quantized towers save without pickle (`save_quantized` / `load_quantized`, or `to_tensors` /
`from_tensors` for the artifact).
"""

from embq.dense.api import METHODS, quantize
from embq.dense.calibration import CalibrationCache, DenseQuantConfig
from embq.dense.fakequant import QuantizedDLRMTowers
from embq.dense.serialize import from_tensors, load_quantized, save_quantized, to_tensors

__all__ = [
    "METHODS",
    "CalibrationCache",
    "DenseQuantConfig",
    "QuantizedDLRMTowers",
    "from_tensors",
    "load_quantized",
    "quantize",
    "save_quantized",
    "to_tensors",
]
