"""SPARQ (Shomron et al., NeurIPS 2021): sparsity-aware activation windows on an 8-bit base.

The towers are calibrated at 8 bits (min/max ranges), then every activation quantizer outside
the first/last-layer policy keeps only an n-bit window of each 8-bit code (`embq.dense.core.
windows`: bSPARQ windows at the leading one, vSPARQ pairs that give a zero's budget to its
partner). Nothing is optimised: the windows are a run-time rule.
"""

from __future__ import annotations

from dataclasses import replace

from embq.dense.core.calibration import attach_quantizers, calibrate_minmax, logits
from embq.dense.core.windows import DEFAULT_OPTIONS, SparqSpec, SparqStats
from embq.errors import ConfigError


def run_sparq(
    towers,
    cache,
    config,
    options: int | None = None,
    rounding: str = "round",
    vsparq: bool = True,
    signed_mode: str = "sign-magnitude",
    act_observer: str = "minmax",
) -> dict:
    """SPARQ on the towers: an 8-bit base (weights at `config.w_bits`, activations 8-bit), then
    `config.a_bits`-bit windows on the activations of every layer outside the first/last policy
    (`config.a_bits == 8` is the plain base). Weights use the config's grid (default asymmetric
    per channel; the reference is symmetric per filter: pass w_symmetric=True). Returns the
    per-layer window statistics measured on the calibration rows.

    Args:
        options: window placements (default: 5 for 4-bit windows, 6 for 3-bit, 7 for 2-bit).
        rounding: 'round' or 'raw'.
        vsparq: pair activations (vSPARQ) or window every value alone (bSPARQ).
        signed_mode: how the signed top-MLP input is handled: 'sign-magnitude' or 'int8'.
        act_observer: 'minmax' or the reference's 'max_mean' 8-bit activation range.
    """
    bits = config.a_bits
    if bits not in (2, 3, 4, 8):
        raise ConfigError(
            f"SPARQ windows are 2, 3 or 4 bits over 8-bit activations (8 = the base), got {bits}."
        )
    base = replace(config, a_bits=8)
    attach_quantizers(towers, cache, base)
    calibrate_minmax(towers, cache, act_observer=act_observer)
    spec = None
    if bits < 8:
        spec = SparqSpec(
            bits=bits,
            options=options or DEFAULT_OPTIONS[bits],
            rounding=rounding,
            vsparq=vsparq,
            signed_mode=signed_mode,
        )
        for layer in towers.layers():
            if layer.aq is None or (
                layer.role in ("first", "last") and config.first_last != "same"
            ):
                continue
            layer.aq.sparq = spec
    towers.freeze()
    report: dict = {
        "window": spec.to_json() if spec else None,
        "name": spec.name if spec else "8-bit base",
        "act_observer": act_observer,
        "layers": {},
    }
    if spec is None:
        return report
    windowed = [
        layer for layer in towers.layers() if layer.aq is not None and layer.aq.sparq is not None
    ]
    for layer in windowed:
        layer.aq.sparq_stats = SparqStats()
    try:
        logits(towers, cache)
    finally:
        for layer in windowed:
            st = layer.aq.sparq_stats
            layer.aq.sparq_stats = None
            report["layers"][layer.name] = {
                k: (round(v, 5) if isinstance(v, float) else v)
                for k, v in st.summary(spec, layer.aq.spec.signed).items()
            }
            report["layers"][layer.name]["signed"] = layer.aq.spec.signed
    # overall, weighted by values
    vals = sum(r["values"] for r in report["layers"].values()) or 1
    pairs = sum(r["pairs"] for r in report["layers"].values()) or 1
    nz = sum(r["values"] * (1 - r["zero_share"]) for r in report["layers"].values()) or 1
    report["zero_pair_share"] = round(
        sum(r["zero_pair_share"] * r["pairs"] for r in report["layers"].values()) / pairs, 5
    )
    report["zero_share"] = round(
        sum(r["zero_share"] * r["values"] for r in report["layers"].values()) / vals, 5
    )
    report["effective_bits"] = round(
        sum(
            r["effective_bits"] * r["values"] * (1 - r["zero_share"])
            for r in report["layers"].values()
        )
        / nz,
        4,
    )
    report["exact_nonzero_share"] = round(
        sum(
            r["exact_nonzero_share"] * r["values"] * (1 - r["zero_share"])
            for r in report["layers"].values()
        )
        / nz,
        5,
    )
    report["signed_input"] = (
        f"signed inputs ({', '.join(layer.name for layer in windowed if layer.aq.spec.signed)}): "
        + (
            "int8 symmetric codes, windows on the 7-bit magnitude |q|, sign kept as one extra bit"
            if signed_mode == "sign-magnitude"
            else "kept at plain int8"
        )
    )
    return report
