"""Quantized dense towers travel in the artifact and are served as calibrated: the artifact ->
runtime -> predictions path against the simulated towers and against a float64 reference of
the integer arithmetic decoded from the artifact's own bytes."""

import json
import math

import numpy as np
import pytest
import torch

from embq.artifact.reader import load_artifact
from embq.cli.quantize import quantize_model_dir
from embq.data.prepared import PreparedData
from embq.errors import ArtifactError
from embq.models.dlrm import load_model
from embq.models.train import TrainSettings, train_dlrm
from embq.runtime.load import inference_metadata, load_inference_model


@pytest.fixture(scope="module")
def trained(synth_prepared, tmp_path_factory):
    from embq.models.dlrm import save_model

    data = PreparedData(synth_prepared)
    model, config, _ = train_dlrm(data, TrainSettings(epochs=1), progress=False)
    path = save_model(model, config, tmp_path_factory.mktemp("m") / "model")
    return path, data


@pytest.fixture(scope="module")
def artifacts(trained, tmp_path_factory):
    """{spec: artifact path} with fp32 tables, so the towers are all that differ."""
    model_dir, data = trained
    root = tmp_path_factory.mktemp("a")
    out = {}
    for spec in ("rtn:w4a8", "rtn:w8a8", None):
        name = (spec or "fp32").replace(":", "_")
        out[spec] = quantize_model_dir(model_dir, "fp32", root / f"{name}.embq", dense=spec,
                                       data_dir=data.path if spec else None)[0]  # fmt: skip
    return out


def held_out(data, rows=512):
    _, (start, _) = data.split(0.1)
    return next(data.batches(start, start + rows, batch_size=rows))


def test_served_towers_are_the_simulated_towers(trained, artifacts):
    from embq.dense.serialize import from_tensors

    model_dir, data = trained
    model, _ = load_model(model_dir)
    art = load_artifact(artifacts["rtn:w4a8"])
    meta = {k: v for k, v in art.dense_meta.items() if k != "kind"}
    simulated = from_tensors(art.dense(), meta, model)  # activation quantizers included
    served = load_inference_model(artifacts["rtn:w4a8"])
    batch = held_out(data, rows=4096)
    with torch.no_grad():
        want = simulated(batch.dense, batch.sparse).reshape(-1)
        got = served(batch.dense, batch.sparse).reshape(-1)
        fp32 = model(batch.dense, batch.sparse).reshape(-1)
    diff = (got - want).abs()
    # equal up to float32 sums; a code can flip only where a value sits within that of a
    # rounding half-way point, which leaves almost every row exact
    assert float(diff.quantile(0.99)) < 1e-5
    assert float((diff > 1e-4).float().mean()) < 0.005
    assert (want - fp32).abs().max() > 1e-3  # the quantization really changed the towers
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    assert abs(float(bce(got, batch.labels)) - float(bce(want, batch.labels))) < 1e-6


def _bitstream(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    bitv = np.unpackbits(packed.astype(np.uint8), bitorder="little")[: count * bits]
    return (bitv.reshape(count, bits).astype(np.int64) << np.arange(bits)).sum(1)


def _grid(spec: dict) -> tuple[int, int]:
    b = spec["bits"]
    if spec["signed"] and spec["symmetric"]:
        return -(2 ** (b - 1) - 1), 2 ** (b - 1) - 1
    return 0, 2**b - 1


def reference_towers(tensors: dict, meta: dict, dense: np.ndarray, emb: np.ndarray):
    """float64 logits of the integer pipeline decoded from the artifact's tensors and meta alone,
    and per row whether any input code lay within 1e-4 of a rounding half-way point (where
    float32 and float64 may round apart)."""
    near_tie = np.zeros(len(dense), dtype=bool)

    def layer(entry, h):
        nonlocal near_tie
        key = f"{entry['tower']}.{entry['index']}."
        out_f, in_f = entry["out"], entry["in"]
        w = entry["weight"]["spec"]
        wmin = _grid(w)[0]
        codes = _bitstream(tensors[key + "weight_codes"].numpy(), w["bits"], out_f * in_f)
        codes = codes.reshape(out_f, in_f) + wmin
        sw = tensors[key + "weight_scale"].double().numpy().reshape(-1, 1)
        zw = tensors[key + "weight_zero_point"].double().numpy().reshape(-1, 1)
        a = entry["act"]["spec"]
        qmin, qmax = _grid(a)
        s = float(tensors[key + "act_scale"][0])
        z = float(tensors[key + "act_zero_point"][0])
        t = h / s
        near_tie |= (np.abs(t - np.floor(t) - 0.5) < 1e-4).any(1)
        q = np.clip(np.round(t) + z, qmin, qmax)
        y = ((q - z) @ (codes - zw).T) * s * sw.reshape(1, -1)
        y = y + tensors[key + "bias"].double().numpy()
        return np.maximum(y, 0) if entry["relu"] else y

    layers = meta["layers"]
    h = dense.astype(np.float64)
    for entry in (e for e in layers if e["tower"] == "bottom"):
        h = layer(entry, h)
    combined = np.concatenate([h[:, None, :], emb.astype(np.float64)], 1)
    products = combined @ combined.transpose(0, 2, 1)
    r, c = np.triu_indices(combined.shape[1], k=1)
    h = np.concatenate([h, products[:, r, c]], 1)
    for entry in (e for e in layers if e["tower"] == "top"):
        h = layer(entry, h)
    return h.reshape(-1), near_tie


def test_served_towers_against_float64_integer_reference(trained, artifacts):
    from embq.runtime.dense_towers import load_dense_towers

    model_dir, _ = trained
    _, config = load_model(model_dir)
    art = load_artifact(artifacts["rtn:w4a8"])
    tensors, meta = art.dense(), art.dense_meta
    towers = load_dense_towers(config, tensors, meta)
    g = torch.Generator().manual_seed(0)
    n, f, d = 512, len(config.sparse_feature_names), config.embedding_dim
    dense = torch.rand(n, config.dense_in_features, generator=g) * 6  # log-count-like
    emb = torch.randn(n, f, d, generator=g) * 0.3
    with torch.no_grad():
        got = towers.over_arch(towers.inter_arch(towers.dense_arch(dense), emb)).reshape(-1)
    want, near_tie = reference_towers(tensors, meta, dense.numpy(), emb.numpy())
    assert near_tie.mean() < 0.15  # about 400 inputs per row: a few rows have one
    exact = ~near_tie
    np.testing.assert_allclose(got.double().numpy()[exact], want[exact], rtol=1e-4, atol=1e-4)
    assert np.std(want) > 0.1  # not a constant model


def test_artifact_says_what_runs_and_stores_real_bit_widths(trained, artifacts):
    meta = inference_metadata(artifacts["rtn:w4a8"])["dense"]
    assert meta["kind"] == "embq-dense-ptq" and meta["version"] == 2
    layers = meta["layers"]
    assert [row["kernel"] for row in layers] == ["fbgemm-int8-static"] * len(layers)
    # first / last layer at 8 bits (the policy), the rest stored at 4 bits, multiplied as int8
    assert [row["weight_bits"] for row in layers] == [8] + [4] * (len(layers) - 2) + [8]
    assert all(row["runtime_weight_bits"] == 8 and row["act_bits"] == 8 for row in layers)
    art4, art8 = load_artifact(artifacts["rtn:w4a8"]), load_artifact(artifacts["rtn:w8a8"])
    for entry in art4.dense_meta["layers"]:
        key = f"{entry['tower']}.{entry['index']}.weight_codes"
        bits = entry["weight"]["spec"]["bits"]
        assert art4.dense()[key].numel() == math.ceil(entry["out"] * entry["in"] * bits / 8)
    fp32 = load_artifact(artifacts[None]).manifest["dense"]["bytes"]
    b4, b8 = art4.manifest["dense"]["bytes"], art8.manifest["dense"]["bytes"]
    assert b4 < b8 < 0.4 * fp32
    assert inference_metadata(artifacts[None])["dense"]["layers"] is None


def test_stored_kernel_must_match_the_layer(trained, artifacts):
    from embq.runtime.dense_towers import load_dense_towers

    model_dir, _ = trained
    _, config = load_model(model_dir)
    art = load_artifact(artifacts["rtn:w4a8"])
    for bad in ("dequantized-fp32", "avx-int4"):
        meta = json.loads(json.dumps(art.dense_meta))
        meta["layers"][1]["serving"]["kernel"] = bad
        with pytest.raises(ArtifactError, match=bad):
            load_dense_towers(config, art.dense(), meta)
    # version 1 named no kernels: the loader decides them
    meta = json.loads(json.dumps(art.dense_meta))
    for entry in meta["layers"]:
        del entry["serving"]
    meta["version"] = 1
    towers = load_dense_towers(config, art.dense(), meta)
    assert sum(1 for _ in towers.over_arch) == len(config.over_arch)


def test_w8a8_towers_use_int8_kernels(trained, artifacts):
    from embq.runtime.dense_layers import Int8StaticLinear

    _, data = trained
    runtime = load_inference_model(artifacts["rtn:w8a8"])
    reference = load_inference_model(artifacts[None])
    assert sum(isinstance(m, Int8StaticLinear) for m in runtime.modules()) == 5
    batch = held_out(data, rows=5000)
    with torch.no_grad():
        p = torch.sigmoid(runtime(batch.dense, batch.sparse))
        r = torch.sigmoid(reference(batch.dense, batch.sparse))
    bce = torch.nn.functional.binary_cross_entropy
    # int8 weights and calibrated 8-bit activations: log loss within 0.5% of the fp32 towers
    assert abs(bce(p, batch.labels) / bce(r, batch.labels) - 1) < 0.005


def test_quantized_towers_export_to_torchscript(artifacts, tmp_path):
    from embq.runtime.export import check_export, export_torchscript

    out = export_torchscript(artifacts["rtn:w4a8"], tmp_path / "model.pt")
    assert check_export(artifacts["rtn:w4a8"], out) <= 1e-5


def test_bad_dense_spec_is_a_config_error(trained, tmp_path):
    from embq.errors import ConfigError

    model_dir, data = trained
    with pytest.raises(ConfigError, match="METHOD:wXaY"):
        quantize_model_dir(model_dir, "int8", tmp_path / "x.embq", dense="brecq-4", data_dir=data.path)
    with pytest.raises(ConfigError, match="--data"):
        quantize_model_dir(model_dir, "int8", tmp_path / "y.embq", dense="rtn:w8a8")


def test_other_quantized_engines_fall_back_to_the_simulation(trained, artifacts):
    from embq.runtime.dense_layers import FloatLinear
    from embq.runtime.dense_towers import load_dense_towers

    if "qnnpack" not in torch.backends.quantized.supported_engines:
        pytest.skip("no second quantized engine in this torch build")
    model_dir, _ = trained
    _, config = load_model(model_dir)
    art = load_artifact(artifacts["rtn:w4a8"])
    engine = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "qnnpack"
        with pytest.warns(UserWarning, match="qnnpack"):
            towers = load_dense_towers(config, art.dense(), art.dense_meta)
    finally:
        torch.backends.quantized.engine = engine
    assert all(isinstance(m, FloatLinear) for m in (*towers.dense_arch, *towers.over_arch))
