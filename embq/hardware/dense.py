"""Dense layers in the plan: each Linear of the bottom and top MLPs gets one of the dense
kernels the target offers. Sensitivity is measured one layer at a time (round-to-nearest at the
kernel's weight / activation bits, the other layers fp32, `embq.dense`'s calibration cache);
bytes are what the artifact stores (packed codes at the kernel's stored bits, per-channel scale
and zero point, bias; fp32 weights otherwise); cost is the spec's per-layer model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from embq.dense.configs import DenseConfig
from embq.hardware.spec import DenseKernel, HardwareSpec


@dataclass(frozen=True)
class DenseLayer:
    """One Linear of the towers, named as `embq.dense` names it ("bottom.0", "top.2")."""

    name: str
    in_features: int
    out_features: int


def dense_layers(model: Any) -> list[DenseLayer]:
    """The DLRM's dense layers, bottom then top."""
    from embq.dense.core.fakequant import QuantizedDLRMTowers

    towers = QuantizedDLRMTowers.from_model(model)
    return [DenseLayer(q.name, q.in_features, q.out_features) for q in towers.layers()]


def layer_bytes(layer: DenseLayer, kernel: DenseKernel) -> int:
    """Bytes the artifact stores for the layer under `kernel` (`embq.dense.serialize`): fp32
    weight and bias, or packed codes plus fp32 per-channel scale and zero point, the bias, and
    an input scale and zero point when activations are quantized."""
    weights = layer.in_features * layer.out_features
    act = 8 if kernel.a_bits != 32 else 0
    if kernel.w_bits == 32:
        return 4 * weights + 4 * layer.out_features + act
    codes = -(-weights * kernel.stored_bits // 8)
    return codes + 12 * layer.out_features + act


def dense_sensitivity(model: Any, batches: Iterable, spec: HardwareSpec,
                      progress: bool = True) -> dict[str, dict[str, float]]:  # fmt: skip
    """{layer: {dense kernel: increase of the calibration BCE (nats)}}: each layer quantized
    alone with RTN at the kernel's bits (min / max ranges, per-channel weights)."""
    from tqdm import tqdm

    from embq.dense.api import quantize
    from embq.dense.core.calibration import CalibrationCache, bce
    from embq.dense.core.fakequant import QuantizedDLRMTowers

    cache = CalibrationCache.from_batches(model, batches)
    base = bce(QuantizedDLRMTowers.from_model(model), cache)
    layers = dense_layers(model)
    out: dict[str, dict[str, float]] = {}
    for layer in tqdm(layers, desc="dense sensitivity", unit="layer", disable=not progress):
        out[layer.name] = {}
        for kernel in spec.dense_kernels.values():
            if kernel.w_bits == 32 and kernel.a_bits == 32:
                out[layer.name][kernel.name] = 0.0
                continue
            bits = {other.name: [32, 32] for other in layers}
            bits[layer.name] = [kernel.w_bits, kernel.a_bits]
            towers = quantize(model, "rtn", 8, 8, calib=cache, calib_rows=None, layer_bits=bits)
            out[layer.name][kernel.name] = bce(towers, cache) - base
    return out


def dense_config(choices: dict[str, DenseKernel]) -> DenseConfig | None:
    """The plan's dense spec for {layer: kernel}: RTN with every layer's bits set; None when
    every layer stays fp32."""
    if all(k.w_bits == 32 and k.a_bits == 32 for k in choices.values()):
        return None
    bits = {name: [k.w_bits, k.a_bits] for name, k in choices.items()}
    return DenseConfig("rtn", 8, 8, (("layer_bits", bits),))
