"""Round-to-nearest with min/max ranges: the baseline every other method is compared with.

Weights: min/max of each row (or of the tensor); activations: min/max of each layer's input over
the calibration rows of the fp32 model; codes by rounding to nearest.
"""

from __future__ import annotations

from embq.dense.core.calibration import (
    CalibrationCache,
    DenseQuantConfig,
    attach_quantizers,
    calibrate_minmax,
)
from embq.dense.core.fakequant import QuantizedDLRMTowers


def run_rtn(
    towers: QuantizedDLRMTowers,
    cache: CalibrationCache,
    config: DenseQuantConfig,
    act_observer: str = "minmax",
) -> dict:
    """Min/max ranges and round-to-nearest codes for every layer."""
    attach_quantizers(towers, cache, config)
    calibrate_minmax(towers, cache, act_observer)
    towers.freeze()
    return {"act_observer": act_observer}
