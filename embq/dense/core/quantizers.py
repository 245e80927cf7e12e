"""Uniform affine quantizers: the arithmetic every dense method shares.

A quantizer is described by a `QuantSpec` and, once calibrated, by a `scale` and a `zero_point`
(per tensor, or per output channel = per row of a Linear weight). Three grids exist:

- signed symmetric   q in [-(2^(b-1) - 1), 2^(b-1) - 1], zero_point 0,
                     scale = alpha / (2^(b-1) - 1):
  the clipping range is [-alpha, alpha] (the "narrow" int range, exactly symmetric around 0);
- unsigned           q in [0, 2^b - 1], zero_point 0, scale = alpha / (2^b - 1): range [0, alpha],
  for post-ReLU activations (negative inputs clamp to 0);
- asymmetric         q in [0, 2^b - 1], integer zero_point, range [lo, hi] (widened to contain 0
  so that 0 is exact), scale = (hi - lo) / (2^b - 1).

    codes       = clamp(round(x / scale) + zero_point, qmin, qmax)      (round half to even)
    dequantized = (codes - zero_point) * scale

A range is always given as (lo, hi); symmetric grids use alpha = max(|lo|, |hi|), unsigned grids
use alpha = hi.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from embq.errors import ConfigError

#: smallest scale a quantizer uses: an all-zero channel still gets a valid (tiny) step.
MIN_SCALE = 1e-8


@dataclass(frozen=True)
class QuantSpec:
    """How a tensor is quantized.

    Args:
        bits: code width, 2..16.
        signed: whether values can be negative. An unsigned spec clamps negatives to 0.
        symmetric: signed symmetric grid (zero_point 0) when True, affine grid with an integer
            zero_point when False. Unsigned specs are zero-point-free either way.
        per_channel: one scale per row (dim 0) instead of one per tensor.
    """

    bits: int
    signed: bool = True
    symmetric: bool = True
    per_channel: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ConfigError(f"Quantizer bits must be an integer in [2, 16], got {self.bits!r}.")

    @property
    def kind(self) -> str:
        """'symmetric', 'unsigned' or 'asymmetric'."""
        if not self.signed and self.symmetric:
            return "unsigned"
        return "symmetric" if self.symmetric else "asymmetric"

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.kind == "symmetric" else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.kind == "symmetric" else 2**self.bits - 1

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> QuantSpec:
        return cls(**data)


def qparams(
    lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) for clipping range [lo, hi] (tensors of matching shape)."""
    lo = torch.as_tensor(lo, dtype=torch.float32)
    hi = torch.as_tensor(hi, dtype=torch.float32)
    kind = spec.kind
    if kind == "symmetric":
        alpha = torch.maximum(lo.abs(), hi.abs())
        scale = (alpha / spec.qmax).clamp_min(MIN_SCALE)
        return scale, torch.zeros_like(scale)
    if kind == "unsigned":
        scale = (hi.clamp_min(0.0) / spec.qmax).clamp_min(MIN_SCALE)
        return scale, torch.zeros_like(scale)
    lo0, hi0 = lo.clamp_max(0.0), hi.clamp_min(0.0)
    scale = ((hi0 - lo0) / spec.qmax).clamp_min(MIN_SCALE)
    zero_point = torch.clamp(torch.round(-lo0 / scale), spec.qmin, spec.qmax)
    return scale, zero_point


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() in the forward pass, identity in the backward pass (straight-through estimator)."""
    return (torch.round(x) - x).detach() + x


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    spec: QuantSpec,
    ste: bool = False,
) -> torch.Tensor:
    """Integer codes (as a float tensor) of `x`; `ste` keeps gradients for x and scale."""
    r = round_ste(x / scale) if ste else torch.round(x / scale)
    return torch.clamp(r + zero_point, spec.qmin, spec.qmax)


def kernel_shift(spec: QuantSpec) -> int:
    """What moves a grid's codes into fbgemm's uint8 input codes: 128 for signed symmetric grids
    (codes -127..127 -> 1..255), 0 for grids that start at 0."""
    return 128 if spec.qmin < 0 else 0


def kernel_codes(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Integer codes (as a float tensor) of an input quantizer, computed as fbgemm's int8 kernels
    quantize their input, so that the simulation and the served int8 layer see the same codes:
    round-half-even of x * (1 / scale) + z_k as one fused multiply-add rounded to float32, with the
    kernel's zero point z_k = zero_point + `kernel_shift`. This differs from `quantize`
    (round(x / scale) + zero_point) only within float32 rounding of a half-way point, which data
    with few distinct values (counts, buckets) hit often."""
    shift = kernel_shift(spec)
    inv = (1.0 / scale).double()  # float32 reciprocal, as the kernel computes it
    t = (x.double() * inv + (zero_point.double() + shift)).float()  # exact product: one rounding
    return torch.clamp(torch.round(t) - shift, spec.qmin, spec.qmax)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (codes - zero_point) * scale


def fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    spec: QuantSpec,
    ste: bool = False,
) -> torch.Tensor:
    """quantize -> dequantize in one step (the simulated quantizer)."""
    return dequantize(quantize(x, scale, zero_point, spec, ste=ste), scale, zero_point)


def fake_quant_range(
    x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """Fake-quantize `x` with clipping range [lo, hi]."""
    scale, zero_point = qparams(lo, hi, spec)
    return fake_quant(x, scale, zero_point, spec)


def channel_view(t: torch.Tensor, x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Reshape per-channel parameters [C] (or [C, 1]) to broadcast over rows of `x`."""
    if not per_channel:
        return t.reshape(()) if t.numel() == 1 else t
    return t.reshape(-1, *([1] * (x.dim() - 1)))
