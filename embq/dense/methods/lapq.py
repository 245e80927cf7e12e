"""LAPQ: Loss Aware Post-training Quantization (Nahshan et al., 2019/2021), for DLRM's towers.

1. Lp initialisation. For every p in linspace(2, 4, 10), every quantized tensor (weights, and
   each Linear's input over the calibration rows of the fp32 model) gets the clipping range
   minimising mean |Q(x) - x|^p; the calibration loss L(p) of the whole quantized model is
   recorded, a quadratic a p^2 + b p + c is fitted, and the ranges at p* = -b / 2a (clamped
   to [2, 4]; the best sampled p when the fit is not convex) start the search.
2. Powell's method (scipy) jointly over all clipping values, minimising the calibration BCE
   (`LapqObjective`: mean BCE-with-logits of the quantized towers on the cached calibration
   rows; BCE replaces the reference's cross-entropy because DLRM has one sigmoid logit).

The search variable of tensor l is a multiplier m_l of its Lp-optimal range: the clip is
m_l * [lo_l, hi_l] (for a symmetric per-tensor grid that is m_l * alpha_l, the reference's alpha
rescaled to start at 1). With per-channel weights (our option; the reference is per-tensor) one
multiplier scales all of a layer's per-channel ranges, so the dimension stays two per layer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize

from embq.dense.core.calibration import (
    CalibrationCache,
    DenseQuantConfig,
    attach_quantizers,
    bce,
    layer_inputs,
    logits,
    quant_disabled,
)
from embq.dense.core.fakequant import QuantizedDLRMTowers
from embq.dense.core.observers import lp_ranges, minmax_range, subsample
from embq.errors import ConfigError

DEFAULT_PS = tuple(float(p) for p in np.linspace(2.0, 4.0, 10))


@dataclass
class ClipVariable:
    """One clipping value of the search: the range of one quantizer, as lo/hi per channel."""

    name: str  # "<layer>.w" or "<layer>.a"
    quantizer: torch.nn.Module
    lo: torch.Tensor
    hi: torch.Tensor

    def apply(self, multiplier: float) -> None:
        self.quantizer.set_range(self.lo * multiplier, self.hi * multiplier)


class LapqObjective:
    """L(theta): mean calibration BCE of the towers with clip multipliers `theta` applied.

    The BCE is against the calibration labels (`targets=None`, the reference's task loss) or
    against given soft targets (the fp32 model's click probabilities: a distillation loss)."""

    def __init__(
        self,
        towers: QuantizedDLRMTowers,
        cache: CalibrationCache,
        variables: list[ClipVariable],
        targets: torch.Tensor | None = None,
    ) -> None:
        self.towers = towers
        self.cache = cache
        self.variables = variables
        self.targets = targets
        self.evaluations = 0

    def apply(self, theta) -> None:
        for var, m in zip(self.variables, np.asarray(theta, dtype=np.float64).reshape(-1)):
            var.apply(float(m))

    def __call__(self, theta) -> float:
        self.apply(theta)
        self.evaluations += 1
        if self.targets is None:
            return bce(self.towers, self.cache)
        z = logits(self.towers, self.cache).double()
        return float(torch.nn.functional.binary_cross_entropy_with_logits(z, self.targets))


def _variables(
    towers: QuantizedDLRMTowers, ranges: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> list[ClipVariable]:
    out = []
    for layer in towers.layers():
        for kind, q in (("w", layer.wq), ("a", layer.aq)):
            key = f"{layer.name}.{kind}"
            if q is not None and key in ranges:
                out.append(ClipVariable(key, q, *ranges[key]))
    return out


def _lp_tables(
    towers: QuantizedDLRMTowers, inputs: dict[str, torch.Tensor], ps: list[float], max_values: int
) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """For every quantizer, its Lp-optimal range for each p."""
    out = {}
    for layer in towers.layers():
        if layer.wq is not None:
            out[f"{layer.name}.w"] = lp_ranges(layer.weight, layer.wq.spec, ps)
        if layer.aq is not None:
            x = subsample(inputs[layer.name], max_values)
            out[f"{layer.name}.a"] = lp_ranges(
                x, layer.aq.spec, ps, base=minmax_range(inputs[layer.name])
            )
    return out


def run_lapq(
    towers: QuantizedDLRMTowers,
    cache: CalibrationCache,
    config: DenseQuantConfig,
    ps: tuple[float, ...] = DEFAULT_PS,
    maxiter: int = 2,
    max_evals: int = 3000,
    bounds: tuple[float, float] = (0.05, 4.0),
    lp_values: int = 1 << 17,
    target: str = "labels",
) -> dict:
    """LAPQ on the towers; returns the search record.

    Args:
        ps: the p values of the Lp sweep (reference: 10 values in [2, 4]).
        maxiter: Powell iterations (reference: 2 for ResNet-18, 1 for larger nets).
        max_evals: cap on objective evaluations (each one calibration forward pass).
        bounds: allowed range of each clip multiplier.
        lp_values: activation values subsampled for the Lp statistics.
        target: 'labels' (BCE with the calibration labels, as the reference) or 'fp32' (BCE
            against the fp32 model's probabilities).
    """
    if target not in ("labels", "fp32"):
        raise ConfigError(f"LAPQ target must be 'labels' or 'fp32', got {target!r}.")
    attach_quantizers(towers, cache, config)
    with quant_disabled(towers):
        inputs = layer_inputs(towers, cache)
        soft = torch.sigmoid(logits(towers, cache).double()) if target == "fp32" else None
    started = time.perf_counter()
    tables = _lp_tables(towers, inputs, list(ps), lp_values)
    keys = list(tables)

    # min/max reference point
    minmax = {}
    for layer in towers.layers():
        if layer.wq is not None:
            minmax[f"{layer.name}.w"] = minmax_range(layer.weight, layer.wq.spec.per_channel)
        if layer.aq is not None:
            minmax[f"{layer.name}.a"] = minmax_range(inputs[layer.name])
    mm_obj = LapqObjective(towers, cache, _variables(towers, minmax), soft)
    loss_minmax = mm_obj(np.ones(len(mm_obj.variables)))

    # 1. the p sweep and the quadratic fit
    sweep = []
    for j in range(len(ps)):
        obj = LapqObjective(
            towers, cache, _variables(towers, {k: tables[k][j] for k in keys}), soft
        )
        sweep.append(obj(np.ones(len(obj.variables))))
    sweep_arr = np.asarray(sweep)
    a, b, _ = np.polyfit(np.asarray(ps), sweep_arr, 2)
    if a > 0:
        p_star = float(np.clip(-b / (2 * a), min(ps), max(ps)))
        fit = "quadratic"
    else:
        p_star = float(ps[int(np.argmin(sweep_arr))])
        fit = "best-sampled (fit not convex)"
    init = {}
    for layer in towers.layers():
        if layer.wq is not None:
            init[f"{layer.name}.w"] = lp_ranges(layer.weight, layer.wq.spec, [p_star])[0]
        if layer.aq is not None:
            x = subsample(inputs[layer.name], lp_values)
            init[f"{layer.name}.a"] = lp_ranges(
                x, layer.aq.spec, [p_star], base=minmax_range(inputs[layer.name])
            )[0]
    objective = LapqObjective(towers, cache, _variables(towers, init), soft)
    n = len(objective.variables)
    x0 = np.ones(n)
    loss_init = objective(x0)

    # 2. Powell over all clipping values jointly
    result = minimize(
        objective,
        x0,
        method="Powell",
        bounds=[bounds] * n,
        options={"maxiter": maxiter, "maxfev": max_evals, "xtol": 1e-3, "ftol": 1e-7},
    )
    theta = np.asarray(result.x, dtype=np.float64)
    loss_final = objective(theta)
    if loss_final > loss_init:  # Powell never returns worse than its start, but be explicit
        theta, loss_final = x0, objective(x0)
    objective.apply(theta)
    towers.freeze()
    return {
        "target": target,
        "ps": [round(p, 4) for p in ps],
        "p_sweep_bce": [round(v, 6) for v in sweep],
        "p_star": round(p_star, 4),
        "p_fit": fit,
        "variables": [v.name for v in objective.variables],
        "multipliers": [round(float(m), 4) for m in theta],
        "bce_minmax": round(loss_minmax, 6),
        "bce_lp_init": round(loss_init, 6),
        "bce_powell": round(loss_final, 6),
        "powell_evaluations": objective.evaluations,
        "powell_iterations": int(getattr(result, "nit", 0)),
        "search_seconds": round(time.perf_counter() - started, 2),
    }
