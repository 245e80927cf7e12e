"""Which CPU kernel serves each quantized dense layer, decided from its stored description alone.

`embq.dense.serialize` writes the answer into the artifact's dense meta (one "serving" entry per
layer) and `embq.runtime.dense_towers` builds the layer it names, so the artifact says what runs:

- "fbgemm-int8-static": uniform weight codes of 2..8 bits and an input quantizer of 2..8 bits
  (SPARQ windows included: they only change the codes). fbgemm's int8 GEMM with the calibrated,
  static input scale and zero point (`quantized::linear_with_input_q_dq_qweight_dq_output_fp32`:
  uint8 input codes, int8 per-channel weight codes, int32 accumulation, float32 output with the
  bias). Codes narrower than 8 bits are a subset of the int8 / uint8 grids, so the integer
  arithmetic is the calibrated one; no CPU kernel multiplies 2..7-bit codes, so the weights are
  stored packed at their width and widened to int8 at load ("runtime_weight_bits": 8).
- "dequantized-fp32": multipoint weights, weights without an input quantizer (A32), or an input
  quantizer without quantized weights: float32 GEMM on the dequantized weights, the input
  quantizer (if any) applied in float32 exactly as calibrated.
- "fp32": a layer left unquantized.

This module imports neither numpy nor torch.
"""

from __future__ import annotations

from typing import Any

INT8_STATIC = "fbgemm-int8-static"
DEQUANTIZED_FP32 = "dequantized-fp32"
FP32 = "fp32"
KERNELS = (INT8_STATIC, DEQUANTIZED_FP32, FP32)


def layer_serving(weight: dict[str, Any], act: dict[str, Any] | None,
                  out_features: int, in_features: int) -> dict[str, Any]:  # fmt: skip
    """The "serving" entry of one layer from its dense-meta "weight" and "act" entries.

    Returns {"kernel", "weight_bits" (as stored), "runtime_weight_bits" (as multiplied: 8 on the
    int8 kernel, 32 otherwise), "act_bits" (32 = none), "runtime_bytes" (the served layer's
    weights, bias and per-channel parameters at their runtime widths, bytes; fbgemm's packed
    layout pads this a little)}.
    """
    kind = weight.get("kind")
    w_bits = 32 if kind == FP32 else int(weight["spec"]["bits"] if kind == "uniform" else weight["bits"])
    act_on = bool(act) and act.get("enabled", True)
    a_bits = int(act["spec"]["bits"]) if act_on else 32
    if kind == "uniform" and w_bits <= 8 and a_bits <= 8:
        kernel, runtime_bits = INT8_STATIC, 8
    elif kind == FP32 and not act_on:
        kernel, runtime_bits = FP32, 32
    else:
        kernel, runtime_bits = DEQUANTIZED_FP32, 32
    weight_bytes = out_features * in_features * runtime_bits // 8
    # int8 layers also keep a float32 scale, an int32 zero point and a column sum per channel
    extra = 12 * out_features if kernel == INT8_STATIC else 0
    return {
        "kernel": kernel,
        "weight_bits": w_bits,
        "runtime_weight_bits": runtime_bits,
        "act_bits": a_bits,
        "runtime_bytes": weight_bytes + 4 * out_features + extra,
    }
