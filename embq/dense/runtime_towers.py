"""Quantized dense towers (from `embq.dense`) as the runtime's inference modules.

The artifact's dense section holds `embq.dense.serialize.to_tensors` output with meta
{"kind": KIND, ...}. `load_towers` rebuilds TorchRec's DenseArch / OverArch and embq.runtime.DotInteraction
(scriptable, so TorchScript export works) with each layer's quantized weights:

- 8-bit weight codes run on fbgemm's int8 GEMM through torch's dynamic quantized Linear,
  holding exactly the stored codes, scales and zero points (activations are quantized per batch by
  the kernel, not with the calibrated activation scales);
- every other layer (4/2-bit, multipoint, fp32) runs as float32 with its dequantized weights.

Activation fake-quantization is a calibration-time simulation (`embq.dense`), not part of
serving: the runtime's towers reproduce the quantized weights, which is what saves bytes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

KIND = "embq-dense-ptq"


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def _int8_linear(layer: Any) -> nn.Module | None:
    """torch's dynamic int8 Linear (fbgemm GEMM) holding the layer's own 8-bit codes and scales,
    or None if the layer's weights are not 8-bit codes."""
    spec = layer.wq.spec if layer.wq is not None else None
    if spec is None or layer.codes is None or spec.bits != 8:
        return None
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    scale = layer.wq.scale.reshape(-1).double()
    zero = layer.wq.zero_point.reshape(-1)
    if not torch.equal(zero, zero.round()):
        return None
    # Affine codes live in [0, 255]: shift codes and zero points by 128 into qint8's range,
    # which leaves (code - zero_point) * scale, the weight, unchanged.
    shift = 0 if spec.kind == "symmetric" else 128
    codes = (layer.codes.round() - shift).to(torch.int8)
    zero = (zero.round() - shift).to(torch.int64)
    if spec.per_channel:
        qweight = torch._make_per_channel_quantized_tensor(
            codes, scale, zero.expand(codes.shape[0]).contiguous(), 0)
    else:
        qweight = torch._make_per_tensor_quantized_tensor(codes, float(scale[0]), int(zero[0]))
    linear = DynamicLinear(layer.in_features, layer.out_features, dtype=torch.qint8)
    linear.set_weight_bias(qweight, layer.bias.float())
    return linear


def _install(float_linears: list[nn.Linear], layers: list, owner: nn.Module,
             int8_kernels: bool) -> None:
    """Copy each layer's quantized weights into the float Linear at the same position, swapping
    in an int8 kernel where the codes allow."""
    if len(float_linears) != len(layers):
        from embq.errors import ArtifactError

        raise ArtifactError(f"The dense towers have {len(layers)} layers where the model config "
                            f"builds {len(float_linears)}.")
    parents = {id(child): (parent, name) for parent in owner.modules()
               for name, child in parent.named_children()}
    for linear, layer in zip(float_linears, layers):
        with torch.no_grad():
            linear.weight.copy_(layer.qweight())
            linear.bias.copy_(layer.bias)
        int8 = _int8_linear(layer) if int8_kernels else None
        if int8 is not None:
            parent, name = parents[id(linear)]
            setattr(parent, name, int8)


def load_towers(config, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                int8_kernels: bool = True):
    """`embq.runtime.DenseTowers` from a dense section written by `dense_section`; with
    `int8_kernels=False` every layer runs in float32 with its dequantized weights."""
    from torchrec.models.dlrm import DenseArch, OverArch, choose

    from embq.dense.serialize import from_tensors
    from embq.runtime import DenseTowers, DotInteraction

    towers = from_tensors(tensors, {k: v for k, v in meta.items() if k != "kind"})
    for layer in (*towers.bottom, *towers.top):
        if layer.wq is not None and layer.codes is None:
            layer.freeze()
    n = len(config.sparse_feature_names)
    dense_arch = DenseArch(config.dense_in_features, list(config.dense_arch))
    over_arch = OverArch(config.embedding_dim + choose(n, 2) + n, list(config.over_arch))
    _install(_linears(dense_arch), list(towers.bottom), dense_arch, int8_kernels)
    _install(_linears(over_arch), list(towers.top), over_arch, int8_kernels)
    return DenseTowers(dense_arch.eval(), DotInteraction(num_sparse_features=n), over_arch.eval())


def dense_section(towers) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) for `ArtifactWriter.add_dense` from quantized towers."""
    from embq.dense.serialize import to_tensors

    tensors, meta = to_tensors(towers)
    return tensors, {"kind": KIND, **meta}
