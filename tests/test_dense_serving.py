"""Served dense layers against a float64 reference of the integer arithmetic they claim to run.

The reference is written here from the definitions alone: input codes
q = clamp(round(x / s) + z, qmin, qmax), weight codes w with per-row scales and zero points,
y = sum_k (q_k - z)(w_jk - zw_j) * s * sw_j + b_j, then ReLU. Inputs are built half-way between
grid points (and beyond the clipping range) so that no rounding is ambiguous: any difference
larger than float32 rounding is a wrong code, scale, zero point or clamp.
"""

import itertools

import numpy as np
import pytest
import torch

from embq.dense.core.fakequant import ActQuantizer, QuantLinear, WeightQuantizer
from embq.dense.core.quantizers import QuantSpec, quantize
from embq.dense.core.windows import SparqSpec
from embq.dense.kernels import DEQUANTIZED_FP32, INT8_STATIC
from embq.runtime.dense_layers import FloatLinear, Int8StaticLinear
from embq.runtime.dense_towers import serve_layer

W_GRIDS = [(8, True), (8, False), (4, True), (4, False), (2, False), (3, True)]
A_GRIDS = [(8, "unsigned"), (8, "symmetric"), (8, "asymmetric"), (4, "unsigned"),
           (4, "symmetric"), (6, "asymmetric")]  # fmt: skip


def act_spec(bits: int, grid: str) -> QuantSpec:
    if grid == "unsigned":
        return QuantSpec(bits, signed=False)
    return QuantSpec(bits, signed=True, symmetric=grid == "symmetric")


def random_layer(seed: int, w_bits: int, w_sym: bool, per_channel: bool, a: QuantSpec,
                 relu: bool, out_f: int = 24, in_f: int = 37) -> QuantLinear:  # fmt: skip
    """A QuantLinear with random codes, scales and zero points on the given grids."""
    g = torch.Generator().manual_seed(seed)
    layer = QuantLinear(torch.zeros(out_f, in_f), torch.randn(out_f, generator=g), relu, "t", "hidden")
    wspec = QuantSpec(w_bits, signed=True, symmetric=w_sym, per_channel=per_channel)
    layer.wq = WeightQuantizer(wspec, out_f)
    rows = out_f if per_channel else 1
    layer.wq.scale.copy_(torch.rand(rows, 1, generator=g) * 0.05 + 0.005)
    if not w_sym:
        layer.wq.zero_point.copy_(torch.randint(0, wspec.qmax + 1, (rows, 1), generator=g).float())
    # the extreme codes included, so that full-range products are exercised
    codes = torch.randint(wspec.qmin, wspec.qmax + 1, (out_f, in_f), generator=g).float()
    codes[0, :] = wspec.qmax
    codes[1, :] = wspec.qmin
    layer.codes = codes
    layer.weight.copy_((codes - layer.wq.zero_point) * layer.wq.scale)
    layer.aq = ActQuantizer(a)
    layer.aq.scale.fill_(float(torch.rand(1, generator=g)) * 0.1 + 0.01)
    if a.kind == "asymmetric":
        layer.aq.zero_point.fill_(float(torch.randint(0, a.qmax + 1, (1,), generator=g)))
    return layer


def inputs_between_grid_points(layer: QuantLinear, rows: int, seed: int) -> torch.Tensor:
    """x = (k - z + u) * s with integer k from 3 below the grid to 3 above it and |u| <= 0.3,
    so round(x / s) is never near a half-way point; row 0 is all qmax (largest products)."""
    g = torch.Generator().manual_seed(seed)
    spec, s, z = layer.aq.spec, float(layer.aq.scale), float(layer.aq.zero_point)
    k = torch.randint(spec.qmin - 3, spec.qmax + 4, (rows, layer.in_features), generator=g)
    k[0] = spec.qmax
    u = (torch.rand(rows, layer.in_features, generator=g) - 0.5) * 0.6
    return ((k.double() - z + u) * s).float()


def reference(layer: QuantLinear, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """float64 y of the integer arithmetic, from the layer's codes, scales and zero points, and
    the float32 rounding a kernel may add to each output: a few ulps of |acc| s sw_j + |b_j|."""
    spec = layer.aq.spec
    s, z = float(layer.aq.scale), float(layer.aq.zero_point)
    xd = x.double().numpy()
    q = np.clip(np.round(xd / s) + z, spec.qmin, spec.qmax)
    w = layer.codes.double().numpy()
    zw = layer.wq.zero_point.double().numpy().reshape(-1, 1)
    sw = layer.wq.scale.double().numpy().reshape(-1, 1)
    acc = (q - z) @ (w - zw).T  # the int32 accumulator, exact in float64
    y = acc * s * sw.reshape(1, -1) + layer.bias.double().numpy()
    slack = 4 * 2.0**-24 * (np.abs(acc) * s * sw.reshape(1, -1) + np.abs(layer.bias.double().numpy()))
    return (np.maximum(y, 0.0) if layer.relu else y), slack


@pytest.mark.parametrize("case", list(enumerate(itertools.product(W_GRIDS, A_GRIDS))))
def test_int8_layer_is_the_integer_arithmetic(case):
    index, ((w_bits, w_sym), (a_bits, a_kind)) = case
    for per_channel, relu in ((True, True), (False, False)):
        seed = 2 * index + per_channel
        layer = random_layer(seed, w_bits, w_sym, per_channel, act_spec(a_bits, a_kind), relu)
        served = serve_layer(layer, INT8_STATIC)
        assert isinstance(served, Int8StaticLinear)
        x = inputs_between_grid_points(layer, 64, seed)
        with torch.no_grad():
            got = served(x).double().numpy()
        want, slack = reference(layer, x)
        # float32 output rounding only; one code off moves an output by >= s * sw_j, which is
        # above that rounding on nearly every output
        assert np.all(np.abs(got - want) <= slack + 1e-30)
        step = float(layer.aq.scale) * layer.wq.scale.double().numpy().reshape(1, -1)
        assert np.mean(slack < step) > 0.95
        # the simulated layer (what the evaluation scores) computes the same, up to its own
        # float32 sums over the inputs
        with torch.no_grad():
            sim = layer(x).double().numpy()
            terms = layer.aq(x).abs().double() @ layer.qweight().abs().double().T
        bound = 2 * layer.in_features * 2.0**-24 * (terms.numpy() + layer.bias.abs().double().numpy())
        assert np.all(np.abs(sim - want) <= bound)


def test_simulated_quantizer_rounds_half_way_inputs_as_the_kernel():
    """Half-way inputs (x = (k + 0.5) s, frequent with count-valued features): the simulated
    quantizer's codes are the kernel's, on both kinds of kernel zero point (0 and 128), where
    round(x / s) disagrees with the kernel on some of them. An identity weight makes the served
    output (code - zero point) * s, so the kernel's codes are read off exactly."""
    disagreements = 0
    for kind, scale in itertools.product(("unsigned", "symmetric", "asymmetric"),
                                         (0.0123, 2 / 255, 0.37 / 255)):  # fmt: skip
        n = 40
        layer = random_layer(5, 8, True, False, act_spec(8, kind), relu=False, out_f=n, in_f=n)
        layer.wq.scale.fill_(1.0)
        layer.codes = torch.eye(n)
        layer.weight.copy_(torch.eye(n))
        layer.bias.zero_()
        layer.aq.scale.fill_(scale)
        s, z = layer.aq.scale, layer.aq.zero_point
        k = torch.arange(-140, 140).float().reshape(7, n)
        x = ((k + 0.5) * s).float()
        with torch.no_grad():
            kernel = torch.round(serve_layer(layer, INT8_STATIC)(x) / s) + z
        assert torch.equal(kernel, layer.aq.codes(x)), (kind, scale)
        disagreements += int((quantize(x, s, z, layer.aq.spec) != kernel).sum())
    assert disagreements > 0  # round(x / s) would not do: the case is not vacuous


def test_sparq_layer_on_int8_kernel_equals_simulation():
    for signed in (False, True):
        spec = act_spec(8, "symmetric" if signed else "unsigned")
        layer = random_layer(11, 8, True, True, spec, relu=True, in_f=38)
        layer.aq.sparq = SparqSpec(bits=4, options=5)
        x = inputs_between_grid_points(layer, 64, 3)
        x[:, ::3] = 0.0  # zeros: vSPARQ pairs give the partner the wide window
        with torch.no_grad():
            served = serve_layer(layer, INT8_STATIC)(x)
            sim = layer(x)
            plain = serve_layer(layer, INT8_STATIC)
            layer.aq.sparq = None
            no_windows = serve_layer(layer, INT8_STATIC)(x)
        assert isinstance(plain, Int8StaticLinear)
        assert torch.allclose(served, sim, rtol=0, atol=2e-6 * float(sim.abs().max() + 1))
        assert not torch.allclose(served, no_windows)  # the windows did change the codes


def test_float_fallback_equals_simulation_and_int8():
    layer = random_layer(2, 4, False, True, act_spec(8, "unsigned"), relu=True)
    x = inputs_between_grid_points(layer, 64, 1)
    fallback = serve_layer(layer, INT8_STATIC, int8_kernels=False)
    assert isinstance(fallback, FloatLinear)
    with torch.no_grad():
        got, sim, int8 = fallback(x), layer(x), serve_layer(layer, INT8_STATIC)(x)
    assert torch.equal(got, sim)  # the same float32 operations as the simulation
    assert torch.allclose(got, int8, rtol=0, atol=2e-5 * float(sim.abs().max() + 1))
    assert isinstance(serve_layer(layer, DEQUANTIZED_FP32), FloatLinear)


def test_served_layers_script():
    layer = random_layer(3, 4, True, True, act_spec(4, "symmetric"), relu=True)
    x = inputs_between_grid_points(layer, 16, 2)
    for kernel in (INT8_STATIC, DEQUANTIZED_FP32):
        module = serve_layer(layer, kernel)
        scripted = torch.jit.script(module)
        with torch.no_grad():
            assert torch.equal(scripted(x), module(x))
