"""LAPQ: Loss Aware Post-training Quantization (Nahshan et al., 2019/2021), for DLRM's towers.

1. Lp initialisation. For every p in linspace(2, 4, 10), every quantized tensor (weights, and
   each Linear's input over the calibration rows of the fp32 model) gets the clipping range
   minimising mean |Q(x) - x|^p; the calibration loss L(p) of the whole quantized model is
   recorded, a quadratic a p^2 + b p + c is fitted, and the ranges at p* = -b / 2a (clamped
   to [2, 4]; the best sampled p when the fit is not convex) are the Lp initialisation.
2. Powell's method (scipy) jointly over all clipping values, minimising the calibration loss,
   from the better (on that loss) of the Lp initialisation and the min/max ranges.
3. Selection. The calibration rows are split: `select_fraction` of them (seeded, random) are
   held back from steps 1-2, and the result is the best, on those rows, of the min/max ranges
   (round-to-nearest's clipping), the Lp initialisation and Powell's point, unless it beats
   min/max there by no more than `select_margin` paired standard errors: then min/max stays
   (a gain the held-back rows cannot resolve is not worth leaving round-to-nearest for).

The loss (`LapqObjective`) is, by default (`target="fp32"`), the mean KL divergence from the fp32
model's click probability to the quantized model's, on the calibration rows: BCE-with-logits
against the fp32 probabilities minus their entropy. The reference minimises the task loss on
labelled rows (`target="labels"`: BCE with the calibration labels). On DLRM that is the wrong
objective: per row, BCE(z_q, y) - BCE(z_fp, y) = KL(p_fp || p_q) + (p_fp - y)(z_q - z_fp), and the
second term, zero-mean on unseen rows for a calibrated model, is label noise many times larger
than the quantization error; on calibration rows the model was trained on it is not even
zero-mean. Powell then fits the clip multipliers to that noise (on the evaluation models it
lowered the calibration BCE below fp32's while the held-out log loss rose; see scripts/
eval_dense.py, cells lapq_labels_*). The KL has no label term, so its minimum on calibration rows
is where the quantized model agrees best with the fp32 one.

The search variable of tensor l is a multiplier m_l of its starting range: the clip is
m_l * [lo_l, hi_l], capped per channel at `widen` x the tensor's min/max range (default 1: a
clip, never a wider range than the data's; the reference searches m up to 4 x its start). With
per-channel weights (our option; the reference is per-tensor) one multiplier scales all of a
layer's per-channel ranges, so the dimension stays two per layer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize

from embq.dense.core.calibration import (
    CalibrationCache,
    DenseQuantConfig,
    attach_quantizers,
    layer_inputs,
    logits,
    quant_disabled,
)
from embq.dense.core.fakequant import QuantizedDLRMTowers
from embq.dense.core.observers import lp_ranges, minmax_range, subsample
from embq.errors import ConfigError
from embq.progress import progress_bar

DEFAULT_PS = tuple(float(p) for p in np.linspace(2.0, 4.0, 10))
Ranges = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _extent(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return torch.maximum(lo.abs(), hi.abs()).reshape(-1)


@dataclass
class ClipVariable:
    """One clipping value of the search: the range of one quantizer, as lo/hi per channel, and
    the min/max range (`cap_lo`, `cap_hi`) that no multiplier widens it beyond."""

    name: str  # "<layer>.w" or "<layer>.a"
    quantizer: torch.nn.Module
    lo: torch.Tensor
    hi: torch.Tensor
    cap_lo: torch.Tensor | None = None
    cap_hi: torch.Tensor | None = None
    widen: float = 1.0  # the clip may reach widen x the min/max range

    def cap_ratio(self) -> torch.Tensor:
        """Per channel, the largest multiplier that stays inside widen x the min/max range."""
        if self.cap_lo is None or self.cap_hi is None:
            return torch.full((self.lo.numel(),), float("inf"))
        start = _extent(self.lo, self.hi)
        return torch.where(start > 0, self.widen * _extent(self.cap_lo, self.cap_hi) / start, 1.0)

    def apply(self, multiplier: float) -> None:
        m = torch.clamp(self.cap_ratio(), max=multiplier).reshape(self.lo.shape)
        self.quantizer.set_range(self.lo * m, self.hi * m)


class LapqObjective:
    """L(theta): the towers' calibration loss with clip multipliers `theta` applied.

    `targets=None`: mean BCE-with-logits against the calibration labels (the reference's task
    loss); `targets` = the fp32 model's click probabilities: the mean KL divergence from them
    (BCE against the probabilities minus their mean entropy, so 0 means "equal to fp32")."""

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
        self.targets = None if targets is None else targets.double()
        self.entropy = 0.0
        if self.targets is not None:
            p = self.targets.clamp(1e-12, 1 - 1e-12)
            self.entropy = float(-(p * p.log() + (1 - p) * (1 - p).log()).mean())
        self.evaluations = 0
        self.best: tuple[float, np.ndarray | None] = (float("inf"), None)  # lowest loss seen

    def apply(self, theta) -> None:
        for var, m in zip(self.variables, np.asarray(theta, dtype=np.float64).reshape(-1)):
            var.apply(float(m))

    def row_losses(self) -> torch.Tensor:
        """Per calibration row, the loss of the towers as they are now (float64 [N])."""
        z = logits(self.towers, self.cache).double()
        if self.targets is None:
            return F.binary_cross_entropy_with_logits(z, self.cache.labels.double(), reduction="none")
        p = self.targets.clamp(1e-12, 1 - 1e-12)
        h = -(p * p.log() + (1 - p) * (1 - p).log())
        return F.binary_cross_entropy_with_logits(z, self.targets, reduction="none") - h

    def loss(self) -> float:
        """The loss of the towers as they are now (no clips applied)."""
        z = logits(self.towers, self.cache).double()
        if self.targets is None:
            return float(F.binary_cross_entropy_with_logits(z, self.cache.labels.double()))
        return float(F.binary_cross_entropy_with_logits(z, self.targets)) - self.entropy

    def __call__(self, theta) -> float:
        self.apply(theta)
        self.evaluations += 1
        value = self.loss()
        if value < self.best[0]:
            self.best = (value, np.asarray(theta, dtype=np.float64).copy())
        return value


def _variables(
    towers: QuantizedDLRMTowers, ranges: Ranges, caps: Ranges | None = None, widen: float = 1.0
) -> list[ClipVariable]:
    out = []
    for layer in towers.layers():
        for kind, q in (("w", layer.wq), ("a", layer.aq)):
            key = f"{layer.name}.{kind}"
            if q is not None and key in ranges:
                cap = caps.get(key) if caps is not None else None
                out.append(ClipVariable(key, q, *ranges[key], *(cap or (None, None)), widen))
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


def _minmax_ranges(towers: QuantizedDLRMTowers, inputs: dict[str, torch.Tensor]) -> Ranges:
    """Round-to-nearest's ranges: min/max of every weight (per row if per channel) and input."""
    out = {}
    for layer in towers.layers():
        if layer.wq is not None:
            out[f"{layer.name}.w"] = minmax_range(layer.weight, layer.wq.spec.per_channel)
        if layer.aq is not None:
            out[f"{layer.name}.a"] = minmax_range(inputs[layer.name])
    return out


def selection_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit row indices, selection row indices), sorted: a seeded random `fraction` of the n rows
    for selection; all rows for both when either part would be empty."""
    n_sel = int(round(fraction * n))
    if fraction <= 0 or n_sel < 1 or n - n_sel < 1:
        every = torch.arange(n)
        return every, every
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_sel:].sort().values, perm[:n_sel].sort().values


def _rows(cache: CalibrationCache, soft: torch.Tensor | None, idx: torch.Tensor):
    part = CalibrationCache(cache.dense[idx], cache.emb[idx], cache.labels[idx])
    return part, (None if soft is None else soft[idx])


def run_lapq(
    towers: QuantizedDLRMTowers,
    cache: CalibrationCache,
    config: DenseQuantConfig,
    ps: tuple[float, ...] = DEFAULT_PS,
    maxiter: int = 2,
    max_evals: int = 3000,
    min_multiplier: float = 0.05,
    lp_values: int = 1 << 17,
    target: str = "fp32",
    select_fraction: float = 0.25,
    select_margin: float = 1.0,
    widen: float = 1.0,
    seed: int = 0,
) -> dict:
    """LAPQ on the towers; returns the search record.

    Args:
        ps: the p values of the Lp sweep (reference: 10 values in [2, 4]).
        maxiter: Powell iterations (reference: 2 for ResNet-18, 1 for larger nets).
        max_evals: cap on objective evaluations (each one forward pass over the fit rows).
        min_multiplier: lower bound of each clip multiplier (the upper bound is the min/max range).
        lp_values: activation values subsampled for the Lp statistics.
        target: 'fp32' (default: KL divergence from the fp32 model's probabilities) or 'labels'
            (BCE with the calibration labels, the reference's task loss).
        select_fraction: share of the calibration rows held back from the sweep and Powell to
            choose between min/max, the Lp initialisation and Powell's result (0: choose on the
            same rows).
        select_margin: paired standard errors (over the selection rows) by which a candidate
            must beat min/max to be chosen over it (0: the plain best).
        widen: cap of every clip, as a multiple of the tensor's min/max range (per channel).
        seed: seed of the fit / selection split.
    """
    if target not in ("labels", "fp32"):
        raise ConfigError(f"LAPQ target must be 'labels' or 'fp32', got {target!r}.")
    if not 0.0 <= select_fraction < 1.0:
        raise ConfigError(f"LAPQ select_fraction must be in [0, 1), got {select_fraction!r}.")
    if not widen >= 1.0 or not select_margin >= 0.0:
        raise ConfigError(f"LAPQ needs widen >= 1 and select_margin >= 0, got widen={widen!r}, "
                          f"select_margin={select_margin!r}.")  # fmt: skip
    attach_quantizers(towers, cache, config)
    with quant_disabled(towers):
        inputs = layer_inputs(towers, cache)
        soft = torch.sigmoid(logits(towers, cache).double()) if target == "fp32" else None
    fit_idx, sel_idx = selection_split(len(cache), select_fraction, seed)
    (fit, fit_soft), (sel, sel_soft) = _rows(cache, soft, fit_idx), _rows(cache, soft, sel_idx)
    started = time.perf_counter()
    minmax = _minmax_ranges(towers, inputs)
    tables = _lp_tables(towers, inputs, list(ps), lp_values)

    def loss_of(ranges: Ranges, rows: CalibrationCache, targets) -> float:
        obj = LapqObjective(towers, rows, _variables(towers, ranges), targets)
        return obj(np.ones(len(obj.variables)))

    # 1. the p sweep and the quadratic fit, on the fit rows
    sweep = [loss_of({k: v[j] for k, v in tables.items()}, fit, fit_soft)
             for j in progress_bar(range(len(ps)), desc="lapq p sweep", unit="p", leave=False)]
    sweep_arr = np.asarray(sweep)
    a, b, _ = np.polyfit(np.asarray(ps), sweep_arr, 2)
    if a > 0:
        p_star = float(np.clip(-b / (2 * a), min(ps), max(ps)))
        fit_kind = "quadratic"
    else:
        p_star = float(ps[int(np.argmin(sweep_arr))])
        fit_kind = "best-sampled (fit not convex)"
    init = {k: v[0] for k, v in _lp_tables(towers, inputs, [p_star], lp_values).items()}

    # 2. Powell over all clipping values jointly, from the better start, on the fit rows
    fit_minmax, fit_init = loss_of(minmax, fit, fit_soft), loss_of(init, fit, fit_soft)
    start_name, start = ("lp_init", init) if fit_init <= fit_minmax else ("minmax", minmax)
    objective = LapqObjective(towers, fit, _variables(towers, start, minmax, widen), fit_soft)
    n = len(objective.variables)
    x0 = np.ones(n)
    upper = np.array([max(1.0, float(v.cap_ratio().max())) for v in objective.variables])

    # scipy's bounded line search (fminbound over the whole [lower, upper] of a direction) starts
    # at golden-section points of the interval, not at the current point, and returns the minimum
    # it meets there even when that is worse than where it started: Powell then goes on from a
    # worse point. It still explores each clip's whole range, so the search runs as it is and the
    # result is the lowest point it evaluated (the start included), not its last one.
    fit_start = objective(x0)
    result = minimize(
        objective,
        x0,
        method="Powell",
        bounds=list(zip([min_multiplier] * n, upper)),
        options={"maxiter": maxiter, "maxfev": max_evals, "xtol": 1e-3, "ftol": 1e-9},
    )
    fit_powell, theta = objective.best  # the lowest point evaluated (x0 included)
    iterations = int(getattr(result, "nit", 0))

    # 3. choose on the selection rows; min/max first, so that ties keep round-to-nearest
    candidates = {"minmax": (minmax, None), "lp_init": (init, None), "powell": (start, theta)}
    rows, scores = {}, {}
    for name, (ranges, th) in candidates.items():
        obj = LapqObjective(towers, sel, _variables(towers, ranges, minmax, widen), sel_soft)
        obj.apply(np.ones(n) if th is None else th)
        rows[name] = obj.row_losses()
        scores[name] = float(rows[name].mean())
    best = min(scores, key=lambda k: scores[k])  # first of equal minima: dict order
    diff = rows[best] - rows["minmax"]
    gain_se = float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    # keep round-to-nearest's clipping unless the gain on the held-back rows is clear
    chosen = best if -float(diff.mean()) > select_margin * gain_se else "minmax"
    ranges, th = candidates[chosen]
    final = LapqObjective(towers, sel, _variables(towers, ranges, minmax, widen), sel_soft)
    final.apply(np.ones(n) if th is None else th)
    towers.freeze()
    return {
        "target": target,
        "objective": "kl_to_fp32" if target == "fp32" else "bce_labels",
        "fit_rows": len(fit),
        "select_rows": len(sel) if len(sel) < len(cache) else 0,
        "ps": [round(p, 4) for p in ps],
        "p_sweep": [round(v, 8) for v in sweep],
        "p_star": round(p_star, 4),
        "p_fit": fit_kind,
        "start": start_name,
        "variables": [v.name for v in objective.variables],
        "multipliers": [round(float(m), 4) for m in theta],
        "fit_loss": {"minmax": fit_minmax, "lp_init": fit_init, "start": fit_start,
                     "powell": fit_powell},  # fmt: skip
        "select_loss": scores,
        "select_gain_se": gain_se,
        "best": best,
        "chosen": chosen,
        "powell_evaluations": objective.evaluations,
        "powell_iterations": iterations,
        "search_seconds": round(time.perf_counter() - started, 2),
    }
