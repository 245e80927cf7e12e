"""The dense towers of an artifact as inference modules, built by the loader of their kind.

The artifact's dense section carries meta {"kind": ...}:

- "fp32": TorchRec's DenseArch / OverArch with the float state dict;
- "embq-dense-ptq": towers quantized by `embq.dense` (`embq.dense.serialize.to_tensors`). 8-bit
  weight codes run on fbgemm's int8 GEMM through torch's dynamic quantized Linear, holding
  exactly the stored codes, scales and zero points (activations are quantized per batch by the
  kernel, not with the calibrated activation scales); every other layer (4/2-bit, multipoint,
  fp32) runs as float32 with its dequantized weights.

Both get `DotInteraction` (TorchRec's InteractionArch, faster) and are scriptable, so TorchScript
export works. Other kinds register a loader with `register_dense_loader`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from embq.dense.serialize import DENSE_KIND_PTQ, from_tensors
from embq.errors import ArtifactError
from embq.models.dlrm import DLRMConfig
from embq.runtime.dlrm import DenseTowers, DotInteraction

DenseLoader = Callable[[DLRMConfig, dict[str, torch.Tensor], dict[str, Any]], DenseTowers]


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


def load_ptq_towers(config: DLRMConfig, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                    int8_kernels: bool = True) -> DenseTowers:  # fmt: skip
    """`DenseTowers` from a dense section of kind "embq-dense-ptq"; with `int8_kernels=False`
    every layer runs in float32 with its dequantized weights."""
    from torchrec.models.dlrm import DenseArch, OverArch, choose

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


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_fp32_towers(
    config: DLRMConfig, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> DenseTowers:
    """TorchRec's DenseArch / OverArch with the float state dict loaded, and `DotInteraction`
    (TorchRec's InteractionArch, faster)."""
    from torchrec.models.dlrm import DenseArch, OverArch, choose

    n = len(config.sparse_feature_names)
    towers = DenseTowers(
        DenseArch(config.dense_in_features, list(config.dense_arch)),
        DotInteraction(num_sparse_features=n),
        OverArch(config.embedding_dim + choose(n, 2) + n, list(config.over_arch)),
    )
    expected = {f"{name}.{k}" for name, m in towers._asdict().items() for k in m.state_dict()}
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ArtifactError(
            f"dense.safetensors does not match the DLRM config: missing {missing}, "
            f"unexpected {unexpected}"
        )
    for name, module in towers._asdict().items():
        module.load_state_dict(
            {k: v.float() for k, v in _strip(tensors, f"{name}.").items()}, strict=True
        )
        module.eval()
    return towers


# meta "kind" -> the loader of towers stored that way. The one dispatch table.
DENSE_LOADERS: dict[str, DenseLoader] = {
    "fp32": load_fp32_towers,
    DENSE_KIND_PTQ: load_ptq_towers,
}


def register_dense_loader(kind: str) -> Callable[[DenseLoader], DenseLoader]:
    """Register the builder of dense towers stored with meta {"kind": kind} (a decorator).

    A loader takes (config, dense tensors by name, meta) and returns `DenseTowers` of scriptable
    modules.
    """

    def register(fn: DenseLoader) -> DenseLoader:
        DENSE_LOADERS[kind] = fn
        return fn

    return register


def load_dense_towers(
    config: DLRMConfig, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> DenseTowers:
    """Build the dense towers with the loader registered for meta["kind"]."""
    kind = meta.get("kind")
    loader = DENSE_LOADERS.get(kind) if isinstance(kind, str) else None
    if loader is None:
        raise ArtifactError(
            f"the artifact's dense towers are stored as kind {kind!r}, which this embq cannot load "
            f"(known kinds: {sorted(DENSE_LOADERS)}); upgrade embq or re-create the artifact"
        )
    return loader(config, tensors, meta)
