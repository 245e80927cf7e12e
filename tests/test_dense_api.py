"""The `quantize` entry point, the first/last policy, serialization without pickle, the CLI."""

import argparse
import json

import numpy as np
import pytest
import torch

from embq.dense import (
    METHODS,
    CalibrationCache,
    QuantizedDLRMTowers,
    from_tensors,
    load_quantized,
    quantize,
    save_quantized,
    to_tensors,
)
from embq.dense.core.calibration import logits
from embq.dense.serialize import pack_codes, unpack_codes
from embq.errors import ArtifactError, ConfigError
from embq.models.metrics import click_metrics
from tests.toy import toy_batches, toy_dlrm

FAST = {
    "rtn": {},
    "lapq": {"maxiter": 1, "max_evals": 40, "ps": (2.0, 3.0, 4.0)},
    "brecq": {"iters_w": 200, "iters_a": 50, "batch_size": 128},
    "multipoint": {},
    "sparq": {},
}


@pytest.fixture(scope="module")
def toy():
    model, batches = toy_dlrm()
    cache = CalibrationCache.from_batches(model, batches, rows=2048)
    held_out = CalibrationCache.from_batches(model, toy_batches(4096, seed=11))
    return model, batches, cache, held_out


def logloss(towers, cache) -> float:
    z = logits(towers, cache)
    return click_metrics(cache.labels.numpy(), torch.sigmoid(z).numpy())["logloss"]


@pytest.fixture(scope="module")
def quantized(toy):
    model, _, cache, _ = toy
    out = {}
    for method, opts in FAST.items():
        out[(method, 8, 8)] = quantize(model, method, 8, 8, calib=cache, **opts)
    out[("brecq", 4, 4)] = quantize(model, "brecq", 4, 4, calib=cache, **FAST["brecq"])
    out[("multipoint", 4, 8)] = quantize(model, "multipoint", 4, 8, calib=cache)
    out[("sparq", 8, 4)] = quantize(model, "sparq", 8, 4, calib=cache)
    return out


def test_registry():
    assert set(METHODS) == {"rtn", "lapq", "brecq", "multipoint", "sparq"}


def test_w8a8_close_to_fp32_and_called_like_the_model(toy, quantized):
    model, batches, _, held_out = toy
    fp = logloss(QuantizedDLRMTowers.from_model(model), held_out)
    for method in FAST:
        q = quantized[(method, 8, 8)]
        assert abs(logloss(q, held_out) / fp - 1) < 0.003, method
        with (
            torch.no_grad()
        ):  # towers(dense, kjt) == towers on cached embeddings == the model when fp32
            a = q(batches[0].dense, batches[0].sparse)
            b = q.forward_cached(batches[0].dense, model.sparse_arch(batches[0].sparse))
        assert a.shape == (len(batches[0]), 1) and torch.equal(a, b)
        info = q.info
        assert info["method"] == method and info["tag"] == "w8a8" and info["seconds"] >= 0
        assert info["calib_rows"] == 2048 and "layers" in info["plan"]
    with torch.no_grad():
        fp_towers = QuantizedDLRMTowers.from_model(model)
        assert torch.allclose(
            fp_towers(batches[0].dense, batches[0].sparse),
            model(batches[0].dense, batches[0].sparse),
            atol=1e-6,
        )


def test_first_last_policy_and_signed_top_input(toy):
    model, _, cache, _ = toy
    for policy, expect in (("8bit", (8, 8)), ("same", (4, 4)), ("fp32", (32, 32))):
        q = quantize(model, "rtn", 4, 4, calib=cache, first_last=policy)
        rows = {r["name"]: r for r in q.info["plan"]["layers"]}
        first, last = rows["bottom.0"], rows[f"top.{len(q.top) - 1}"]
        assert (first["w_bits"], first["a_bits"]) == expect and (
            last["w_bits"],
            last["a_bits"],
        ) == expect
        assert (rows["top.0"]["w_bits"], rows["top.0"]["a_bits"]) == (4, 4)
        assert rows["top.0"]["a_grid"] == "symmetric"  # signed: bottom output + dot products
        assert rows["top.1"]["a_grid"] == "unsigned"
    assert q.info["plan"]["signed_inputs"] == ["top.0"]
    # negative dense inputs make the first layer's quantizer signed too
    neg = CalibrationCache(cache.dense - 1.0, cache.emb, cache.labels)
    q = quantize(model, "rtn", 8, 8, calib=neg)
    assert q.bottom[0].aq.spec.signed and q.info["plan"]["signed_inputs"] == ["bottom.0", "top.0"]


def test_batches_weight_only_and_model_untouched(toy):
    model, batches, _, held_out = toy
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp = logloss(QuantizedDLRMTowers.from_model(model), held_out)
    for method in ("rtn", "lapq", "brecq", "multipoint"):
        # calibration straight from batches (embeddings looked up once), weights only (A32)
        q = quantize(model, method, 4, 32, calib=iter(batches), calib_rows=1024, **FAST[method])
        assert q.info["calib_rows"] == 1024
        assert all(layer.aq is None for layer in q.layers())
        assert abs(logloss(q, held_out) / fp - 1) < 0.02, method
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_errors(toy):
    model, _, cache, _ = toy
    with pytest.raises(ConfigError):
        quantize(model, "gptq", 4, 8, calib=cache)
    with pytest.raises(ConfigError):
        quantize(model, "rtn", 4, 8)
    with pytest.raises(ConfigError):
        quantize(model, "rtn", 9, 8, calib=cache)
    with pytest.raises(ConfigError):
        quantize(model, "rtn", 4, 8, calib=cache, first_last="first")
    with pytest.raises(ConfigError):
        quantize(model, "rtn", 4, 8, calib=cache, no_such_option=1)
    with pytest.raises(ConfigError):
        quantize(model, "sparq", 8, 5, calib=cache)
    with pytest.raises(ConfigError):
        quantize(torch.nn.Linear(2, 2), "rtn", 8, 8, calib=cache)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_pack_roundtrip(bits):
    u = torch.from_numpy(np.random.default_rng(bits).integers(0, 2**bits, 37))
    p = pack_codes(u, bits)
    assert p.dtype == torch.uint8
    assert p.numel() == -(-37 * bits // 8)  # every width at its real size
    assert torch.equal(unpack_codes(p, bits, 37), u)
    # the bit stream, LSB first: code j is bits j*b .. j*b + b - 1
    stream = [(int(p[i // 8]) >> (i % 8)) & 1 for i in range(37 * bits)]
    assert [sum(stream[j * bits + k] << k for k in range(bits)) for j in range(37)] == u.tolist()
    if bits == 4:  # element 0 in the low nibble
        assert int(p[0]) == int(u[0]) | (int(u[1]) << 4)
    with pytest.raises(ArtifactError):
        unpack_codes(p[: len(p) // 2], bits, 37)


def test_version_1_dense_meta_still_loads(toy):
    """Version 1 stored 3/5/6/7-bit weight codes one per byte and named no serving kernels."""
    model, _, cache, held_out = toy
    q = quantize(model, "rtn", 3, 8, calib=cache)
    tensors, meta = to_tensors(q)
    assert meta["version"] == 2
    old = dict(tensors)
    for layer in meta["layers"]:
        key = f"{layer['tower']}.{layer['index']}.weight_codes"
        spec = layer["weight"]["spec"]
        codes = unpack_codes(tensors[key], spec["bits"], layer["out"] * layer["in"])
        old[key] = codes.to(torch.uint8)  # one per byte
    old_meta = {**meta, "version": 1,
                "layers": [{k: v for k, v in e.items() if k != "serving"} for e in meta["layers"]]}
    assert old["top.0.weight_codes"].numel() > tensors["top.0.weight_codes"].numel()
    back = from_tensors(old, old_meta, model)
    assert back.info["dense_format_version"] == 1
    assert torch.equal(logits(back, held_out), logits(q, held_out))
    with pytest.raises(ArtifactError, match="reads versions 1, 2"):
        from_tensors(tensors, {**meta, "version": 3})


def test_tensors_roundtrip_is_exact(toy, quantized):
    model, _, _, held_out = toy
    for key, q in quantized.items():
        tensors, meta = to_tensors(q)
        assert all(isinstance(t, torch.Tensor) for t in tensors.values())
        json.dumps(meta)  # JSON-clean
        back = from_tensors(tensors, meta, model)
        assert torch.equal(logits(back, held_out), logits(q, held_out)), key
    # 4-bit weight codes are stored packed, two per byte
    tensors, meta = to_tensors(quantized[("brecq", 4, 4)])
    assert tensors["top.0.weight_codes"].numel() == -(
        -quantized[("brecq", 4, 4)].top[0].weight.numel() // 2
    )
    assert "top.0.point_codes" in to_tensors(quantized[("multipoint", 4, 8)])[0]
    meta_sparq = to_tensors(quantized[("sparq", 8, 4)])[1]
    assert meta_sparq["layers"][2]["act"]["sparq"]["bits"] == 4


def test_save_load_and_refusals(toy, quantized, tmp_path):
    model, _, _, held_out = toy
    q = quantized[("multipoint", 4, 8)]
    path = save_quantized(q, tmp_path / "dense")
    assert sorted(p.name for p in path.iterdir()) == ["dense.json", "dense.safetensors"]
    back = load_quantized(path, model)
    assert torch.equal(logits(back, held_out), logits(q, held_out))
    with pytest.raises(ConfigError):
        save_quantized(q, path)  # never overwrites
    # tampering is detected
    data = bytearray((path / "dense.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (path / "dense.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError):
        load_quantized(path)
    tensors, meta = to_tensors(q)
    with pytest.raises(ArtifactError):
        from_tensors(tensors, {**meta, "version": 99})
    missing = {k: v for k, v in tensors.items() if not k.endswith("bias")}
    with pytest.raises(ArtifactError):
        from_tensors(missing, meta)
    with pytest.raises(ArtifactError):
        load_quantized(tmp_path / "nowhere")
    # without embeddings the towers refuse KJT input but run on cached embeddings
    bare = from_tensors(tensors, meta)
    with pytest.raises(ConfigError):
        bare(held_out.dense[:2], None)
    assert bare.forward_cached(held_out.dense[:2], held_out.emb[:2]).shape == (2, 1)


def test_cli_quantize_dense(toy, tmp_path, capsys):
    from embq.cli.quantize_dense import add_parser
    from embq.models.dlrm import save_model
    from tests.toy import toy_config

    model, batches, _, _ = toy
    save_model(model, toy_config(), tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    dense = torch.cat([b.dense for b in batches]).numpy()
    ids = np.stack(
        [
            np.concatenate([b.sparse[f].values().numpy() for b in batches])
            for f in ("c0", "c1", "c2")
        ],
        1,
    )
    labels = torch.cat([b.labels for b in batches]).numpy().astype(np.int32).reshape(-1, 1)
    np.save(data / "dense.npy", dense)
    np.save(data / "sparse.npy", ids.astype(np.int64))
    np.save(data / "labels.npy", labels)
    (data / "summary.json").write_text(
        json.dumps(
            {
                "dataset": "toy",
                "dense_feature_names": [f"d{i}" for i in range(dense.shape[1])],
                "sparse_feature_names": ["c0", "c1", "c2"],
                "num_embeddings": [50, 40, 30],
            }
        )
    )
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(
        [
            "quantize-dense",
            "--model",
            str(tmp_path / "model"),
            "--data",
            str(data),
            "--method",
            "brecq",
            "--w-bits",
            "4",
            "--a-bits",
            "8",
            "--calib-rows",
            "2048",
            "--option",
            "iters_w=100",
            "--option",
            "iters_a=20",
            "--option",
            "batch_size=128",
            "--output",
            str(tmp_path / "out"),
            "--quiet",
        ]
    )
    args.func(args)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tag"] == "w4a8" and result["calib_rows"] == 2048
    assert abs(result["quantized"]["logloss"] / result["fp32"]["logloss"] - 1) < 0.02
    back = load_quantized(tmp_path / "out")
    assert back.info["options"]["iters_w"] == 100


def test_plugs_into_the_artifact(toy, quantized, tmp_path):
    from embq.artifact.reader import load_artifact
    from embq.artifact.writer import ArtifactWriter

    model, _, _, held_out = toy
    q = quantized[("brecq", 4, 4)]
    with ArtifactWriter(tmp_path / "model.embq") as w:
        w.add_dense(*to_tensors(q))
        w.publish()
    art = load_artifact(tmp_path / "model.embq")
    back = from_tensors(art.dense(), art.dense_meta, model)
    assert torch.equal(logits(back, held_out), logits(q, held_out))
