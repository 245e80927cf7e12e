"""Dense layers in the plan: per-layer bits reach the quantizers, the bytes counted are what the
artifact stores, the plan's dense spec round-trips."""

from __future__ import annotations

import pytest

import embq
from embq.errors import ConfigError
from embq.hardware.dense import dense_config, dense_layers, layer_bytes
from embq.hardware.spec import load_spec


@pytest.fixture(scope="module")
def toy():
    from tests.toy import toy_dlrm

    return toy_dlrm(rows=2048, epochs=1, seed=4)


def test_layer_bits_override_every_layer(toy):
    from embq.dense.api import quantize

    model, batches = toy
    bits = {"bottom.0": [4, 32], "bottom.1": [32, 32], "top.0": [8, 8], "top.1": [2, 8],
            "top.2": [32, 8]}  # fmt: skip
    towers = quantize(model, "rtn", 8, 8, calib=batches[:2], layer_bits=bits)
    for layer in towers.layers():
        w, a = bits[layer.name]
        assert (layer.wq.spec.bits if layer.wq else 32) == w, layer.name
        assert (layer.aq.spec.bits if layer.aq else 32) == a, layer.name
    with pytest.raises(ConfigError, match="layer_bits"):
        quantize(model, "rtn", 8, 8, calib=batches[:2], layer_bits={"top.0": [9, 8]})


@pytest.mark.parametrize("spec_name", ["x86-fbgemm", "accelerator"])
def test_layer_bytes_are_what_the_artifact_stores(toy, spec_name):
    from embq.dense.api import quantize
    from embq.dense.serialize import dense_section

    model, batches = toy
    spec = load_spec(spec_name)
    layers = dense_layers(model)
    for kernel in spec.dense_kernels.values():
        choice = {q.name: kernel for q in layers}
        config = dense_config(choice)
        if config is None:  # fp32 towers: the state dict's weights and biases
            stored = {q.name: 4 * (q.in_features + 1) * q.out_features for q in layers}
        else:
            towers = quantize(model, config.method, config.w_bits, config.a_bits,
                              calib=batches[:2], **config.option_dict)  # fmt: skip
            tensors, _ = dense_section(towers)
            stored = {}
            for key, t in tensors.items():
                tower, index = key.split(".")[:2]
                name = f"{tower}.{index}"
                stored[name] = stored.get(name, 0) + t.numel() * t.element_size()
        for q in layers:
            assert layer_bytes(q, kernel) == stored[q.name], (kernel.name, q.name)


def test_dense_plans_round_trip():
    spec = load_spec("accelerator")
    choice = {"bottom.0": spec.dense_kernels["int8"], "top.2": spec.dense_kernels["w4a8"]}
    config = dense_config(choice)
    assert config.option_dict["layer_bits"] == {"bottom.0": [8, 8], "top.2": [4, 8]}
    plan = embq.Plan((("*", "int8"),), config, (("*", "tbe"),))
    assert embq.Plan.parse(str(plan)) == plan and embq.Plan.parse(plan.to_json()) == plan
    x86 = load_spec("x86-fbgemm")
    assert dense_config({"top.0": x86.dense_kernels["fp32"]}) is None
