"""Multipoint: greedy points on the residual, adaptive allocation, execution as extra channels."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embq.dense.core.calibration import CalibrationCache, DenseQuantConfig
from embq.dense.core.fakequant import QuantizedDLRMTowers, QuantLinear
from embq.dense.methods.multipoint import (
    MultipointLinear,
    best_point,
    multipoint_layer,
    run_multipoint,
)
from tests.toy import toy_dlrm


def brute_force_point(r: np.ndarray, bits: int) -> float:
    """min over a fine grid of a of ||r - a clamp(round(r / a))||^2 (float64)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    best = np.inf
    for a in np.linspace(1e-3, 1.2, 6000) * np.abs(r).max() / qmax:
        q = np.clip(np.round(r / a), qmin, qmax)
        best = min(best, float(((r - a * q) ** 2).sum()))
    return best


@pytest.mark.parametrize("bits", [2, 4])
def test_best_point_is_near_optimal_and_on_grid(bits):
    rng = np.random.default_rng(bits)
    r = rng.normal(0, 1, (5, 40))
    a, q = best_point(torch.tensor(r, dtype=torch.float32), bits)
    assert q.min() >= -(2 ** (bits - 1)) and q.max() <= 2 ** (bits - 1) - 1
    assert torch.equal(q, q.round())
    for i in range(5):
        err = float(((r[i] - a[i].item() * q[i].double().numpy()) ** 2).sum())
        assert err <= brute_force_point(r[i], bits) * 1.001 + 1e-9


def test_greedy_points_shrink_the_residual():
    rng = np.random.default_rng(1)
    w = torch.tensor(rng.normal(0, 1, (3, 64)), dtype=torch.float32)
    r = w.clone()
    errs = []
    for _ in range(4):
        a, q = best_point(r, 4)
        r = r - a[:, None] * q
        errs.append(float(r.pow(2).sum()))
    assert all(e2 < e1 * 0.5 for e1, e2 in itertools.pairwise(errs))  # roughly 2^-(b-1) per point


def test_extra_points_go_to_the_largest_output_error():
    rng = np.random.default_rng(2)
    w = torch.tensor(rng.normal(0, 1, (6, 16)), dtype=torch.float32)
    x = torch.tensor(rng.normal(0, 1, (5000, 16)), dtype=torch.float32)
    x[:, 3] *= 20  # input 3 dominates the output error ...
    w[4, 3] = 2.7  # ... and channel 4 has an awkward weight on it
    gram = x.T @ x / len(x)
    _, _, channel, stats = multipoint_layer(w, 2, gram, extra=1, criterion="weight")
    # plain error of each channel, computed independently
    a, q = best_point(w, 2)
    e = w - a[:, None] * q
    out_err = ((e.double() @ gram.double()) * e.double()).sum(1)
    assert channel.tolist()[-1] == int(out_err.argmax())
    assert stats["points"] == 7 and stats["extra_points"] == 1
    assert stats["output_mse"] < stats["output_mse_plain"]


def test_multipoint_linear_executes_points_as_extra_channels():
    rng = np.random.default_rng(3)
    base = QuantLinear(
        torch.tensor(rng.normal(0, 1, (4, 8)), dtype=torch.float32),
        torch.tensor(rng.normal(0, 1, 4), dtype=torch.float32),
        relu=True,
        name="l",
    )
    gram = torch.eye(8)
    codes, scales, channel, _ = multipoint_layer(base.weight, 4, gram, extra=3)
    layer = MultipointLinear(base, 4, codes, scales, channel)
    x = torch.tensor(rng.normal(0, 1, (10, 8)), dtype=torch.float32)
    y = layer(x)
    # float64 by hand: y_j = relu(sum over j's points a_i (q_i . x) + b_j)
    xd, qd, ad = x.double().numpy(), codes.double().numpy(), scales.double().numpy()
    ref = np.zeros((10, 4)) + base.bias.double().numpy()
    for i, j in enumerate(channel.tolist()):
        ref[:, j] += ad[i] * (xd @ qd[i])
    np.testing.assert_allclose(y.double().numpy(), np.maximum(ref, 0), rtol=1e-5, atol=1e-5)
    assert torch.allclose(y, torch.relu(F.linear(x, layer.qweight(), base.bias)), atol=1e-5)
    assert layer.points == 7


@pytest.fixture(scope="module")
def toy():
    model, batches = toy_dlrm()
    return model, CalibrationCache.from_batches(model, batches, rows=2048)


def test_run_multipoint_budget_and_overhead(toy):
    model, cache = toy
    towers = QuantizedDLRMTowers.from_model(model)
    rec = run_multipoint(towers, cache, DenseQuantConfig(w_bits=4, a_bits=8), extra_points=0.1)
    total_extra = 0
    for row in rec["layers"]:
        layer = towers.layer(row["layer"])
        assert isinstance(layer, MultipointLinear)
        budget = int(0.1 * row["channels"]) if row["bits"] < 8 else 0
        assert row["extra_points"] <= budget
        assert layer.points == row["channels"] + row["extra_points"]
        half = 2 ** (layer.bits - 1)
        assert layer.point_codes.min() >= -half and layer.point_codes.max() <= half - 1
        total_extra += row["extra_points"] * layer.in_features
    assert rec["overhead"]["extra_macs"] == total_extra
    assert rec["overhead"]["extra_point_share"] <= 0.1
    plain = QuantizedDLRMTowers.from_model(model)
    run_multipoint(plain, cache, DenseQuantConfig(w_bits=4, a_bits=8), extra_points=0.0)
    for a, b in zip(towers.layers(), plain.layers()):
        assert a.points >= b.points == b.out_features
