"""LAPQ: the objective is the model's loss with the chosen clips applied; the Lp sweep, Powell and
the choice on held-back calibration rows never end worse than where they started."""

import numpy as np
import pytest
import torch

from embq.dense.core.calibration import (
    CalibrationCache,
    DenseQuantConfig,
    attach_quantizers,
    layer_inputs,
    quant_disabled,
)
from embq.dense.core.fakequant import QuantizedDLRMTowers
from embq.dense.core.observers import minmax_range
from embq.dense.methods.lapq import ClipVariable, LapqObjective, run_lapq, selection_split
from embq.errors import ConfigError
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


def numpy_kl(logits: np.ndarray, p_ref: np.ndarray) -> float:
    """Mean KL(p_ref || sigmoid(logits)) of Bernoulli click probabilities, in float64."""
    q = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    p = p_ref.astype(np.float64)
    return float(np.mean(p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))))


def end_to_end_logits(towers, batches) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([towers(b.dense, b.sparse).reshape(-1) for b in batches]).numpy()


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
    # the distillation variant: KL divergence from the fp32 model's probabilities
    with quant_disabled(towers), torch.no_grad():
        p_fp = torch.cat(
            [torch.sigmoid(model(b.dense, b.sparse).reshape(-1)) for b in calib]
        ).numpy()
    soft = LapqObjective(towers, cache, variables, torch.from_numpy(p_fp).double())
    assert soft(theta) == pytest.approx(numpy_kl(z, p_fp), abs=1e-7)
    assert soft(theta) > 0
    with quant_disabled(towers):
        assert soft.loss() == pytest.approx(0.0, abs=1e-9)  # the fp32 towers: no divergence


def test_clip_multipliers_never_widen_past_min_max(toy):
    model, _, cache = toy
    towers = QuantizedDLRMTowers.from_model(model)
    attach_quantizers(towers, cache, DenseQuantConfig(w_bits=4, a_bits=8))
    layer = towers.layer("top.0")
    lo, hi = minmax_range(layer.weight, True)
    var = ClipVariable("top.0.w", layer.wq, lo * 0.5, hi * 0.5, lo, hi)
    assert torch.allclose(var.cap_ratio(), torch.full((lo.numel(),), 2.0))
    var.apply(3.0)  # capped at 2: the min/max range itself
    want = layer.wq.scale.clone()
    layer.wq.set_range(lo, hi)
    assert torch.equal(want, layer.wq.scale)
    var.apply(1.5)  # inside the cap: 1.5 x the start
    want = layer.wq.scale.clone()
    layer.wq.set_range(lo * 0.75, hi * 0.75)
    assert torch.equal(want, layer.wq.scale)


def test_run_lapq_record_and_final_state(toy):
    model, calib, cache = toy
    towers = QuantizedDLRMTowers.from_model(model)
    rec = run_lapq(towers, cache, DenseQuantConfig(w_bits=4, a_bits=4), maxiter=1, max_evals=80)
    assert rec["objective"] == "kl_to_fp32"
    ps, sweep = np.array(rec["ps"]), np.array(rec["p_sweep"])
    assert len(ps) == 10 and ps[0] == 2.0 and ps[-1] == 4.0
    a, b, _ = np.polyfit(ps, sweep, 2)
    if rec["p_fit"] == "quadratic":
        assert a > 0 and rec["p_star"] == pytest.approx(
            float(np.clip(-b / (2 * a), 2, 4)), abs=1e-3
        )
    else:
        assert rec["p_star"] == pytest.approx(float(ps[np.argmin(sweep)]))
    fit, sel = rec["fit_loss"], rec["select_loss"]
    assert rec["select_rows"] == 512 and rec["fit_rows"] == 1536
    # Powell starts at the better initialisation and never ends worse than its start ...
    assert fit["start"] == min(fit["minmax"], fit["lp_init"])
    assert fit["powell"] <= fit["start"]
    # ... and the result is never worse, on the held-back calibration rows, than min/max
    # (round-to-nearest's clipping); it is the best candidate there unless that one beats
    # min/max by no more than one paired standard error
    assert sel[rec["best"]] == min(sel.values())
    assert sel[rec["chosen"]] <= sel["minmax"]
    gain = sel["minmax"] - sel[rec["best"]]
    assert rec["chosen"] == (rec["best"] if gain > rec["select_gain_se"] else "minmax")
    assert len(rec["multipliers"]) == len(rec["variables"]) == 10
    assert all(0.05 <= m for m in rec["multipliers"])
    # the frozen towers are the chosen model: its KL from fp32 on the selection rows, recomputed
    # end to end from the KeyedJaggedTensors in float64
    _, sel_idx = selection_split(len(cache), 0.25, 0)
    z = end_to_end_logits(towers, calib)[sel_idx.numpy()]
    with quant_disabled(towers):
        p_fp = 1 / (1 + np.exp(-end_to_end_logits(towers, calib)[sel_idx.numpy()].astype(np.float64)))
    assert numpy_kl(z, p_fp) == pytest.approx(sel[rec["chosen"]], rel=1e-5, abs=1e-9)


def test_lapq_labels_objective_and_no_selection_split(toy):
    model, calib, cache = toy
    towers = QuantizedDLRMTowers.from_model(model)
    rec = run_lapq(towers, cache, DenseQuantConfig(w_bits=4, a_bits=8), ps=(2.0, 3.0, 4.0),
                   maxiter=1, max_evals=40, target="labels", select_fraction=0.0)  # fmt: skip
    assert rec["objective"] == "bce_labels" and rec["select_rows"] == 0
    assert rec["fit_rows"] == len(cache)
    chosen = rec["select_loss"][rec["chosen"]]
    assert chosen <= rec["select_loss"]["minmax"] + 1e-12  # chosen on the rows Powell ran on
    y = torch.cat([b.labels for b in calib]).numpy()
    assert numpy_bce(end_to_end_logits(towers, calib), y) == pytest.approx(chosen, abs=1e-6)


def test_lapq_bad_options(toy):
    model, _, cache = toy
    towers = QuantizedDLRMTowers.from_model(model)
    with pytest.raises(ConfigError, match="target"):
        run_lapq(towers, cache, DenseQuantConfig(w_bits=4, a_bits=8), target="kl")
    with pytest.raises(ConfigError, match="select_fraction"):
        run_lapq(towers, cache, DenseQuantConfig(w_bits=4, a_bits=8), select_fraction=1.0)
    with pytest.raises(ConfigError, match="widen"):
        run_lapq(towers, cache, DenseQuantConfig(w_bits=4, a_bits=8), widen=0.5)


def test_unresolved_gain_keeps_round_to_nearest(toy):
    """With a margin no gain can clear, LAPQ returns exactly round-to-nearest's towers."""
    from embq.dense.methods.rtn import run_rtn

    model, _, cache = toy
    lapq = QuantizedDLRMTowers.from_model(model)
    rec = run_lapq(lapq, cache, DenseQuantConfig(w_bits=4, a_bits=4), ps=(2.0, 3.0, 4.0), maxiter=1,
                   max_evals=30, select_margin=1e9)  # fmt: skip
    assert rec["chosen"] == "minmax"
    rtn = QuantizedDLRMTowers.from_model(model)
    run_rtn(rtn, cache, DenseQuantConfig(w_bits=4, a_bits=4))
    for a, b in zip(lapq.layers(), rtn.layers()):
        assert torch.equal(a.wq.scale, b.wq.scale) and torch.equal(a.codes, b.codes)
        assert torch.equal(a.aq.scale, b.aq.scale)


def test_selection_split_is_disjoint_and_seeded():
    fit, sel = selection_split(1000, 0.25, 7)
    assert len(sel) == 250 and len(fit) == 750
    assert set(fit.tolist()).isdisjoint(sel.tolist())
    assert sorted(fit.tolist() + sel.tolist()) == list(range(1000))
    assert torch.equal(sel, selection_split(1000, 0.25, 7)[1])
    assert not torch.equal(sel, selection_split(1000, 0.25, 8)[1])
    every = torch.arange(3)
    assert all(torch.equal(t, every) for t in selection_split(3, 0.1, 0))  # too few to split
