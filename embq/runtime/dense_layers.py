"""The served layers of quantized dense towers: scriptable modules that compute what
`embq.dense` calibrated and evaluated (see `embq.dense.kernels` for which layer runs where).

`Int8StaticLinear` runs fbgemm's int8 GEMM with the layer's calibrated input quantizer:
`quantized::linear_with_input_q_dq_qweight_dq_output_fp32` (and its ReLU twin) quantizes the
float input with the static scale and zero point to uint8 codes, multiplies them with the stored
int8 weight codes (per-channel scales and zero points) in int32, and returns
acc * input_scale * weight_scale + bias in float32. Float in, float out: the bottom MLP's output
feeds the (float) interaction and the click logit is not quantized, as in the simulation.

The simulated grids map onto the kernel's uint8 input codes u = clamp(round(x / s) + z_k, 0, 255)
with z_k = zero_point + 128 for signed symmetric grids (codes -127..127 -> 1..255) and
z_k = zero_point otherwise; where the simulated grid is narrower than 0..255 (the symmetric grid's
missing -128, every grid under 8 bits) the input is first clamped to the grid's float range, so
the kernel sees exactly the simulated codes. Weight codes of b bits are int8 codes shifted by
2^(b-1) when their grid is asymmetric (0..2^b - 1), zero points shifted alike: (q - zp) unchanged.

The integer product is exact when fbgemm's kernel does not saturate: with AVX512-VNNI (this
project's CPUs) it accumulates u8 x s8 products in int32 directly; plain AVX2 kernels add pairs of
products in int16 first, which can saturate for 8-bit weights near +-127 against inputs near 255
(the reason torch's fbgemm observers use reduce_range); 2..4-bit weights cannot saturate.

`FloatLinear` is the "dequantized-fp32" layer: the input quantizer (and SPARQ windows) applied in
float32 with the simulation's own operations, then a float32 GEMM on the dequantized weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InputClamp(nn.Module):
    """x clamped to [lo, hi]: the float range of a grid narrower than the kernel's uint8 codes."""

    def __init__(self, lo: float, hi: float) -> None:
        super().__init__()
        self.lo = float(lo)
        self.hi = float(hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, self.lo, self.hi)


class SparqWindows(nn.Module):
    """SPARQ's windows on integer codes (float tensor of codes), as `embq.dense.core.windows`
    computes them: a 256-entry table for the n-bit window, another for the 2n-bit window a code
    gets when its pair partner (inputs 2k, 2k+1) is zero (vSPARQ); signed codes in sign-magnitude
    form."""

    def __init__(self, narrow: torch.Tensor, wide: torch.Tensor, vsparq: bool, signed: bool) -> None:
        super().__init__()
        self.register_buffer("narrow", narrow.to(torch.int64).clone())
        self.register_buffer("wide", wide.to(torch.int64).clone())
        self.vsparq = bool(vsparq)
        self.signed = bool(signed)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        mag = q.abs() if self.signed else q
        c = mag.to(torch.int64)
        out = self.narrow[c]
        if self.vsparq:
            k = c.shape[-1]
            padded = F.pad(c, (0, k % 2))
            partner_zero = (padded.reshape(c.shape[0], -1, 2) == 0).flip(-1).reshape(padded.shape)
            out = torch.where(partner_zero[:, :k], self.wide[c], out)
        windowed = out.to(q.dtype)
        return torch.sign(q) * windowed if self.signed else windowed


class FakeQuantInput(nn.Module):
    """x -> (q - zero_point) * scale with q the codes of `embq.dense.core.quantizers.kernel_codes`
    (the int8 kernel's own rounding: x * (1 / scale) + zero_point + shift in one fused
    multiply-add, round half to even, minus the shift, clamped to [qmin, qmax]), after the
    windows of `windows` (an nn.Identity when none)."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                 shift: int, windows: nn.Module) -> None:  # fmt: skip
        super().__init__()
        self.register_buffer("scale", scale.reshape(1).float().clone())
        self.register_buffer("zero_point", zero_point.reshape(1).float().clone())
        self.qmin = int(qmin)
        self.qmax = int(qmax)
        self.shift = int(shift)
        self.windows = windows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inv = (1.0 / self.scale).double()
        t = (x.double() * inv + (self.zero_point.double() + self.shift)).float()
        q = torch.clamp(torch.round(t) - self.shift, self.qmin, self.qmax)
        return (self.windows(q) - self.zero_point) * self.scale


class Int8StaticLinear(nn.Module):
    """fbgemm int8 Linear (+ ReLU) with a static input scale; see the module doc.

    `packed`: torch's LinearPackedParamsBase (int8 weight codes, scales, zero points, bias);
    `pre`: what runs on the float input before the kernel quantizes it (an InputClamp, a
    FakeQuantInput with SPARQ windows, or nn.Identity)."""

    def __init__(self, packed, input_scale: float, input_zero_point: int, relu: bool,
                 pre: nn.Module, in_features: int, out_features: int) -> None:  # fmt: skip
        super().__init__()
        self.packed = packed
        self.input_scale = float(input_scale)
        self.input_zero_point = int(input_zero_point)
        self.relu = bool(relu)
        self.pre = pre
        self.in_features = int(in_features)
        self.out_features = int(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        if self.relu:
            return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_relu_output_fp32(
                x, self.input_scale, self.input_zero_point, self.packed
            )
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            x, self.input_scale, self.input_zero_point, self.packed
        )

    def extra_repr(self) -> str:
        return (f"{self.in_features}->{self.out_features}, input scale {self.input_scale:.6g}, "
                f"zero point {self.input_zero_point}, relu={self.relu}")  # fmt: skip


class FloatLinear(nn.Module):
    """float32 Linear (+ ReLU) on dequantized (or fp32) weights after `pre` (a FakeQuantInput, or
    nn.Identity for an unquantized input)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, relu: bool, pre: nn.Module) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().float().contiguous().clone())
        self.register_buffer("bias", bias.detach().float().contiguous().clone())
        self.relu = bool(relu)
        self.pre = pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self.pre(x), self.weight, self.bias)
        return torch.relu(y) if self.relu else y
