"""Quantized towers <-> tensors + JSON, without pickle.

`to_tensors(towers) -> (tensors, meta)`: a flat dict of tensors (safetensors-ready) and a JSON
meta dict; `from_tensors(tensors, meta, model=None)` rebuilds the towers (attach the DLRM's
embeddings by passing the model). These plug into the artifact writer
(`ArtifactWriter.add_dense(tensors, meta)`); `save_quantized` / `load_quantized` are the
standalone form: a directory with `dense.safetensors` and `dense.json` (with the tensor file's
sha256), written atomically.

Per layer `<tower>.<i>.`:
    bias                      fp32 [out]
    weight                    fp32 [out, in]             (layers left fp32)
    weight_codes              uint8, packed   (uniform: codes - qmin, row-major, as one LSB-first
                                               bit stream of b-bit codes: 2-bit codes 4 per byte,
                                               4-bit 2 per byte, element 0 in the low bits; 3-bit
                                               codes cross byte boundaries; 8-bit one per byte)
    weight_scale, weight_zero_point   fp32 [rows]
    point_codes               uint8, packed              (multipoint: codes + 2^(b-1))
    point_scales fp32 [P], point_channel int32 [P]
    act_scale, act_zero_point fp32 [1]                   (input quantizer)

Meta version 2 (this layout) adds each layer's "serving" entry (`embq.dense.kernels`: the kernel
the runtime runs it on, the stored and the multiplied bit widths). Version 1 stored 3/5/6/7-bit
codes one per byte and had no "serving" entries; it is still read (`READ_VERSIONS`), and
`from_tensors` records the version it read in `towers.info["dense_format_version"]`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from embq.dense.core.fakequant import (
    ActQuantizer,
    QuantizedDLRMTowers,
    QuantLinear,
    WeightQuantizer,
)
from embq.dense.core.quantizers import QuantSpec
from embq.dense.kernels import layer_serving
from embq.dense.methods.multipoint import MultipointLinear
from embq.embedding.packing import pack_bitstream, unpack_bitstream
from embq.errors import ArtifactError, ConfigError
from embq.files import staged_directory

FORMAT, VERSION = "embq-dense", 2
READ_VERSIONS = (1, 2)  # dense meta versions from_tensors reads
DENSE_KIND_PTQ = "embq-dense-ptq"  # the artifact's dense meta "kind" of towers from embq.dense
TENSORS_FILE, META_FILE = "dense.safetensors", "dense.json"


def pack_codes(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes < 2^bits -> flat uint8: one LSB-first bit stream of b-bit codes
    (`embq.embedding.packing.pack_bitstream`; for 1/2/4 bits the layout of the row formats),
    8-bit codes one per byte."""
    flat = u.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ConfigError(f"codes out of the {bits}-bit range")
    if bits >= 8:
        return flat.to(torch.uint8)
    return torch.from_numpy(pack_bitstream(flat.to(torch.uint8).numpy(), bits))


def unpack_codes(p: torch.Tensor, bits: int, numel: int, version: int = VERSION) -> torch.Tensor:
    """Inverse of `pack_codes`: the first `numel` codes, int64. `version` 1 reads that layout
    (1/2/4-bit codes in the same bit stream, other widths one per byte). The packed size must be
    exactly what `pack_codes` writes for `numel` codes of `bits` (a bit width edited in the
    metadata would otherwise read other codes silently)."""
    p = p.reshape(-1).to(torch.uint8)
    one_per_byte = bits >= 8 or (version == 1 and bits not in (1, 2, 4))
    expected = numel if one_per_byte else -(-numel * bits // 8)
    if p.numel() != expected:
        raise ArtifactError(
            f"packed {bits}-bit codes of {numel} values take {expected} bytes, but the tensor "
            f"holds {p.numel()}: the codes and the bit width in the metadata disagree"
        )
    if one_per_byte:
        out = p.to(torch.int64)
    elif p.numel() * 8 < numel * bits:
        raise ArtifactError(f"packed codes hold {p.numel() * 8 // bits} values, expected {numel}")
    else:
        out = torch.from_numpy(unpack_bitstream(p.numpy(), bits, numel)).to(torch.int64)
    if out.numel() < numel:
        raise ArtifactError(f"packed codes hold {out.numel()} values, expected {numel}")
    return out[:numel]


def _json_safe(obj):
    return json.loads(
        json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    )


def to_tensors(towers: QuantizedDLRMTowers) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) describing the quantized towers exactly."""
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for tower_name, tower in (("bottom", towers.bottom), ("top", towers.top)):
        for i, layer in enumerate(tower):
            key = f"{tower_name}.{i}."
            entry: dict = {
                "name": layer.name,
                "tower": tower_name,
                "index": i,
                "role": layer.role,
                "in": layer.in_features,
                "out": layer.out_features,
                "relu": layer.relu,
            }
            tensors[key + "bias"] = layer.bias.detach().float().contiguous()
            if isinstance(layer, MultipointLinear):
                bits = layer.bits
                u = (layer.point_codes + 2 ** (bits - 1)).round().to(torch.int64)
                tensors[key + "point_codes"] = pack_codes(u, bits)
                tensors[key + "point_scales"] = layer.point_scales.float().contiguous()
                tensors[key + "point_channel"] = layer.point_channel.to(torch.int32).contiguous()
                entry["weight"] = {"kind": "multipoint", "bits": bits, "points": layer.points}
            elif layer.wq is not None:
                layer.freeze()
                spec = layer.wq.spec
                u = (layer.codes - spec.qmin).round().to(torch.int64)
                tensors[key + "weight_codes"] = pack_codes(u, spec.bits)
                tensors[key + "weight_scale"] = layer.wq.scale.reshape(-1).float().contiguous()
                tensors[key + "weight_zero_point"] = (
                    layer.wq.zero_point.reshape(-1).float().contiguous()
                )
                entry["weight"] = {"kind": "uniform", "spec": spec.to_json()}
            else:
                tensors[key + "weight"] = layer.weight.detach().float().contiguous()
                entry["weight"] = {"kind": "fp32"}
            if layer.aq is not None:
                tensors[key + "act_scale"] = layer.aq.scale.reshape(1).float().contiguous()
                tensors[key + "act_zero_point"] = (
                    layer.aq.zero_point.reshape(1).float().contiguous()
                )
                entry["act"] = {
                    "spec": layer.aq.spec.to_json(),
                    "enabled": bool(layer.aq.enabled),
                    "sparq": layer.aq.sparq.to_json() if layer.aq.sparq is not None else None,
                }
            else:
                entry["act"] = None
            entry["serving"] = layer_serving(entry["weight"], entry["act"], layer.out_features,
                                             layer.in_features)  # fmt: skip
            layers.append(entry)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "num_sparse_features": towers.num_sparse_features,
        "layers": layers,
        "info": _json_safe(towers.info),
    }
    return tensors, meta


def _need(tensors: dict, key: str, shape: tuple | None = None) -> torch.Tensor:
    if key not in tensors:
        raise ArtifactError(f"dense tensors lack {key!r}; the file is incomplete or not from embq.")
    t = tensors[key]
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ArtifactError(
            f"dense tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}."
        )
    return t


def from_tensors(
    tensors: dict[str, torch.Tensor], meta: dict, model: torch.nn.Module | None = None
) -> QuantizedDLRMTowers:
    """Rebuild quantized towers from `to_tensors` output; `model` (a DLRM) supplies embeddings."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ArtifactError(f"Not embq dense-tower metadata (format {found!r}).")
    version = meta.get("version")
    if version not in READ_VERSIONS:
        raise ArtifactError(
            f"Unknown embq dense format version {version!r}; this embq reads versions "
            f"{', '.join(map(str, READ_VERSIONS))} (writes {VERSION}): upgrade embq or re-create "
            "the artifact."
        )
    from embq.dense.core.windows import SparqSpec

    towers_layers: dict[str, list[QuantLinear]] = {"bottom": [], "top": []}
    try:
        for entry in meta["layers"]:
            key = f"{entry['tower']}.{entry['index']}."
            out_f, in_f = int(entry["out"]), int(entry["in"])
            bias = _need(tensors, key + "bias", (out_f,)).float()
            w = entry["weight"]
            if w["kind"] == "fp32":
                layer = QuantLinear(
                    _need(tensors, key + "weight", (out_f, in_f)),
                    bias,
                    entry["relu"],
                    entry["name"],
                    entry["role"],
                )
            elif w["kind"] == "uniform":
                spec = QuantSpec.from_json(w["spec"])
                rows = out_f if spec.per_channel else 1
                scale = _need(tensors, key + "weight_scale", (rows,)).float()
                zp = _need(tensors, key + "weight_zero_point", (rows,)).float()
                codes = unpack_codes(
                    _need(tensors, key + "weight_codes"), spec.bits, out_f * in_f, version
                ).float()
                codes = codes.reshape(out_f, in_f) + spec.qmin
                wq = WeightQuantizer(spec, out_f)
                wq.scale.copy_(scale.reshape(-1, 1))
                wq.zero_point.copy_(zp.reshape(-1, 1))
                layer = QuantLinear(
                    (codes - wq.zero_point) * wq.scale,
                    bias,
                    entry["relu"],
                    entry["name"],
                    entry["role"],
                )
                layer.wq = wq
                layer.codes = codes
            elif w["kind"] == "multipoint":
                bits, points = int(w["bits"]), int(w["points"])
                scales = _need(tensors, key + "point_scales", (points,)).float()
                channel = _need(tensors, key + "point_channel", (points,)).long()
                if points and (int(channel.min()) < 0 or int(channel.max()) >= out_f):
                    raise ArtifactError(
                        f"{key}point_channel points outside the layer's {out_f} channels."
                    )
                codes = unpack_codes(
                    _need(tensors, key + "point_codes"), bits, points * in_f, version
                ).float()
                codes = codes.reshape(points, in_f) - 2 ** (bits - 1)
                w_hat = torch.zeros(out_f, in_f).index_add_(0, channel, scales[:, None] * codes)
                base = QuantLinear(w_hat, bias, entry["relu"], entry["name"], entry["role"])
                layer = MultipointLinear(base, bits, codes, scales, channel)
            else:
                raise ArtifactError(f"Unknown weight kind {w['kind']!r} in {entry['name']}.")
            if entry.get("act"):
                aq = ActQuantizer(QuantSpec.from_json(entry["act"]["spec"]))
                aq.scale.copy_(_need(tensors, key + "act_scale", (1,)).float())
                aq.zero_point.copy_(_need(tensors, key + "act_zero_point", (1,)).float())
                aq.enabled = bool(entry["act"].get("enabled", True))
                if entry["act"].get("sparq"):
                    aq.sparq = SparqSpec(**entry["act"]["sparq"])
                layer.aq = aq
            towers_layers[entry["tower"]].append(layer)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise ArtifactError(f"Invalid dense-tower metadata: {exc}") from exc
        raise ArtifactError(f"Invalid dense-tower metadata: {exc!r}") from exc
    if not towers_layers["bottom"] or not towers_layers["top"]:
        raise ArtifactError("Dense-tower metadata must describe both towers.")
    towers = QuantizedDLRMTowers(
        towers_layers["bottom"], towers_layers["top"], int(meta["num_sparse_features"])
    )
    towers.info = {**meta.get("info", {}), "dense_format_version": version}
    if model is not None:
        towers.attach_embeddings(model)
    return towers


def save_quantized(towers: QuantizedDLRMTowers, path: str | os.PathLike) -> Path:
    """Write `dense.safetensors` + `dense.json` into a new directory `path`, atomically."""
    path = Path(path)
    tensors, meta = to_tensors(towers)
    with staged_directory(path, ConfigError) as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE))
        data = (tmp / TENSORS_FILE).read_bytes()
        meta = {
            **meta,
            "tensors_file": TENSORS_FILE,
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    return path


def load_quantized(
    path: str | os.PathLike, model: torch.nn.Module | None = None
) -> QuantizedDLRMTowers:
    """Load towers saved by `save_quantized`, verifying size and checksum."""
    path = Path(path)
    if not (path / META_FILE).is_file() or not (path / TENSORS_FILE).is_file():
        raise ArtifactError(
            f"{path} is not a saved dense-tower directory (needs {META_FILE} and {TENSORS_FILE})."
        )
    try:
        meta = json.loads((path / META_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path / META_FILE} is not valid JSON: {exc}") from exc
    data = (path / TENSORS_FILE).read_bytes()
    if len(data) != meta.get("bytes") or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise ArtifactError(
            f"{path / TENSORS_FILE} does not match its checksum: truncated or modified."
        )
    try:
        tensors = load_file(str(path / TENSORS_FILE))
    except Exception as exc:  # safetensors raises its own error types
        raise ArtifactError(
            f"{path / TENSORS_FILE} is not a readable safetensors file: {exc}"
        ) from exc
    return from_tensors(tensors, meta, model)


def dense_section(towers: QuantizedDLRMTowers) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of quantized towers for the artifact's dense section
    (`ArtifactWriter.add_dense`); meta["kind"] is DENSE_KIND_PTQ."""
    tensors, meta = to_tensors(towers)
    return tensors, {"kind": DENSE_KIND_PTQ, **meta}
