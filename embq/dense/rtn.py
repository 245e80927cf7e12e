"""Round-to-nearest with min/max ranges: the baseline every other method is compared with.

Weights: min/max of each row (or of the tensor); activations: min/max of each layer's input over
the calibration rows of the fp32 model; codes by rounding to nearest.
"""

from __future__ import annotations

import torch

from embq.dense.calibration import (
    CalibrationCache,
    DenseQuantConfig,
    attach_quantizers,
    layer_inputs,
    quant_disabled,
)
from embq.dense.fakequant import QuantizedDLRMTowers
from embq.dense.observers import max_mean_range, minmax_range, percentile_range
from embq.errors import ConfigError


def act_range(x: torch.Tensor, observer: str = "minmax", percentile: float = 99.99):
    """(lo, hi) of an activation tensor by the named observer."""
    if observer == "minmax":
        return minmax_range(x)
    if observer == "percentile":
        return percentile_range(x, percentile)
    if observer == "max_mean":
        return max_mean_range(x)
    raise ConfigError(
        f"Unknown activation observer {observer!r}; use 'minmax', 'percentile' or 'max_mean'."
    )


@torch.no_grad()
def calibrate_minmax(
    towers: QuantizedDLRMTowers,
    cache: CalibrationCache,
    act_observer: str = "minmax",
    weights: bool = True,
    acts: bool = True,
) -> dict[str, torch.Tensor]:
    """Set min/max ranges on every quantizer; returns the fp32 layer inputs it observed."""
    with quant_disabled(towers):
        inputs = layer_inputs(towers, cache)
    for layer in towers.layers():
        if weights and layer.wq is not None:
            layer.wq.set_range(*minmax_range(layer.weight, layer.wq.spec.per_channel))
        if acts and layer.aq is not None:
            layer.aq.set_range(*act_range(inputs[layer.name], act_observer))
    return inputs


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
