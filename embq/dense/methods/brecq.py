"""BRECQ: block reconstruction with AdaRound (Li et al., ICLR 2021), ported to DLRM's towers.

Weights. Per-channel scales start at the best of 80 shrinks (1 - 0.01 i) of the min/max range;
the reference picks the shrink by the weights' own Lp error (p = 2.4, `w_init="lp"`), ours by
default by the layer's output error on the calibration inputs, e^T E[x x^T] e (`w_init="output"`):
DLRM's large weights sit on high-variance inputs (the dot products), and clipping them by weight
error alone costs more than 4-bit rounding does. Then, block by block in forward order, each
weight's rounding is learned:

    h(V)   = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1),   zeta = 1.1, gamma = -0.1
    W_soft = s (clamp(floor(W / s) + h(V) + zp, qmin, qmax) - zp),  V init: h(V) = frac(W / s)
    loss   = rec / rec_nearest + reg
    rec    = mean over rows of sum over outputs  f * (Z_hat - Z)^2          (Fisher-weighted)
    reg    = 0 during warm-up (first 20 %), then lambda * mean (1 - |2 h(V) - 1|^beta),
             beta decaying linearly from 20 to 2 after the warm-up

with Adam on V; afterwards rounding is frozen at h >= 0.5 (V >= 0), and kept only if it
reconstructs the block better than round-to-nearest on the calibration rows. The block input
comes from the already-quantized preceding network, the target Z from the fp32 model.

Scaling to DLRM. The reconstruction is divided by its round-to-nearest value and the regulariser
is averaged over the block's weights, so one lambda (100) suits a 1-wide logit block and a
64-wide hidden block alike (the reference's 0.01 x sum matches 0.01 x N for N weights: 10^4 to
10^5 in ResNet blocks). The learning rate of V is the reference's 1e-3 at 20000 steps, scaled up
for fewer steps (1e-3 x 20000 / iters, at most 1e-2), so that V can still travel to a hard 0/1.

DLRM's blocks: the bottom MLP and the top MLP (`blocks="tower"`, the default), or each Linear
(+ReLU) alone (`blocks="layer"`).

Fisher weights f (per row and output feature, normalised to mean 1, plus `damping`) replace
BRECQ's softmax-KL gradients by gradients of BCE with logits, back-propagated through the fp32
rest of the network (the interaction and the top MLP for the bottom block):

    'fisher'    f = sigma(z) (1 - sigma(z)) (dz/dZ)^2  = E_{y ~ model} (dBCE(z, y)/dZ)^2
                (the default: the expected squared BCE gradient, no label noise)
    'empirical' f = (dBCE(z, y)/dZ)^2 with the calibration labels y
    'kl'        f = (dBCE(z_q, sigma(z_fp))/dZ)^2 with the network quantized up to the block
                (the reference code's choice, KL -> BCE against the fp32 probability)
    'mse'       f = 1

Activations. After all weights are frozen, each input quantizer starts from whichever of its
Lp-optimal range (the reference's init) and its min/max range reconstructs its block better
(clipping pays at 4 bits; at 8 bits it cuts the rare large dot products of the top-MLP input
for no gain), then every block learns its input quantizers' step sizes
(LSQ-style: the step size, as exp(log_scale), is trained through the straight-through round)
with Adam and a cosine schedule on the same loss, inputs from the fully quantized preceding
network; learned step sizes are kept only if they reconstruct the block better.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from embq.dense.core.calibration import (
    CalibrationCache,
    DenseQuantConfig,
    attach_quantizers,
    layer_inputs,
    quant_disabled,
    single_thread,
)
from embq.dense.core.fakequant import QuantizedDLRMTowers, QuantLinear
from embq.dense.core.observers import lp_range, minmax_range, output_range, subsample
from embq.errors import ConfigError
from embq.progress import progress_bar

ZETA, GAMMA = 1.1, -0.1


class AdaRound(nn.Module):
    """Learnable rounding of one layer's weight on its (fixed) quantization grid."""

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        if layer.wq is None:
            raise ConfigError(f"{layer.name} has no weight quantizer to round.")
        self.layer = layer
        wq = layer.wq
        x = layer.weight / wq.scale
        self.register_buffer("w_floor", torch.floor(x))
        frac = (x - self.w_floor).clamp(0.0, 1.0 - 1e-6)
        self.V = nn.Parameter(-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0))

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.V) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def soft_weight(self) -> torch.Tensor:
        wq = self.layer.wq
        q = torch.clamp(self.w_floor + self.h() + wq.zero_point, wq.spec.qmin, wq.spec.qmax)
        return (q - wq.zero_point) * wq.scale

    def hard_codes(self) -> torch.Tensor:
        wq = self.layer.wq
        return torch.clamp(
            self.w_floor + (self.V.detach() >= 0).float() + wq.zero_point,
            wq.spec.qmin,
            wq.spec.qmax,
        )

    def round_loss(self, beta: float) -> torch.Tensor:
        return (1.0 - (2.0 * self.h() - 1.0).abs().pow(beta)).sum()


class LinearTempDecay:
    """beta(t): start_b until `rel_start` * t_max, then linear down to end_b at t_max."""

    def __init__(
        self, t_max: int, rel_start: float = 0.2, start_b: float = 20.0, end_b: float = 2.0
    ) -> None:
        self.t_max = t_max
        self.start = rel_start * t_max
        self.start_b = start_b
        self.end_b = end_b

    def __call__(self, t: int) -> float:
        if t < self.start:
            return self.start_b
        rel = (t - self.start) / max(1e-12, self.t_max - self.start)
        return self.end_b + (self.start_b - self.end_b) * max(0.0, 1.0 - rel)


def adaround_loss(
    out: torch.Tensor,
    target: torch.Tensor,
    fisher: torch.Tensor | None,
    rounders: list[AdaRound],
    t: int,
    iters: int,
    weight: float,
    warmup: float,
    decay: LinearTempDecay,
    rec_scale: float = 1.0,
    p: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(total, rec, beta) of step t (1-based): the reconstruction (Fisher-weighted squared error,
    or |.|^p without Fisher weights, summed over outputs, mean over rows, divided by `rec_scale`)
    plus the rounding regulariser, 0 before `warmup` * iters."""
    diff = out - target
    rec = (
        (diff.pow(2) * fisher).sum(1).mean()
        if fisher is not None
        else diff.abs().pow(p).sum(1).mean()
    )
    rec = rec / rec_scale
    beta = decay(t)
    if t < warmup * iters:
        reg = torch.zeros(())
    else:
        reg = (
            weight
            * sum(r.round_loss(beta) for r in rounders)
            / max(1, sum(r.V.numel() for r in rounders))
        )
    return rec + reg, rec, beta


# --- blocks ----------------------------------------------------------------------------------
def _blocks(towers: QuantizedDLRMTowers, mode: str) -> list[tuple[str, int, int]]:
    """(tower, first layer index, last layer index) of each reconstruction block."""
    if mode == "tower":
        return [("bottom", 0, len(towers.bottom) - 1), ("top", 0, len(towers.top) - 1)]
    if mode == "layer":
        return [("bottom", i, i) for i in range(len(towers.bottom))] + [
            ("top", i, i) for i in range(len(towers.top))
        ]
    raise ConfigError(f"BRECQ blocks must be 'tower' or 'layer', got {mode!r}.")


def _tower(towers: QuantizedDLRMTowers, name: str) -> nn.ModuleList:
    return towers.bottom if name == "bottom" else towers.top


def _run(layers, h: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        h = layer(h)
    return h


def block_input(
    towers: QuantizedDLRMTowers, tower: str, start: int, dense: torch.Tensor, emb: torch.Tensor
) -> torch.Tensor:
    """Input of layer `start` of `tower`, through the towers as currently quantized."""
    if tower == "bottom":
        return _run(towers.bottom[:start], dense)
    return _run(towers.top[:start], towers.interact(towers.bottom_forward(dense), emb))


def continue_forward(
    towers: QuantizedDLRMTowers, tower: str, end: int, h: torch.Tensor, emb: torch.Tensor
) -> torch.Tensor:
    """Logits from the output of layer `end` of `tower`."""
    if tower == "bottom":
        h = towers.interact(_run(towers.bottom[end + 1 :], h), emb)
        return _run(towers.top, h)
    return _run(towers.top[end + 1 :], h)


def fisher_weights(
    towers: QuantizedDLRMTowers,
    cache: CalibrationCache,
    tower: str,
    start: int,
    end: int,
    mode: str,
    damping: float,
    batch_size: int = 4096,
) -> torch.Tensor | None:
    """Per-row, per-output weights of the block's reconstruction loss (mean 1), or None ('mse')."""
    if mode == "mse":
        return None
    if mode not in ("fisher", "empirical", "kl"):
        raise ConfigError(
            f"BRECQ fisher must be 'fisher', 'empirical', 'kl' or 'mse', got {mode!r}."
        )
    layers = _tower(towers, tower)[start : end + 1]
    grads = []
    for s in cache.slices(batch_size):
        dense, emb, y = cache.dense[s], cache.emb[s], cache.labels[s]
        if mode == "kl":
            with quant_disabled(towers), torch.no_grad():
                p_fp = torch.sigmoid(towers.forward_cached(dense, emb).reshape(-1))
            with torch.no_grad():
                h = block_input(towers, tower, start, dense, emb)
            # the block itself at round-to-nearest, the rest fp32
            z_in = _run(layers, h).detach().requires_grad_(True)
            saved = [
                (layer, layer.quantize_weight, layer.aq.enabled if layer.aq else None)
                for layer in towers.layers()
                if layer not in list(layers)
            ]
            for layer, _, _ in saved:
                layer.quantize_weight = False
                if layer.aq is not None:
                    layer.aq.enabled = False
            try:
                z = continue_forward(towers, tower, end, z_in, emb).reshape(-1)
            finally:
                for layer, wqe, aqe in saved:
                    layer.quantize_weight = wqe
                    if layer.aq is not None:
                        layer.aq.enabled = aqe
            loss = nn.functional.binary_cross_entropy_with_logits(z, p_fp, reduction="sum")
            (g,) = torch.autograd.grad(loss, z_in)
            grads.append(g.pow(2))
            continue
        with quant_disabled(towers):
            with torch.no_grad():
                h = _run(layers, block_input(towers, tower, start, dense, emb))
            z_in = h.detach().requires_grad_(True)
            z = continue_forward(towers, tower, end, z_in, emb).reshape(-1)
            (dz,) = torch.autograd.grad(z.sum(), z_in)  # rows are independent: per-row dz/dZ
        sig = torch.sigmoid(z.detach())
        scale = sig * (1 - sig) if mode == "fisher" else (sig - y).pow(2)
        grads.append(dz.pow(2) * scale.unsqueeze(1))
    f = torch.cat(grads)
    f = f / f.mean().clamp_min(1e-30)
    return (f + damping) / (1.0 + damping)


# --- the passes --------------------------------------------------------------------------------
def _targets_and_inputs(towers, cache, tower, start, end):
    layers = _tower(towers, tower)[start : end + 1]
    with torch.no_grad():
        with quant_disabled(towers):
            target = _run(layers, block_input(towers, tower, start, cache.dense, cache.emb))
        x_in = block_input(towers, tower, start, cache.dense, cache.emb)
    return layers, x_in, target


def reconstruct_weights(
    towers: QuantizedDLRMTowers,
    cache: CalibrationCache,
    tower: str,
    start: int,
    end: int,
    fisher: torch.Tensor | None,
    iters: int,
    batch_size: int,
    lr: float,
    weight: float,
    warmup: float,
    b_range: tuple[float, float],
    p: float,
    generator: torch.Generator,
) -> dict:
    layers, x_in, target = _targets_and_inputs(towers, cache, tower, start, end)
    qlayers = [layer for layer in layers if layer.wq is not None]
    if not qlayers:
        return {"skipped": "no quantized weights"}
    rounders = [AdaRound(layer) for layer in qlayers]
    with torch.no_grad():
        for layer in qlayers:
            layer.codes = None
        out0 = _run(layers, x_in)  # round-to-nearest with the searched scales
        diff = out0 - target
        rec0 = float(
            (diff.pow(2) * fisher).sum(1).mean()
            if fisher is not None
            else diff.abs().pow(p).sum(1).mean()
        )
    rec_scale = max(rec0, 1e-12)
    for layer, r in zip(qlayers, rounders):
        layer.weight_fn = r.soft_weight
    opt = torch.optim.Adam([r.V for r in rounders], lr=lr)
    decay = LinearTempDecay(iters, rel_start=warmup, start_b=b_range[0], end_b=b_range[1])
    n = len(x_in)
    try:
        steps = progress_bar(range(1, iters + 1), desc="brecq block", unit="step", leave=False)
        for t in steps:
            idx = torch.randint(n, (min(batch_size, n),), generator=generator)
            out = _run(layers, x_in[idx])
            loss, _, _ = adaround_loss(
                out,
                target[idx],
                None if fisher is None else fisher[idx],
                rounders,
                t,
                iters,
                weight,
                warmup,
                decay,
                rec_scale,
                p,
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for layer in qlayers:
            layer.weight_fn = None
    with torch.no_grad():
        h_all = torch.cat([r.h().reshape(-1) for r in rounders])
        undecided = float(((h_all > 0.01) & (h_all < 0.99)).float().mean())
        flipped = 0
        for layer, r in zip(qlayers, rounders):
            codes = r.hard_codes()
            nearest = layer.wq.codes(layer.weight)
            flipped += int((codes != nearest).sum())
            layer.codes = codes
        out1 = _run(layers, x_in)
        diff = out1 - target
        rec1 = float(
            (diff.pow(2) * fisher).sum(1).mean()
            if fisher is not None
            else diff.abs().pow(p).sum(1).mean()
        )
        kept = rec1 <= rec0
        if not kept:  # learned rounding worse than nearest on the calibration rows: keep nearest
            for layer in qlayers:
                layer.codes = layer.wq.codes(layer.weight)
    return {
        "rec_nearest": rec0,
        "rec_adaround": rec1,
        "kept_adaround": kept,
        "undecided_share": round(undecided, 5),
        "changed_from_nearest": flipped if kept else 0,
        "weights": int(h_all.numel()),
    }


def reconstruct_acts(
    towers: QuantizedDLRMTowers,
    cache: CalibrationCache,
    tower: str,
    start: int,
    end: int,
    fisher: torch.Tensor | None,
    iters: int,
    batch_size: int,
    lr: float,
    p: float,
    generator: torch.Generator,
    alternatives: dict | None = None,
) -> dict:
    """Learn the step sizes of the block's input quantizers. `alternatives` maps a quantizer to
    candidate initial ranges {name: (lo, hi)}: each quantizer starts from the candidate that
    reconstructs the block best (greedily, in layer order)."""
    layers, x_in, target = _targets_and_inputs(towers, cache, tower, start, end)
    quantizers = [layer.aq for layer in layers if layer.aq is not None]
    if not quantizers:
        return {"skipped": "no activation quantizers"}

    def loss_of(out, tgt, f):
        diff = out - tgt
        return (diff.pow(2) * f).sum(1).mean() if f is not None else diff.abs().pow(p).sum(1).mean()

    chosen = {}
    with torch.no_grad():
        for layer in layers:
            q = layer.aq
            if q is None or not alternatives or q not in alternatives:
                continue
            best = None
            for name, (lo, hi) in alternatives[q].items():
                q.set_range(lo, hi)
                rec = float(loss_of(_run(layers, x_in), target, fisher))
                if best is None or rec < best[0]:
                    best = (rec, name, lo, hi)
            q.set_range(best[2], best[3])
            chosen[layer.name] = best[1]
        rec0 = float(loss_of(_run(layers, x_in), target, fisher))
    if iters <= 0:
        return {"init": chosen, "rec_init": rec0}
    saved = [q.scale.clone() for q in quantizers]
    params = [q.start_learning() for q in quantizers]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters, eta_min=0.0)
    n = len(x_in)
    try:
        for _ in range(iters):
            idx = torch.randint(n, (min(batch_size, n),), generator=generator)
            loss = loss_of(
                _run(layers, x_in[idx]), target[idx], None if fisher is None else fisher[idx]
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    finally:
        for q in quantizers:
            q.stop_learning()
    with torch.no_grad():
        rec1 = float(loss_of(_run(layers, x_in), target, fisher))
        kept = rec1 <= rec0
        if not kept:  # never keep step sizes worse than the Lp initialisation on the full set
            for q, s in zip(quantizers, saved):
                q.scale.copy_(s)
    return {"init": chosen, "rec_init": rec0, "rec_learned": rec1, "kept_learned": kept}


@torch.no_grad()
def init_scales(
    towers: QuantizedDLRMTowers,
    cache: CalibrationCache,
    p: float = 2.4,
    shrinks: int = 80,
    lp_values: int = 1 << 17,
    w_init: str = "lp",
    a_init: str = "lp",
) -> dict:
    """BRECQ's initial scales: best of `shrinks` shrinks (1 - 0.01 i) of min/max by Lp error
    ('lp', the reference), by the layer's output error on the calibration inputs ('output',
    weights only), or the min/max range itself ('minmax'). Activations are set to the Lp range
    ('lp' and 'best') or min/max; returns both candidate ranges of every activation quantizer."""
    if w_init not in ("lp", "output", "minmax"):
        raise ConfigError(f"BRECQ w_init must be 'output', 'lp' or 'minmax', got {w_init!r}.")
    if a_init not in ("lp", "minmax", "best"):
        raise ConfigError(f"BRECQ a_init must be 'best', 'lp' or 'minmax', got {a_init!r}.")
    grid = 1.0 - 0.01 * torch.arange(shrinks, dtype=torch.float32)
    grid_w = grid[:1] if w_init == "minmax" else grid
    with quant_disabled(towers):
        inputs = layer_inputs(towers, cache)
    candidates = {}
    for layer in towers.layers():
        if layer.wq is not None and w_init == "output":
            x = inputs[layer.name].double()
            gram = (x.T @ x / max(1, len(x))).float()
            layer.wq.set_range(*output_range(layer.weight, layer.wq.spec, gram, grid))
        elif layer.wq is not None:
            layer.wq.set_range(*lp_range(layer.weight, layer.wq.spec, p, grid_w))
        if layer.aq is not None:
            x = inputs[layer.name]
            mm = minmax_range(x)
            lp = lp_range(subsample(x, lp_values), layer.aq.spec, p, grid, base=mm)
            candidates[layer.aq] = {"lp": lp, "minmax": mm}
            layer.aq.set_range(*(mm if a_init == "minmax" else lp))
    return candidates


def run_brecq(
    towers: QuantizedDLRMTowers,
    cache: CalibrationCache,
    config: DenseQuantConfig,
    iters_w: int = 20000,
    iters_a: int = 5000,
    batch_size: int = 32,
    lr_w: float | None = None,
    lr_a: float = 4e-4,
    round_weight: float = 100.0,
    warmup: float = 0.2,
    b_range: tuple[float, float] = (20.0, 2.0),
    p: float = 2.4,
    blocks: str = "tower",
    fisher: str = "fisher",
    damping: float = 0.1,
    w_init: str = "output",
    a_init: str = "best",
    seed: int = 0,
) -> dict:
    """BRECQ on the towers (defaults = the reference's; scale the iterations down on CPU).

    Args:
        iters_w / iters_a: Adam steps per block for the rounding / the activation step sizes.
        batch_size: rows per step.
        lr_w / lr_a: Adam learning rates of V and of log(step size). lr_w defaults to the
            reference's 1e-3 at 20000 iterations, scaled up for fewer (1e-3 * 20000 / iters_w,
            at most 1e-2): V must be able to travel from its init to a hard 0/1 decision.
        round_weight: lambda of the rounding regulariser.
        warmup: share of iters_w without the regulariser; b_range: beta from, to.
        p: the Lp of the scale search (and of the loss when fisher='mse').
        blocks: 'tower' (bottom MLP, top MLP) or 'layer'.
        fisher: 'fisher', 'empirical', 'kl' or 'mse' (see the module doc).
        damping: added to the mean-1 Fisher weights.
        w_init: weight scale init, 'output' (default: the shrink minimising each channel's output
            error on the calibration inputs), 'lp' (the reference's weight Lp error) or 'minmax'.
        a_init: activation scale init: 'lp' (the reference: Lp-optimal clipping, p), 'minmax',
            or 'best' (default: per quantizer, whichever of the two reconstructs its block
            better; 8-bit inputs usually keep min/max, 4-bit ones clip).
    """
    if lr_w is None:
        lr_w = min(1e-2, 1e-3 * 20000 / max(1, iters_w))
    attach_quantizers(towers, cache, config)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    started = time.perf_counter()
    act_candidates = init_scales(towers, cache, p, w_init=w_init, a_init=a_init)
    block_list = _blocks(towers, blocks)
    record: dict = {
        "blocks": [f"{t}[{a}:{b + 1}]" for t, a, b in block_list],
        "fisher": fisher,
        "weight_pass": [],
        "act_pass": [],
    }
    # weights, activations off (the reference's first pass)
    acts_before = [
        (layer.aq, layer.aq.enabled) for layer in towers.layers() if layer.aq is not None
    ]
    towers.set_act_quant(False)
    for tower, a, b in block_list:
        f = fisher_weights(towers, cache, tower, a, b, fisher, damping)
        with single_thread():
            rec = reconstruct_weights(
                towers,
                cache,
                tower,
                a,
                b,
                f,
                iters_w,
                batch_size,
                lr_w,
                round_weight,
                warmup,
                b_range,
                p,
                gen,
            )
        record["weight_pass"].append({"block": f"{tower}[{a}:{b + 1}]", **_rounded(rec)})
    for q, enabled in acts_before:
        q.enabled = enabled
    # activation step sizes, everything quantized
    for tower, a, b in block_list:
        f = fisher_weights(towers, cache, tower, a, b, fisher, damping)
        with single_thread():
            rec = reconstruct_acts(
                towers,
                cache,
                tower,
                a,
                b,
                f,
                iters_a,
                batch_size,
                lr_a,
                p,
                gen,
                alternatives=act_candidates if a_init == "best" else None,
            )
        record["act_pass"].append({"block": f"{tower}[{a}:{b + 1}]", **_rounded(rec)})
    towers.freeze()
    record["search_seconds"] = round(time.perf_counter() - started, 2)
    record.update(
        iters_w=iters_w,
        iters_a=iters_a,
        batch_size=batch_size,
        lr_w=lr_w,
        lr_a=lr_a,
        w_init=w_init,
        a_init=a_init,
        round_weight=round_weight,
    )
    return record


def _rounded(d: dict) -> dict:
    return {
        k: (float(f"{v:.6g}") if isinstance(v, float) and math.isfinite(v) else v)
        for k, v in d.items()
    }
