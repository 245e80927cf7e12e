"""Observers: clipping ranges (lo, hi) from data.

- `minmax_range`      the full range (round-to-nearest baseline);
- `percentile_range`  clip the tails at a percentile;
- `max_mean_range`    mean over samples of the per-sample max (SPARQ's activation scale);
- `lp_range`          the range that minimises mean |Q(x) - x|^p, searched over shrinks
                      c * [lo, hi] of the min/max range (LAPQ's Lp initialisation, BRECQ's scale
                      init; p = 2 is the MSE-optimal range).

Weights are [out, in] and observed per row when `per_channel`; activations [rows, features] are
observed per tensor. Ranges come back shaped [C, 1] per channel, or [1, 1] per tensor.
"""

from __future__ import annotations

import torch

from embq.dense.core.quantizers import QuantSpec, fake_quant, qparams

#: default shrink grid of `lp_range`: c = 1.00, 0.99, ..., 0.01 of the min/max range.
DEFAULT_GRID = torch.linspace(1.0, 0.01, 100)


def _rows(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    x = x.detach().float()
    return x.reshape(x.shape[0], -1) if per_channel else x.reshape(1, -1)


def minmax_range(x: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    r = _rows(x, per_channel)
    return r.min(dim=1, keepdim=True).values, r.max(dim=1, keepdim=True).values


def percentile_range(
    x: torch.Tensor, percentile: float = 99.99, per_channel: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """[q_(100-p), q_p] quantiles of the values (per row when `per_channel`)."""
    r = _rows(x, per_channel)
    if r.shape[1] > 2_000_000:  # torch.quantile's input limit: a fixed subsample is plenty
        r = r[:, torch.randperm(r.shape[1], generator=torch.Generator().manual_seed(0))[:2_000_000]]
    q = torch.tensor([1.0 - percentile / 100.0, percentile / 100.0])
    lo, hi = torch.quantile(r, q, dim=1, keepdim=True)
    return lo, hi


def max_mean_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over samples (rows of `x`) of the per-sample min and max: SPARQ's `max_mean`."""
    x = x.detach().float().reshape(x.shape[0], -1)
    return (x.min(dim=1).values.mean().reshape(1, 1), x.max(dim=1).values.mean().reshape(1, 1))


def subsample(x: torch.Tensor, max_values: int, seed: int = 0) -> torch.Tensor:
    """At most `max_values` elements of an activation tensor, as rows [n, features]."""
    x = x.detach().float().reshape(x.shape[0], -1)
    rows = max(1, max_values // max(1, x.shape[1]))
    if x.shape[0] <= rows:
        return x
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:rows]
    return x[idx]


@torch.no_grad()
def lp_errors(
    x: torch.Tensor,
    spec: QuantSpec,
    ps: list[float],
    grid: torch.Tensor | None = None,
    base: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean |Q(x) - x|^p for every shrink of the grid and every p.

    Returns (errors [len(grid), len(ps), C], lo0 [C, 1], hi0 [C, 1]) where the candidate range k
    of channel c is grid[k] * [lo0_c, hi0_c].
    """
    grid = DEFAULT_GRID if grid is None else grid
    r = _rows(x, spec.per_channel)
    lo0, hi0 = (
        base if base is not None else (r.min(1, keepdim=True).values, r.max(1, keepdim=True).values)
    )
    lo0 = lo0.reshape(-1, 1).float()
    hi0 = hi0.reshape(-1, 1).float()
    if spec.kind == "unsigned":
        lo0 = torch.zeros_like(lo0)
    out = torch.empty(len(grid), len(ps), r.shape[0])
    for k, c in enumerate(grid.tolist()):
        scale, zp = qparams(lo0 * c, hi0 * c, spec)
        err = (fake_quant(r, scale, zp, spec) - r).abs_()
        for j, p in enumerate(ps):
            out[k, j] = err.pow(p).mean(dim=1)
    return out, lo0, hi0


def lp_range(
    x: torch.Tensor,
    spec: QuantSpec,
    p: float = 2.0,
    grid: torch.Tensor | None = None,
    base: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shrink c * [min, max] (per channel if the spec says so) minimising mean |Q(x) - x|^p."""
    return lp_ranges(x, spec, [p], grid, base)[0]


def lp_ranges(
    x: torch.Tensor,
    spec: QuantSpec,
    ps: list[float],
    grid: torch.Tensor | None = None,
    base: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`lp_range` for several p at once (one quantization pass per grid point)."""
    grid = DEFAULT_GRID if grid is None else grid
    errors, lo0, hi0 = lp_errors(x, spec, ps, grid, base)
    out = []
    for j in range(len(ps)):
        best = errors[:, j, :].argmin(dim=0)  # first (widest) of equal minima
        c = grid[best].reshape(-1, 1)
        out.append((lo0 * c, hi0 * c))
    return out


@torch.no_grad()
def output_range(
    w: torch.Tensor, spec: QuantSpec, gram: torch.Tensor, grid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shrink c * [min, max] of a Linear weight [out, in] minimising the layer's output error
    on calibration inputs, e^T G e per row (G = E[x x^T], e = W - Q(W)); per row when the spec is
    per channel, summed over rows otherwise."""
    grid = DEFAULT_GRID if grid is None else grid
    w = w.detach().float()
    per = spec.per_channel
    lo0, hi0 = minmax_range(w, per)
    best_err = torch.full((lo0.shape[0],), float("inf"))
    best_c = torch.ones(lo0.shape[0])
    for c in grid.tolist():
        scale, zp = qparams(lo0 * c, hi0 * c, spec)
        e = fake_quant(w, scale, zp, spec) - w
        err = ((e @ gram) * e).sum(1)
        if not per:
            err = err.sum().reshape(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_c = torch.where(better, torch.full_like(best_c, c), best_c)
    return lo0 * best_c[:, None], hi0 * best_c[:, None]
