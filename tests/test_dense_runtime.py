"""Quantized dense towers travel in the artifact and run in the runtime (int8 kernels at 8 bits)."""

import pytest
import torch

from embq.artifact.reader import load_artifact
from embq.cli.quantize import quantize_model_dir
from embq.data.prepared import PreparedData
from embq.models.dlrm import load_model, save_model
from embq.models.train import TrainSettings, train_dlrm
from embq.runtime.load import load_inference_model


@pytest.fixture(scope="module")
def trained(synth_prepared, tmp_path_factory):
    data = PreparedData(synth_prepared)
    model, config, _ = train_dlrm(data, TrainSettings(epochs=1), progress=False)
    path = save_model(model, config, tmp_path_factory.mktemp("m") / "model")
    return path, data


def held_out(data, rows=512):
    _, (start, _) = data.split(0.1)
    return next(data.batches(start, start + rows, batch_size=rows))


def test_w4a8_towers_run_with_their_dequantized_weights(trained, tmp_path):
    from embq.dense.serialize import from_tensors
    from embq.runtime.dense_towers import load_ptq_towers as load_towers

    model_dir, data = trained
    out = quantize_model_dir(model_dir, "fp32", tmp_path / "q.embq", dense="rtn:w4a8",
                             data_dir=data.path)[0]
    art = load_artifact(out)
    model, config = load_model(model_dir)
    # Independent path: the towers as embq.dense rebuilds them from the artifact, float
    # embeddings attached, activation fake-quant off (serving runs the quantized weights).
    meta = {k: v for k, v in art.dense_meta.items() if k != "kind"}
    towers = from_tensors(art.dense(), meta, model)
    for layer in (*towers.bottom, *towers.top):
        layer.aq = None
    float_towers = load_towers(config, art.dense(), art.dense_meta, int8_kernels=False)
    batch = held_out(data)
    with torch.no_grad():
        want = towers(batch.dense, batch.sparse).reshape(-1)
        emb = model.sparse_arch(batch.sparse)
        got = float_towers.over_arch(float_towers.inter_arch(
            float_towers.dense_arch(batch.dense), emb)).reshape(-1)
        fp32 = model(batch.dense, batch.sparse).reshape(-1)
        served = load_inference_model(out)(batch.dense, batch.sparse).reshape(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - fp32).abs().max() > 1e-4  # 4-bit weights really changed the towers
    # Served: the W8A8 first/last layers on int8 kernels, the rest as above.
    assert (torch.sigmoid(served) - torch.sigmoid(want)).abs().max() < 0.05


def test_w8a8_towers_use_int8_kernels(trained, tmp_path):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    model_dir, data = trained
    out = quantize_model_dir(model_dir, "int8", tmp_path / "q8.embq", dense="rtn:w8a8",
                             data_dir=data.path)[0]
    plain = quantize_model_dir(model_dir, "int8", tmp_path / "plain.embq")[0]
    runtime, reference = load_inference_model(out), load_inference_model(plain)
    assert any(isinstance(m, DynamicLinear) for m in runtime.modules())
    batch = held_out(data, rows=5000)
    with torch.no_grad():
        p = torch.sigmoid(runtime(batch.dense, batch.sparse))
        r = torch.sigmoid(reference(batch.dense, batch.sparse))
    bce = torch.nn.functional.binary_cross_entropy
    # int8 weights and (dynamically quantized) activations: log loss within 0.5% of fp32 towers.
    assert abs(bce(p, batch.labels) / bce(r, batch.labels) - 1) < 0.005


def test_bad_dense_spec_is_a_config_error(trained, tmp_path):
    from embq.errors import ConfigError

    model_dir, data = trained
    with pytest.raises(ConfigError, match="METHOD:wXaY"):
        quantize_model_dir(model_dir, "int8", tmp_path / "x.embq", dense="brecq-4", data_dir=data.path)
    with pytest.raises(ConfigError, match="--data"):
        quantize_model_dir(model_dir, "int8", tmp_path / "y.embq", dense="rtn:w8a8")
