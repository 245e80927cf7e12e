"""Multipoint quantization (Liu, Ye, Zhou, Liu, AAAI 2021) of DLRM's Linear weights.

Each output channel's weight row w is approximated by a sum of low-bit vectors,
w ~ sum_i a_i q_i with q_i in [-2^(b-1), 2^(b-1) - 1]^d and fp32 scalars a_i, built greedily on
the residual: point i minimises ||r - a_i q_i||^2 (a grid search over a, refined by alternating
a = <r, q> / <q, q> and q = clamp(round(r / a))), then r -= a_i q_i.

Every channel starts with one point (plain b-bit, MSE-optimal per-channel scale). Extra points
go, one at a time, to the channel with the largest output error on the calibration inputs,
e_j = E_x (w_j . x - w~_j . x)^2 = (w_j - w~_j)^T E[x x^T] (w_j - w~_j), until the layer's budget
(`extra_points` x its output channels, rounded down) is spent; 8-bit layers (the first/last
layer policy) get no extra points.

Execution (`MultipointLinear.forward`): an n-point channel is n low-bit output channels of one
integer GEMM, followed by a weighted sum y_j = sum_i a_i (q_i . x) + bias_j (an index_add over
the point -> channel map). The overhead is the extra output channels: extra MACs and extra code
bytes, reported per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from embq.dense.core.calibration import (
    CalibrationCache,
    DenseQuantConfig,
    attach_quantizers,
    calibrate_minmax,
)
from embq.dense.core.fakequant import QuantizedDLRMTowers, QuantLinear
from embq.progress import progress_bar


class MultipointLinear(QuantLinear):
    """A Linear whose weight rows are sums of low-bit points (see the module doc)."""

    def __init__(
        self,
        base: QuantLinear,
        bits: int,
        point_codes: torch.Tensor,
        point_scales: torch.Tensor,
        point_channel: torch.Tensor,
    ) -> None:
        super().__init__(base.weight, base.bias, base.relu, base.name, base.role)
        self.aq = base.aq
        self.bits = int(bits)
        self.register_buffer("point_codes", point_codes.float())
        self.register_buffer("point_scales", point_scales.float().reshape(-1))
        self.register_buffer("point_channel", point_channel.long().reshape(-1))

    def weight_desc(self) -> tuple[int, str]:
        return self.bits, f"multipoint x{self.points / self.out_features:.3f}"

    @property
    def points(self) -> int:
        return int(self.point_codes.shape[0])

    def qweight(self) -> torch.Tensor:
        if not self.quantize_weight:
            return self.weight
        w = torch.zeros_like(self.weight)
        return w.index_add_(0, self.point_channel, self.point_scales[:, None] * self.point_codes)

    def freeze(self) -> None:  # the codes are the representation
        pass

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantize_weight:
            return F.linear(x, self.weight, self.bias)
        per_point = F.linear(x, self.point_codes) * self.point_scales  # the extra output channels
        y = torch.zeros(x.shape[0], self.out_features, dtype=per_point.dtype)
        return y.index_add_(1, self.point_channel, per_point) + self.bias


@torch.no_grad()
def best_point(
    r: torch.Tensor, bits: int, gram: torch.Tensor | None = None, grid: int = 96, refine: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a [C], q [C, d]) minimising the error of r_c - a_c q_c per row, q in the signed b-bit range.

    The error is ||e||^2 (the paper's weight error) when `gram` is None, else the output error
    e^T G e with G = E[x x^T] of the layer's calibration inputs. a is searched on a grid of
    shrinks of max|r| / (2^(b-1) - 1), then refined by alternating the optimal a for fixed q
    (<r, G q> / <q, G q>) with q = clamp(round(r / a)).
    """
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def err_of(e: torch.Tensor) -> torch.Tensor:
        return e.pow(2).sum(-1) if gram is None else ((e @ gram) * e).sum(-1)

    m = r.abs().amax(dim=1).clamp_min(1e-12)  # [C]
    cs = torch.linspace(0.05, 1.05, grid)
    best_err = torch.full((r.shape[0],), float("inf"))
    best_a = m / qmax
    for c in cs.tolist():
        a = m * c / qmax
        q = torch.clamp(torch.round(r / a[:, None]), qmin, qmax)
        err = err_of(r - a[:, None] * q)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_a = torch.where(better, a, best_a)
    a = best_a
    q = torch.clamp(torch.round(r / a[:, None]), qmin, qmax)
    err = best_err
    for _ in range(refine):
        gq = q if gram is None else q @ gram
        qq = (q * gq).sum(1)
        a_new = torch.where(qq > 0, (r * gq).sum(1) / qq.clamp_min(1e-30), a).clamp_min(1e-12)
        q_new = torch.clamp(torch.round(r / a_new[:, None]), qmin, qmax)
        err_new = err_of(r - a_new[:, None] * q_new)
        better = err_new < err
        a = torch.where(better, a_new, a)
        q = torch.where(better[:, None], q_new, q)
        err = torch.where(better, err_new, err)
    return a, q


@torch.no_grad()
def multipoint_layer(
    weight: torch.Tensor,
    bits: int,
    gram: torch.Tensor,
    extra: int,
    max_points: int = 4,
    criterion: str = "output",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Points of one layer: (codes [P, in], scales [P], channel [P], stats)."""
    w = weight.detach().float()
    g = gram if criterion == "output" else None
    a, q = best_point(w, bits, g)
    codes, scales, channel = [q], [a], [torch.arange(w.shape[0])]
    resid = w - a[:, None] * q
    count = torch.ones(w.shape[0], dtype=torch.long)

    def out_err(res: torch.Tensor) -> torch.Tensor:
        return ((res @ gram) * res).sum(1)

    err = out_err(resid)
    err_plain = err.clone()
    for _ in range(extra):
        cand = torch.where(count < max_points, err, torch.full_like(err, -1.0))
        j = int(cand.argmax())
        if cand[j] <= 0:
            break
        aj, qj = best_point(resid[j : j + 1], bits, g)
        codes.append(qj)
        scales.append(aj)
        channel.append(torch.tensor([j]))
        resid[j] -= aj[0] * qj[0]
        count[j] += 1
        err[j] = out_err(resid[j : j + 1])[0]
    codes_t, scales_t, channel_t = torch.cat(codes), torch.cat(scales), torch.cat(channel)
    stats = {
        "channels": int(w.shape[0]),
        "points": int(codes_t.shape[0]),
        "extra_points": int(codes_t.shape[0] - w.shape[0]),
        "max_points_per_channel": int(count.max()),
        "output_mse_plain": float(err_plain.mean()),
        "output_mse": float(err.mean()),
    }
    return codes_t, scales_t, channel_t, stats


def run_multipoint(
    towers: QuantizedDLRMTowers,
    cache: CalibrationCache,
    config: DenseQuantConfig,
    extra_points: float = 0.1,
    max_points: int = 4,
    criterion: str = "output",
) -> dict:
    """Multipoint weights (per output channel) with min/max activation quantizers.

    Args:
        extra_points: budget of extra points per low-bit layer, as a share of its output channels
            (0.1 = at most 10 % more output channels). 0 gives plain b-bit per-channel weights.
        max_points: cap on points per channel.
        criterion: what each point's scale minimises: 'output' (the channel's output error on the
            calibration inputs, e^T E[x x^T] e) or 'weight' (||e||^2, the paper's greedy step).
    """
    attach_quantizers(towers, cache, config)
    inputs = calibrate_minmax(towers, cache, weights=False)
    layers_report, macs, extra_macs, code_bits, extra_code_bits = [], 0, 0, 0, 0
    for tower in progress_bar((towers.bottom, towers.top), desc="multipoint", unit="tower", leave=False):
        for i, layer in enumerate(list(tower)):
            macs += layer.in_features * layer.out_features
            if layer.wq is None:
                continue
            bits = layer.wq.spec.bits
            x = inputs[layer.name]
            gram = (x.T.double() @ x.double() / max(1, len(x))).float()
            budget = int(extra_points * layer.out_features) if bits < 8 else 0
            codes, scales, channel, stats = multipoint_layer(
                layer.weight, bits, gram, budget, max_points, criterion
            )
            new = MultipointLinear(layer, bits, codes, scales, channel)
            tower[i] = new
            extra_macs += stats["extra_points"] * layer.in_features
            code_bits += stats["points"] * layer.in_features * bits
            extra_code_bits += stats["extra_points"] * layer.in_features * bits
            layers_report.append(
                {
                    "layer": layer.name,
                    "bits": bits,
                    **stats,
                    "extra_share": round(stats["extra_points"] / stats["channels"], 4),
                }
            )
    low = [r for r in layers_report if r["bits"] < 8]
    low_channels = sum(r["channels"] for r in low)
    low_extra = sum(r["extra_points"] for r in low)
    return {
        "extra_points_budget": extra_points,
        "layers": layers_report,
        "overhead": {
            "extra_points": low_extra,
            "extra_point_share": round(low_extra / low_channels, 4) if low_channels else 0.0,
            "extra_macs": extra_macs,
            "extra_mac_share": round(extra_macs / macs, 4) if macs else 0.0,
            "extra_code_bytes": extra_code_bits // 8,
            "code_bytes": code_bits // 8,
            "extra_scale_bytes": low_extra * 4,
        },
    }


__all__ = ["MultipointLinear", "best_point", "multipoint_layer", "run_multipoint"]
