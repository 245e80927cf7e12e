"""The one entry point: `quantize(model, method, w_bits, a_bits, calib)` and the method registry.

Example:
    from embq.dense import quantize
    towers = quantize(model, method="brecq", w_bits=4, a_bits=8, calib=data.batches(0, 4096))
    logits = towers(batch.dense, batch.sparse)          # like the DLRM, towers quantized
    towers.info["report"]                               # what the method did, and how long
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable

import torch

from embq.dense.core.calibration import CalibrationCache, DenseQuantConfig, bce, plan_report
from embq.dense.core.fakequant import QuantizedDLRMTowers
from embq.dense.methods.brecq import run_brecq
from embq.dense.methods.lapq import run_lapq
from embq.dense.methods.multipoint import run_multipoint
from embq.dense.methods.rtn import run_rtn
from embq.dense.methods.sparq import run_sparq
from embq.errors import ConfigError

#: name -> runner(towers, cache, config, **options) -> report dict
METHODS: dict[str, Callable[..., dict]] = {
    "rtn": run_rtn,
    "lapq": run_lapq,
    "brecq": run_brecq,
    "multipoint": run_multipoint,
    "sparq": run_sparq,
}

_CONFIG_KEYS = ("w_per_channel", "w_symmetric", "a_symmetric", "first_last", "layer_bits")


def quantize(
    model: torch.nn.Module,
    method: str = "rtn",
    w_bits: int = 8,
    a_bits: int = 8,
    calib: Iterable | CalibrationCache | None = None,
    *,
    calib_rows: int | None = 4096,
    config: DenseQuantConfig | None = None,
    seed: int = 0,
    **options,
) -> QuantizedDLRMTowers:
    """Post-training quantization of a TorchRec DLRM's bottom and top MLPs.

    Args:
        model: a `torchrec.models.dlrm.DLRM` (left unchanged).
        method: 'rtn', 'lapq', 'brecq', 'multipoint' or 'sparq'.
        w_bits, a_bits: weight / activation bits (32 = fp32). For SPARQ, a_bits is the window
            width over the 8-bit activations (8 = the plain 8-bit base).
        calib: calibration batches (objects with .dense, .sparse KJT and .labels, e.g.
            `PreparedData.batches(...)`), or a `CalibrationCache`.
        calib_rows: use at most this many calibration rows (None = all).
        config: grids and the first/last-layer policy; or pass its fields (w_per_channel,
            w_symmetric, a_symmetric, first_last) as keywords.
        seed: seed of the methods' random mini-batches.
        options: method options (see `run_<method>`).

    Returns:
        `QuantizedDLRMTowers`, called like the DLRM; `.info` holds the config, the per-layer
        plan, the method's report, the calibration BCE and the run time in seconds.
    """
    if method not in METHODS:
        raise ConfigError(f"Unknown dense method {method!r}; choose one of {sorted(METHODS)}.")
    if calib is None:
        raise ConfigError("quantize() needs calibration data: calib=<batches or CalibrationCache>.")
    cfg_over = {k: options.pop(k) for k in _CONFIG_KEYS if k in options}
    if config is None:
        config = DenseQuantConfig(w_bits=w_bits, a_bits=a_bits, **cfg_over)
    elif cfg_over or (w_bits, a_bits) != (config.w_bits, config.a_bits):
        from dataclasses import replace

        config = replace(config, w_bits=w_bits, a_bits=a_bits, **cfg_over)
    started = time.perf_counter()
    cache = CalibrationCache.from_batches(model, calib, calib_rows)
    towers = QuantizedDLRMTowers.from_model(model)
    torch.manual_seed(seed)
    fn = METHODS[method]
    accepted = list(inspect.signature(fn).parameters)[3:]
    if "seed" in accepted:  # methods with random choices (BRECQ's batches, LAPQ's split)
        options.setdefault("seed", seed)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"Method {method!r} has no option {', '.join(unknown)}; its options are {accepted}."
        )
    report = fn(towers, cache, config, **options)
    towers.freeze()
    towers.info = {
        "method": method,
        "w_bits": w_bits,
        "a_bits": a_bits,
        "tag": config.tag,
        "calib_rows": len(cache),
        "calib_bce": bce(towers, cache),
        "seconds": round(time.perf_counter() - started, 2),
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()},
        "plan": plan_report(towers, config),
        "report": report,
    }
    return towers
