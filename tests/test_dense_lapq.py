"""LAPQ: the objective is the model's BCE with the chosen clips applied; the Lp sweep and Powell."""

import numpy as np
import pytest
import torch

from embq.dense.core.calibration import (
    CalibrationCache,
    DenseQuantConfig,
    attach_quantizers,
    bce,
    layer_inputs,
    quant_disabled,
)
from embq.dense.core.fakequant import QuantizedDLRMTowers
from embq.dense.core.observers import minmax_range
from embq.dense.methods.lapq import ClipVariable, LapqObjective, run_lapq
from tests.toy import toy_dlrm


@pytest.fixture(scope="module")
def toy():
    model, batches = toy_dlrm()
    calib = batches[:4]  # 2048 rows
    return model, calib, CalibrationCache.from_batches(model, calib)


def numpy_bce(logits: np.ndarray, labels: np.ndarray) -> float:
    z = logits.astype(np.float64)
    y = labels.astype(np.float64)
    p = 1.0 / (1.0 + np.exp(-z))
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def test_objective_equals_model_bce_with_clips_applied(toy):
    model, calib, cache = toy
    towers = QuantizedDLRMTowers.from_model(model)
    attach_quantizers(towers, cache, DenseQuantConfig(w_bits=4, a_bits=4))
    with quant_disabled(towers):
        inputs = layer_inputs(towers, cache)
    variables = []
    for layer in towers.layers():
        variables.append(
            ClipVariable(f"{layer.name}.w", layer.wq, *minmax_range(layer.weight, True))
        )
        variables.append(
            ClipVariable(f"{layer.name}.a", layer.aq, *minmax_range(inputs[layer.name]))
        )
    objective = LapqObjective(towers, cache, variables)
    theta = np.random.default_rng(0).uniform(0.4, 1.2, len(variables))
    value = objective(theta)

    # the clips are applied: every quantizer's scale is the float64 grid of m * [lo, hi]
    for var, m in zip(variables, theta):
        spec = var.quantizer.spec
        lo = var.lo.double().numpy() * m
        hi = var.hi.double().numpy() * m
        if spec.kind == "symmetric":
            ref = np.maximum(np.abs(lo), np.abs(hi)) / spec.qmax
        elif spec.kind == "unsigned":
            ref = np.maximum(hi, 0) / spec.qmax
        else:
            ref = (np.maximum(hi, 0) - np.minimum(lo, 0)) / spec.qmax
        np.testing.assert_allclose(
            var.quantizer.scale.double().numpy().reshape(-1), ref.reshape(-1), rtol=1e-6
        )

    # ... and the objective is the BCE of the model run end to end (embedding lookup from the
    # KeyedJaggedTensors, quantized towers) on the calibration rows
    with torch.no_grad():
        z = torch.cat([towers(b.dense, b.sparse).reshape(-1) for b in calib]).numpy()
    y = torch.cat([b.labels for b in calib]).numpy()
    assert value == pytest.approx(numpy_bce(z, y), abs=1e-6)
    assert objective.evaluations == 1
    # a different theta gives a different loss (the clips matter)
    assert objective(theta * 0.5) != pytest.approx(value, abs=1e-6)
    # the distillation variant: BCE against the fp32 model's probabilities
    with quant_disabled(towers), torch.no_grad():
        p_fp = torch.cat(
            [torch.sigmoid(model(b.dense, b.sparse).reshape(-1)) for b in calib]
        ).numpy()
    soft = LapqObjective(towers, cache, variables, torch.from_numpy(p_fp).double())
    assert soft(theta) == pytest.approx(numpy_bce(z, p_fp), abs=1e-6)


def test_run_lapq_record_and_final_state(toy):
    model, _, cache = toy
    towers = QuantizedDLRMTowers.from_model(model)
    rec = run_lapq(towers, cache, DenseQuantConfig(w_bits=4, a_bits=4), maxiter=1, max_evals=80)
    ps, sweep = np.array(rec["ps"]), np.array(rec["p_sweep_bce"])
    assert len(ps) == 10 and ps[0] == 2.0 and ps[-1] == 4.0
    a, b, _ = np.polyfit(ps, sweep, 2)
    if rec["p_fit"] == "quadratic":
        assert a > 0 and rec["p_star"] == pytest.approx(
            float(np.clip(-b / (2 * a), 2, 4)), abs=1e-3
        )
    else:
        assert rec["p_star"] == pytest.approx(float(ps[np.argmin(sweep)]))
    # Powell starts at the Lp initialisation and never ends worse
    assert rec["bce_powell"] <= rec["bce_lp_init"] + 1e-9
    # the frozen towers are the model the objective scored last
    assert bce(towers, cache) == pytest.approx(rec["bce_powell"], abs=2e-6)
    assert len(rec["multipliers"]) == len(rec["variables"]) == 10
    assert all(0.05 <= m <= 4.0 for m in rec["multipliers"])
