"""AdaRound / BRECQ against hand computations on a toy layer, and a short run on a toy DLRM."""

import copy
import math

import pytest
import torch

from embq.dense.core.calibration import (
    CalibrationCache,
    DenseQuantConfig,
    attach_quantizers,
    logits,
    quant_disabled,
)
from embq.dense.core.fakequant import QuantizedDLRMTowers, QuantLinear, WeightQuantizer
from embq.dense.core.quantizers import QuantSpec
from embq.dense.methods.brecq import (
    AdaRound,
    LinearTempDecay,
    adaround_loss,
    fisher_weights,
    run_brecq,
)
from tests.toy import toy_dlrm

W = [[0.26, -0.13, 0.5], [0.04, 0.31, -0.47]]
# with scale 0.1: W / s = [[2.6, -1.3, 5.0], [0.4, 3.1, -4.7]]
FLOOR = [[2, -2, 5], [0, 3, -5]]
FRAC = [[0.6, 0.7, 0.0], [0.4, 0.1, 0.3]]


@pytest.fixture()
def toy_layer():
    layer = QuantLinear(torch.tensor(W), torch.zeros(2), relu=False, name="toy")
    layer.wq = WeightQuantizer(QuantSpec(4, signed=True, symmetric=True), 2)
    layer.wq.set_range(torch.tensor(-0.7), torch.tensor(0.7))  # alpha 0.7 / 7 levels = scale 0.1
    return layer


def test_adaround_init_by_hand(toy_layer):
    assert torch.allclose(toy_layer.wq.scale, torch.full((1, 1), 0.1))
    r = AdaRound(toy_layer)
    assert r.w_floor.tolist() == [[float(v) for v in row] for row in FLOOR]
    for i in range(2):
        for j in range(3):
            f = FRAC[i][j]
            v = -math.log(1.2 / (f + 0.1) - 1.0)  # V such that h(V) = frac
            assert float(r.V.detach()[i, j]) == pytest.approx(v, abs=1e-4)
            h = 1.2 / (1.0 + math.exp(-v)) - 0.1
            assert float(r.h().detach()[i, j]) == pytest.approx(h, abs=1e-5)
            assert h == pytest.approx(f, abs=1e-5)
    # at init the soft weight is the fp32 weight (floor + frac, inside the grid)
    assert torch.allclose(r.soft_weight(), torch.tensor(W), atol=1e-6)
    # hard rounding: up where frac >= 0.5
    assert r.hard_codes().tolist() == [[3.0, -1.0, 5.0], [0.0, 3.0, -5.0]]


def test_rectified_sigmoid_clamps(toy_layer):
    r = AdaRound(toy_layer)
    with torch.no_grad():
        r.V.fill_(10.0)
    assert torch.all(r.h() == 1.0)  # 1.2 * sigmoid(10) - 0.1 > 1 -> clamped
    with torch.no_grad():
        r.V.fill_(-10.0)
    assert torch.all(r.h() == 0.0)


@pytest.mark.parametrize("beta", [2.0, 11.0, 20.0])
def test_round_loss_by_hand(toy_layer, beta):
    r = AdaRound(toy_layer)
    expected = sum(1.0 - abs(2 * f - 1) ** beta for row in FRAC for f in row)
    assert float(r.round_loss(beta).detach()) == pytest.approx(expected, abs=1e-4)


def test_temperature_schedule_by_hand():
    d = LinearTempDecay(100, rel_start=0.2, start_b=20, end_b=2)
    assert d(0) == 20 and d(19) == 20 and d(20) == 20
    assert d(60) == pytest.approx(2 + 18 * (1 - 40 / 80))  # 11
    assert d(80) == pytest.approx(2 + 18 * (1 - 60 / 80))  # 6.5
    assert d(100) == pytest.approx(2)


def test_adaround_loss_by_hand(toy_layer):
    r = AdaRound(toy_layer)
    out = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    target = torch.tensor([[0.5, 2.0], [0.0, 0.0]])
    fisher = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    decay = LinearTempDecay(100, 0.2, 20, 2)
    # rows: 2 * 0.25 + 0 = 0.5 and 0 + 3 * 1 = 3 -> mean 1.75; divided by rec_scale 0.5 -> 3.5
    total, rec, beta = adaround_loss(
        out,
        target,
        fisher,
        [r],
        t=10,
        iters=100,
        weight=0.01,
        warmup=0.2,
        decay=decay,
        rec_scale=0.5,
    )
    assert (
        float(rec.detach()) == pytest.approx(3.5)
        and float(total.detach()) == pytest.approx(3.5)
        and beta == 20
    )
    total, rec, beta = adaround_loss(
        out,
        target,
        fisher,
        [r],
        t=60,
        iters=100,
        weight=0.01,
        warmup=0.2,
        decay=decay,
        rec_scale=0.5,
    )
    # the regulariser is averaged over the block's weights (6 here)
    reg = 0.01 * sum(1.0 - abs(2 * f - 1) ** 11.0 for row in FRAC for f in row) / 6
    assert beta == pytest.approx(11.0)
    assert float(total.detach()) == pytest.approx(3.5 + reg, abs=1e-5)
    # without Fisher weights: |diff|^p summed over outputs, mean over rows
    _, rec, _ = adaround_loss(
        out, target, None, [r], t=1, iters=100, weight=0.01, warmup=0.2, decay=decay, p=2.4
    )
    assert float(rec.detach()) == pytest.approx((0.5**2.4 + 1.0) / 2, abs=1e-6)


def test_adaround_gradient_reaches_v(toy_layer):
    r = AdaRound(toy_layer)
    toy_layer.weight_fn = r.soft_weight
    x = torch.tensor([[1.0, 2.0, -1.0]])
    toy_layer(x).sum().backward()
    assert r.V.grad is not None and torch.any(r.V.grad != 0)


@pytest.fixture(scope="module")
def toy():
    model, batches = toy_dlrm()
    cache = CalibrationCache.from_batches(model, batches, rows=2048)
    return model, cache


def test_fisher_weights_of_the_logit_block_by_hand(toy):
    model, cache = toy
    towers = QuantizedDLRMTowers.from_model(model)
    attach_quantizers(towers, cache, DenseQuantConfig(w_bits=4, a_bits=8))
    with quant_disabled(towers):
        z = logits(towers, cache).double()
    sig = torch.sigmoid(z)
    last = len(towers.top) - 1
    for mode, raw in (
        ("fisher", sig * (1 - sig)),
        ("empirical", (sig - cache.labels.double()) ** 2),
    ):
        f = fisher_weights(towers, cache, "top", 0, last, mode, damping=0.1)
        expected = (raw / raw.mean() + 0.1) / 1.1  # dz/dZ = 1 for the logit block
        assert f.shape == (len(cache), 1)
        assert torch.allclose(f.double().reshape(-1), expected, rtol=1e-4, atol=1e-6)
    assert fisher_weights(towers, cache, "top", 0, last, "mse", 0.1) is None
    # the bottom block's Fisher weights: sigma (1 - sigma) (dz/dZ)^2, by float64 finite differences
    f = fisher_weights(towers, cache, "bottom", 0, len(towers.bottom) - 1, "fisher", damping=0.0)
    t64 = copy.deepcopy(towers).double()
    with quant_disabled(t64), torch.no_grad():
        emb = cache.emb.double()
        h = t64.bottom_forward(cache.dense.double())
        sig64 = torch.sigmoid(t64.top_forward(t64.interact(h, emb)).reshape(-1))
        raw = torch.zeros_like(h)
        eps = 1e-6
        for k in range(h.shape[1]):
            hp, hm = h.clone(), h.clone()
            hp[:, k] += eps
            hm[:, k] -= eps
            zp = t64.top_forward(t64.interact(hp, emb)).reshape(-1)
            zm = t64.top_forward(t64.interact(hm, emb)).reshape(-1)
            raw[:, k] = ((zp - zm) / (2 * eps)) ** 2 * sig64 * (1 - sig64)
    assert torch.allclose(f.double(), raw / raw.mean(), rtol=1e-3, atol=1e-4)


def test_brecq_reconstruction_beats_nearest(toy):
    model, cache = toy
    towers = QuantizedDLRMTowers.from_model(model)
    report = run_brecq(
        towers,
        cache,
        DenseQuantConfig(w_bits=2, a_bits=8),
        iters_w=1000,
        iters_a=100,
        batch_size=128,
        seed=0,
    )
    for block in report["weight_pass"]:  # learned rounding is kept only where it is better
        assert block["kept_adaround"] == (block["rec_adaround"] <= block["rec_nearest"])
        assert block["undecided_share"] < 0.05
    top = report["weight_pass"][-1]
    assert top["kept_adaround"] and top["rec_adaround"] < 0.8 * top["rec_nearest"]
    # frozen codes sit on the grid and the first/last layers stayed 8-bit
    for layer in towers.layers():
        assert layer.codes is not None
        assert layer.codes.min() >= layer.wq.spec.qmin and layer.codes.max() <= layer.wq.spec.qmax
    assert towers.bottom[0].wq.spec.bits == 8 and towers.top[-1].wq.spec.bits == 8
    assert towers.top[0].wq.spec.bits == 2
