"""The dense towers of an artifact as inference modules, built by the loader of their kind.

The artifact's dense section carries meta {"kind": ...}:

- "fp32": TorchRec's DenseArch / OverArch with the float state dict;
- "embq-dense-ptq": towers quantized by `embq.dense` (`embq.dense.serialize.to_tensors`), served
  as calibrated: each layer runs on the kernel its meta names (`embq.dense.kernels`; computed
  for version-1 meta, which named none): "fbgemm-int8-static" layers on fbgemm's int8 GEMM with
  their stored weight codes and their calibrated static input scale and zero point
  (`embq.runtime.dense_layers.Int8StaticLinear`), "dequantized-fp32" layers in float32 with
  their dequantized weights and their input quantizer applied as simulated.

Both get `DotInteraction` (TorchRec's InteractionArch, faster) and are scriptable, so TorchScript
export works. Other kinds register a loader with `register_dense_loader`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from embq.dense.core.quantizers import kernel_shift
from embq.dense.kernels import INT8_STATIC, KERNELS, layer_serving
from embq.dense.serialize import DENSE_KIND_PTQ, from_tensors
from embq.errors import ArtifactError
from embq.models.dlrm import DLRMConfig
from embq.runtime.dense_layers import (
    FakeQuantInput,
    FloatLinear,
    InputClamp,
    Int8StaticLinear,
    SparqWindows,
)
from embq.runtime.dlrm import DenseTowers, DotInteraction

DenseLoader = Callable[[DLRMConfig, dict[str, torch.Tensor], dict[str, Any]], DenseTowers]
#: quantized engines whose Linear prepacking is fbgemm's (the int8 layers need its kernel)
FBGEMM_ENGINES = ("x86", "fbgemm")


def int8_kernels_available() -> bool:
    """Whether torch's current quantized engine packs Linear weights for fbgemm."""
    return torch.backends.quantized.engine in FBGEMM_ENGINES


def _input_module(aq: Any) -> nn.Module:
    """The layer's calibrated input quantizer as a float32 module (nn.Identity when none)."""
    if aq is None or not aq.enabled:
        return nn.Identity()
    windows: nn.Module = nn.Identity()
    sparq = aq.sparq
    if sparq is not None and not (aq.spec.signed and sparq.signed_mode == "int8"):
        from embq.dense.core.windows import window_table

        windows = SparqWindows(window_table(sparq.bits, sparq.options, sparq.rounding),
                               window_table(min(8, 2 * sparq.bits), sparq.pair_options,
                                            sparq.rounding),
                               sparq.vsparq, aq.spec.signed)  # fmt: skip
    return FakeQuantInput(aq.scale, aq.zero_point, aq.spec.qmin, aq.spec.qmax,
                          kernel_shift(aq.spec), windows)  # fmt: skip


def _integral(t: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.equal(t, t.round()):
        raise ArtifactError(f"{name} holds non-integer zero points; the artifact is corrupt")
    return t.round().to(torch.int64)


def _int8_layer(layer: Any) -> Int8StaticLinear:
    """`Int8StaticLinear` holding the layer's stored codes, scales, zero points and bias."""
    spec, aq = layer.wq.spec, layer.aq
    # weight codes -> int8: asymmetric b-bit grids 0..2^b-1 shift by 2^(b-1), zero points alike
    w_shift = 0 if spec.kind == "symmetric" else 2 ** (spec.bits - 1)
    codes = _integral(layer.codes, f"{layer.name} weight codes") - w_shift
    w_zp = _integral(layer.wq.zero_point.reshape(-1), f"{layer.name} weight") - w_shift
    # input codes -> uint8: signed grids (qmin < 0) move up by 128, zero point alike
    a_shift = kernel_shift(aq.spec)
    a_zp = int(_integral(aq.zero_point.reshape(-1), f"{layer.name} input")[0])
    if (int(codes.min()) < -128 or int(codes.max()) > 127 or not 0 <= a_zp + a_shift <= 255
            or int(w_zp.min()) < -128 or int(w_zp.max()) > 127):  # fmt: skip
        raise ArtifactError(f"{layer.name}: codes or zero points outside the int8 kernel's range")
    scale = layer.wq.scale.reshape(-1).double()
    with warnings.catch_warnings():
        # torch 2.13 deprecates creating quantized tensors; prepacking still takes one, and
        # nothing quantized is created at inference (the kernel takes float inputs)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        int8 = codes.to(torch.int8)
        if spec.per_channel:
            qweight = torch._make_per_channel_quantized_tensor(int8, scale, w_zp, 0)
        else:
            qweight = torch._make_per_tensor_quantized_tensor(int8, float(scale[0]), int(w_zp[0]))
        packed = torch.ops.quantized.linear_prepack(qweight, layer.bias.float().contiguous())
    s = float(aq.scale.reshape(-1)[0])
    if aq.sparq is not None:
        pre = _input_module(aq)  # windows change the codes; the kernel re-quantizes them exactly
    elif aq.spec.qmin + a_shift > 0 or aq.spec.qmax + a_shift < 255:
        pre = InputClamp((aq.spec.qmin - a_zp) * s, (aq.spec.qmax - a_zp) * s)
    else:
        pre = nn.Identity()
    return Int8StaticLinear(packed, s, a_zp + a_shift, layer.relu, pre, layer.in_features,
                            layer.out_features)  # fmt: skip


def serve_layer(layer: Any, kernel: str, int8_kernels: bool = True) -> nn.Module:
    """The served module of one quantized layer (`embq.dense`'s QuantLinear, codes frozen) on
    `kernel` ("fbgemm-int8-static" runs `Int8StaticLinear` when `int8_kernels`; everything else,
    and int8 layers without int8 kernels, a `FloatLinear` computing what the simulation does)."""
    if kernel == INT8_STATIC and int8_kernels:
        return _int8_layer(layer)
    return FloatLinear(layer.qweight().detach(), layer.bias, layer.relu, _input_module(layer.aq))


def _layer_kernels(meta: dict[str, Any]) -> list[str]:
    """The kernel of every layer in meta order: as stored (version 2), else as decided now;
    ArtifactError for a kernel this embq does not know or one the layer cannot run on."""
    kernels = []
    for entry in meta.get("layers", []):
        try:
            want = layer_serving(entry["weight"], entry.get("act"), int(entry["out"]),
                                 int(entry["in"]))["kernel"]  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"Invalid dense-tower metadata: {exc!r}") from exc
        stored = (entry.get("serving") or {}).get("kernel", want)
        if stored not in KERNELS or stored != want:
            raise ArtifactError(
                f"dense layer {entry.get('name')!r} names kernel {stored!r}; its weights and input "
                f"run on {want!r} (kernels this embq knows: {list(KERNELS)})"
            )
        kernels.append(stored)
    return kernels


def _check_dims(layers: list, first_in: int, widths: list[int], what: str) -> None:
    dims = [first_in, *widths]
    got = [(layer.in_features, layer.out_features) for layer in layers]
    want = list(zip(dims[:-1], dims[1:]))
    if got != want:
        raise ArtifactError(f"The dense towers' {what} layers are {got}; the model config "
                            f"builds {want}.")  # fmt: skip


def load_ptq_towers(config: DLRMConfig, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                    int8_kernels: bool = True) -> DenseTowers:  # fmt: skip
    """`DenseTowers` from a dense section of kind "embq-dense-ptq", every layer on the kernel its
    meta names; `int8_kernels=False` (or a quantized engine without fbgemm) runs the
    "fbgemm-int8-static" layers in float32 with their quantizers simulated instead."""
    from torchrec.models.dlrm import choose

    plain = {k: v for k, v in meta.items() if k != "kind"}
    kernels = _layer_kernels(plain)
    towers = from_tensors(tensors, plain)
    layers = [*towers.bottom, *towers.top]
    for layer in layers:
        if layer.wq is not None and layer.codes is None:
            layer.freeze()
    n = len(config.sparse_feature_names)
    _check_dims(list(towers.bottom), config.dense_in_features, list(config.dense_arch), "bottom")
    _check_dims(list(towers.top), config.embedding_dim + choose(n, 2) + n, list(config.over_arch),
                "top")  # fmt: skip
    use_int8 = int8_kernels and int8_kernels_available()
    if int8_kernels and not use_int8 and INT8_STATIC in kernels:
        warnings.warn(
            f"torch's quantized engine is {torch.backends.quantized.engine!r}, not fbgemm's "
            f"({' or '.join(FBGEMM_ENGINES)}): the dense layers meant for fbgemm's int8 kernel "
            "run in float32 with their quantizers simulated",
            stacklevel=2,
        )
    served = [serve_layer(layer, k, use_int8) for layer, k in zip(layers, kernels)]
    nb = len(towers.bottom)
    return DenseTowers(nn.Sequential(*served[:nb]).eval(), DotInteraction(num_sparse_features=n),
                       nn.Sequential(*served[nb:]).eval())  # fmt: skip


def dense_layer_kernels(meta: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """Per layer of a PTQ dense section: {name, kernel, weight_bits, runtime_weight_bits, act_bits,
    runtime_bytes}, as stored (version 2) or as the runtime decides (version 1); None for other
    kinds."""
    if not meta or meta.get("kind") != DENSE_KIND_PTQ:
        return None
    out = []
    for entry, kernel in zip(meta.get("layers", []), _layer_kernels(meta)):
        serving = entry.get("serving") or layer_serving(entry["weight"], entry.get("act"),
                                                        int(entry["out"]), int(entry["in"]))
        out.append({"name": entry.get("name"), **serving, "kernel": kernel})
    return out


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
