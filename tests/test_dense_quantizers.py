"""Uniform quantizers and observers against float64 math written out independently."""

import numpy as np
import pytest
import torch

from embq.dense.core.observers import (
    lp_range,
    max_mean_range,
    minmax_range,
    output_range,
    percentile_range,
)
from embq.dense.core.quantizers import QuantSpec, fake_quant, qparams, quantize, round_ste
from embq.errors import ConfigError


def ref_quant(x, lo, hi, bits, kind):
    """float64 reference: (codes, dequantized) for clipping range [lo, hi] (broadcast arrays)."""
    x, lo, hi = (np.asarray(a, dtype=np.float64) for a in (x, lo, hi))
    if kind == "symmetric":
        qmax = 2 ** (bits - 1) - 1
        qmin = -qmax
        scale = np.maximum(np.maximum(np.abs(lo), np.abs(hi)) / qmax, 1e-8)
        zp = np.zeros_like(scale)
    elif kind == "unsigned":
        qmin, qmax = 0, 2**bits - 1
        scale = np.maximum(np.maximum(hi, 0) / qmax, 1e-8)
        zp = np.zeros_like(scale)
    else:
        qmin, qmax = 0, 2**bits - 1
        lo0, hi0 = np.minimum(lo, 0), np.maximum(hi, 0)
        scale = np.maximum((hi0 - lo0) / qmax, 1e-8)
        zp = np.clip(np.round(-lo0 / scale), qmin, qmax)
    codes = np.clip(np.round(x / scale) + zp, qmin, qmax)
    return codes, (codes - zp) * scale, scale


def spec_of(kind, bits, per_channel=False):
    return QuantSpec(
        bits, signed=kind != "unsigned", symmetric=kind != "asymmetric", per_channel=per_channel
    )


def near_tie(x, scale):
    """Values whose x / scale sits within float32 noise of a .5 boundary (rounding may differ)."""
    r = np.asarray(x, np.float64) / scale
    return np.abs(r - np.floor(r) - 0.5) < 1e-4


@pytest.mark.parametrize("kind", ["symmetric", "unsigned", "asymmetric"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_quantize_matches_float64(kind, bits, per_channel):
    rng = np.random.default_rng(bits * 7 + per_channel)
    x = rng.normal(0.3, 1.5, (6, 50)).astype(np.float32)
    x[0, :5] = [0.0, 1e-9, -3e3, 3e3, 0.5]  # zeros, tiny and huge values
    x[1] = 0.0  # an all-zero channel
    x[2] = np.abs(x[2])  # a one-sided channel
    spec = spec_of(kind, bits, per_channel)
    if per_channel:
        lo, hi = x.min(1, keepdims=True) * 0.7, x.max(1, keepdims=True) * 0.7
    else:
        lo, hi = np.array([[x.min() * 0.01]]), np.array([[x.max() * 0.01]])
    scale, zp = qparams(
        torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32), spec
    )
    codes = quantize(torch.from_numpy(x), scale, zp, spec).numpy()
    deq = fake_quant(torch.from_numpy(x), scale, zp, spec).numpy()
    r_codes, r_deq, r_scale = ref_quant(x, lo, hi, bits, kind)
    np.testing.assert_allclose(scale.numpy(), np.broadcast_to(r_scale, scale.shape), rtol=1e-6)
    ok = ~near_tie(x, r_scale)
    assert np.array_equal(codes[ok], r_codes[ok])
    np.testing.assert_allclose(deq[ok], r_deq[ok], rtol=1e-5, atol=1e-6 * np.abs(r_deq).max())
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
    if kind == "symmetric":
        assert -spec.qmin == spec.qmax  # exactly symmetric grid
    if kind == "asymmetric":  # zero is exactly representable
        z = quantize(torch.zeros(1), scale.reshape(-1)[:1], zp.reshape(-1)[:1], spec)
        assert float((z - zp.reshape(-1)[:1]) * scale.reshape(-1)[:1]) == 0.0


def test_unsigned_clamps_negatives_and_levels():
    spec = QuantSpec(4, signed=False, symmetric=True)
    assert (spec.qmin, spec.qmax, spec.levels) == (0, 15, 16)
    s, z = qparams(torch.tensor([0.0]), torch.tensor([1.5]), spec)
    out = fake_quant(torch.tensor([-1.0, 0.0, 0.05, 0.75, 2.0]), s, z, spec)
    assert torch.allclose(out, torch.tensor([0.0, 0.0, 0.0, 0.8, 1.5]))
    assert QuantSpec(4, signed=True, symmetric=True).levels == 15
    assert QuantSpec(2, signed=True, symmetric=False).levels == 4


def test_round_half_to_even_and_ste_gradient():
    spec = QuantSpec(8, signed=True, symmetric=True)
    s, z = torch.tensor(1.0), torch.tensor(0.0)
    assert quantize(torch.tensor([0.5, 1.5, 2.5, -0.5]), s, z, spec).tolist() == [
        0.0,
        2.0,
        2.0,
        -0.0,
    ]
    x = torch.tensor([0.3, 1.7], requires_grad=True)
    round_ste(x * 3).sum().backward()
    assert x.grad.tolist() == [3.0, 3.0]


def test_bad_bits_raise_config_error():
    with pytest.raises(ConfigError):
        QuantSpec(1)
    with pytest.raises(ConfigError):
        QuantSpec(17)


def test_minmax_and_percentile_observers():
    rng = np.random.default_rng(0)
    x = rng.standard_t(3, (8, 1000)).astype(np.float32)
    lo, hi = minmax_range(torch.from_numpy(x), per_channel=True)
    assert np.allclose(lo.numpy().ravel(), x.min(1)) and np.allclose(hi.numpy().ravel(), x.max(1))
    lo, hi = minmax_range(torch.from_numpy(x))
    assert float(lo) == x.min() and float(hi) == x.max()
    lo, hi = percentile_range(torch.from_numpy(x), 99.0)
    np.testing.assert_allclose(
        [float(lo), float(hi)], np.percentile(x.astype(np.float64), [1.0, 99.0]), rtol=1e-4
    )
    lo, hi = max_mean_range(torch.from_numpy(x))
    assert np.isclose(float(hi), x.max(1).mean(), rtol=1e-6) and np.isclose(
        float(lo), x.min(1).mean(), rtol=1e-6
    )


@pytest.mark.parametrize("kind", ["symmetric", "unsigned", "asymmetric"])
@pytest.mark.parametrize("p", [2.0, 2.4, 4.0])
def test_lp_range_is_the_best_shrink(kind, p):
    rng = np.random.default_rng(int(p * 10))
    x = rng.laplace(0.2, 1.0, (5, 400)).astype(np.float32)
    if kind == "unsigned":
        x = np.maximum(x, 0)
    spec = spec_of(kind, 3, per_channel=True)
    grid = torch.linspace(1.0, 0.05, 40)
    lo, hi = lp_range(torch.from_numpy(x), spec, p, grid)
    # brute force in float64 over the same grid
    lo0 = x.min(1, keepdims=True) if kind != "unsigned" else np.zeros((5, 1))
    hi0 = x.max(1, keepdims=True)
    errs = np.stack(
        [
            np.mean(np.abs(ref_quant(x, lo0 * c, hi0 * c, 3, kind)[1] - x) ** p, axis=1)
            for c in grid.numpy().astype(np.float64)
        ]
    )
    chosen = np.array(
        [
            np.mean(
                np.abs(
                    ref_quant(x[i : i + 1], lo.numpy()[i : i + 1], hi.numpy()[i : i + 1], 3, kind)[
                        1
                    ]
                    - x[i : i + 1]
                )
                ** p
            )
            for i in range(5)
        ]
    )
    np.testing.assert_allclose(chosen, errs.min(0), rtol=1e-4)


def test_output_range_minimises_output_error():
    rng = np.random.default_rng(3)
    w = rng.normal(0, 1, (4, 6)).astype(np.float32)
    w[0, 0] = 6.0  # an outlier weight on a high-variance input must not be clipped
    x = rng.normal(0, 1, (2000, 6)).astype(np.float32)
    x[:, 0] *= 10
    gram = torch.from_numpy(x.T @ x / len(x))
    spec = spec_of("asymmetric", 3, per_channel=True)
    grid = torch.linspace(1.0, 0.1, 19)
    lo, hi = output_range(torch.from_numpy(w), spec, gram, grid)
    g = gram.double().numpy()
    for i in range(4):

        def out_err(c, row=w[i]):
            e = ref_quant(row, row.min() * c, row.max() * c, 3, "asymmetric")[1] - row
            return e @ g @ e

        best = min(out_err(c) for c in grid.numpy().astype(np.float64))
        e = ref_quant(w[i], lo.numpy()[i], hi.numpy()[i], 3, "asymmetric")[1] - w[i]
        assert np.isclose(e @ g @ e, best, rtol=1e-4)
    assert np.isclose(float(hi[0]), 6.0)  # outlier channel keeps its full range
