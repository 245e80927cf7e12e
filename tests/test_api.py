"""The public API: `import embq` stays light, Plan and format configs round-trip, and
quantize -> save -> load answers exactly like the path it replaces."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import embq
from embq.dense.configs import DenseConfig, parse_dense
from embq.embedding.configs import PQ, Float, RowCodebook, Rowwise, SharedCodebook, parse_format
from embq.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_import_embq_loads_neither_torch_nor_faiss():
    code = (
        "import sys, embq\n"
        "print(embq.quantize, embq.load, embq.save, embq.Plan, embq.formats)\n"
        "embq.Plan.parse('{\"*\": \"int4-greedy\", \"t_cat_0\": \"int8\"}')\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'faiss', 'torchrec',"
        " 'fbgemm_gpu', 'numba'))\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True).stdout  # fmt: skip
    assert "<function quantize" in out and "<class 'embq.plan.Plan'>" in out
    assert out.strip().splitlines()[-1] == "HEAVY []"


# ------------------------------------------------------------------ configs and plans

FORMAT_CONFIGS = [
    Float(32), Float(16),
    Rowwise(8), Rowwise(4), Rowwise(2),
    Rowwise(4, "greedy"), Rowwise(2, "greedy"), Rowwise(4, "opt"), Rowwise(2, "opt"),
    Rowwise(4, "greedy", n_bins=100, ratio=0.3), Rowwise(2, "greedy", ratio=0.5),
    Rowwise(4, "opt", n_bins=400),
    RowCodebook(), SharedCodebook(), SharedCodebook(sample_rows=1000, seed=7),
    PQ(8, 8), PQ(32, 4), PQ(16, 8, sample_rows=20_000), PQ(4, 5, seed=3),
]  # fmt: skip


@pytest.mark.parametrize("config", FORMAT_CONFIGS, ids=str)
def test_format_configs_round_trip(config):
    assert parse_format(str(config)) == config
    assert embq.parse_format(str(config)).codec().name == str(config)


def test_short_names_are_the_stable_form():
    names = {str(c) for c in FORMAT_CONFIGS if c == type(c)(**{
        k: getattr(c, k) for k in ("bits", "search", "m") if hasattr(c, k)})}  # fmt: skip
    assert {"fp32", "fp16", "int8", "int4", "int2", "int4-greedy", "int2-greedy", "int4-opt",
            "int2-opt", "cb4-row", "cb4-shared", "pq8x8", "pq32x4"} <= names  # fmt: skip
    assert str(Rowwise(4, "greedy", n_bins=100, ratio=0.3)) == "int4-greedy(n_bins=100,ratio=0.3)"
    assert str(PQ(16, 8, sample_rows=20_000)) == "pq16x8(sample_rows=20000)"


@pytest.mark.parametrize("bad, message", [
    ("int5", "unknown format 'int5'"),
    ("int4-greedy(n_bins=2.5)", "n_bins"),
    ("int4(n_bins=100)", "minmax"),
    ("int4-opt(ratio=0.2)", "opt search has no such limit"),
    ("int8-greedy", "unknown format"),
    ("pq8x8(seeds=3)", "takes parameters"),
    ("pq0x8", "'m' parameter of PQ"),
    ("cb4-row(seed=1)", "takes parameters none"),
])  # fmt: skip
def test_bad_format_configs_are_config_errors(bad, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_format(bad)


@pytest.mark.parametrize("spec", ["rtn:w8a8", "brecq:w4a8", "lapq:w2a8", "sparq:w8a4",
                                  "brecq:w4a8(iters_w=2000)",
                                  "multipoint:w2a8(budget=0.1,first_last=fp32)",
                                  "lapq:w4a4(ps=[2,3,4])"])  # fmt: skip
def test_dense_configs_round_trip(spec):
    config = parse_dense(spec)
    assert str(config) == spec and parse_dense(str(config)) == config


def test_dense_config_errors():
    for bad, message in [("brecq:w9a8", "w_bits"), ("nope:w4a8", "method"), ("brecq", "METHOD:wXaY")]:
        with pytest.raises(ConfigError, match=message):
            parse_dense(bad)


PLAN_SHAPES = [
    "int4-greedy",
    {"*": "int4-opt", "t_cat_0": "int8"},
    '{"*": "int4-greedy", "t_cat_0": "int8"}',
    {"t_a": "pq8x8(seed=3)", "t_b": "cb4-shared"},
    "brecq:w4a8",
    {"tables": {"*": "int2-opt", "t_x": "fp16"}, "dense": "lapq:w4a8(ps=[2,3])"},
    {"tables": {"*": "int4(n_bins=200)".replace("(n_bins=200)", "")}, "dense": None},
    embq.Plan.uniform(Rowwise(4, "greedy", n_bins=150)),
    embq.Plan((("*", "int8"),), DenseConfig("rtn", 8, 8)),
    {"tables": {"*": "int2-opt", "t_a": "int4-opt"}, "kernels": {"t_a": "compact", "*": "tbe"}},
    {"tables": {"*": "int4-opt"}, "kernels": {"t_b": "auto"}, "dense": "rtn:w8a8"},
    embq.Plan((("*", "int4"),), None, (("t_c", "compact"),)),
]


@pytest.mark.parametrize("shape", PLAN_SHAPES, ids=lambda s: str(s)[:40])
def test_plans_round_trip_through_text_and_json(shape, tmp_path):
    plan = embq.Plan.parse(shape)
    assert embq.Plan.parse(str(plan)) == plan
    assert embq.Plan.parse(plan.to_json()) == plan
    assert embq.Plan.parse(json.dumps(plan.to_json())) == plan
    assert embq.Plan.load(plan.save(tmp_path / "plan.json")) == plan


def test_plan_short_forms():
    assert str(embq.Plan.parse("int4-greedy")) == "int4-greedy"
    assert str(embq.Plan.parse({"*": "int4-opt", "t_cat_0": "int8"})) == \
        '{"*": "int4-opt", "t_cat_0": "int8"}'  # fmt: skip
    assert str(embq.Plan.parse("brecq:w4a8")) == "brecq:w4a8"
    plan = embq.Plan.parse({"*": "int4-opt", "t_cat_0": "int8"})
    assert plan.format_for("t_cat_0") == Rowwise(8) and plan.format_for("t_z") == Rowwise(4, "opt")
    assert plan.kernels == () and "kernels" not in plan.to_json()  # plan.json stays as it was
    chosen = plan.with_kernels({"t_cat_0": "compact", "*": "tbe"})
    assert chosen.kernel_for("t_cat_0") == "compact" and chosen.kernel_for("t_z") == "tbe"
    assert chosen.to_json()["kernels"] == {"t_cat_0": "compact", "*": "tbe"}
    assert chosen.with_dense("rtn:w8a8").kernels == chosen.kernels


@pytest.mark.parametrize("bad, message", [
    ({}, "non-empty"), ([], "non-empty"), (5, "non-empty"), ("{not json", "not valid JSON"),
    ({"tables": {"*": "int4"}, "extra": 1}, "not \\['extra'\\]"), ({"*": "nf4"}, "unknown format"),
    ({"tables": {"*": "int4"}, "kernels": {"t_a": "fast"}}, "kernel must be one of"),
    ({"tables": {"*": "int4"}, "kernels": ["compact"]}, "'kernels' must be an object"),
])  # fmt: skip
def test_bad_plans_are_config_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        embq.Plan.parse(bad)


def test_a_table_named_twice_is_a_config_error():
    with pytest.raises(ConfigError, match="names table 't_a' twice"):
        embq.Plan(tables=[("t_a", "int4"), ("t_a", "int8")])
    with pytest.raises(ConfigError, match="gives table 't_a' two kernels"):
        embq.Plan(tables={"*": "int4"}, kernels=[("t_a", "tbe"), ("t_a", "compact")])
    with pytest.raises(ConfigError, match="non-empty strings"):
        embq.Plan(tables={"*": "int4"}, kernels=[("", "tbe")])


def test_formats_lists_every_format_with_bytes_and_kernel():
    listed = {f.name: f for f in embq.formats()}
    assert set(listed) >= {"fp32", "int8", "int4-greedy", "int2-opt", "cb4-row", "cb4-shared"}
    assert listed["int4-greedy"].bytes_per_row == "D/2+4"
    assert listed["int8"].bytes_per_row == "D+4" and listed["fp16"].bytes_per_row == "2D"
    assert listed["int4"].kernel == "fbgemm-tbe" and listed["cb4-row"].kernel == "codebook-bag"
    from embq.embedding.registry import get_format

    for info in listed.values():  # the formula agrees with the format's own byte count
        if info.name.startswith("pq"):
            continue
        fmt = get_format(info.name)
        d = 64
        formula = re.sub(r"(\d)D", r"\1*D", info.bytes_per_row.split(" ")[0])
        expected = eval(formula.replace("D", str(d)))  # a formula of digits and D only
        assert fmt.bytes_per_row(d) == expected, info


# ------------------------------------------------------------------ quantize / save / load


@pytest.fixture(scope="module")
def dlrm():
    from embq.models.dlrm import DLRMConfig, build_dlrm

    config = DLRMConfig(dense_in_features=5, sparse_feature_names=["cat_0", "cat_1", "cat_2"],
                        num_embeddings=[300, 50, 8], embedding_dim=16)  # fmt: skip
    model = build_dlrm(config, seed=3)
    with torch.no_grad():  # trained-like rows: different scales per table
        for i, t in enumerate(model.sparse_arch.embedding_bag_collection.embedding_bags.values()):
            t.weight.copy_(torch.randn(t.weight.shape, generator=torch.Generator().manual_seed(i))
                           * 0.05 * (i + 1))  # fmt: skip
    return model.eval(), config


def _batch(config, seed=0, batch=32):
    from embq.data.prepared import ids_to_kjt

    rng = np.random.default_rng(seed)
    ids = np.stack([rng.integers(0, n, batch) for n in config.num_embeddings], axis=1)
    dense = torch.from_numpy(rng.standard_normal((batch, config.dense_in_features)).astype(np.float32))
    return dense, ids_to_kjt(ids, config.sparse_feature_names)


def test_quantize_save_load_matches_the_cli_path_bit_for_bit(dlrm, tmp_path):
    """embq.quantize -> save -> load answers exactly as the CLI path (quantize_model_dir, then
    the runtime's load_inference_model) does on the same model and plan."""
    from embq.cli.quantize import quantize_model_dir
    from embq.models.dlrm import save_model
    from embq.runtime.load import load_inference_model

    model, config = dlrm
    plan = embq.Plan.parse('{"*": "int4-greedy", "t_cat_0": "int8"}')
    qmodel = embq.quantize(model, plan, progress=False)
    saved = embq.save(qmodel, tmp_path / "api.embq")
    loaded = embq.load(saved)

    save_model(model, config, tmp_path / "model")
    cli_path, _ = quantize_model_dir(tmp_path / "model", plan, tmp_path / "cli.embq",
                                     progress=False)  # fmt: skip
    reference = load_inference_model(cli_path)

    dense, kjt = _batch(config)
    with torch.no_grad():
        want = reference(dense, kjt)
        assert torch.equal(loaded(dense, kjt), want)
        assert torch.equal(qmodel(dense, kjt), want)  # in memory, before saving
    for name in ("manifest.json", "tables/t_cat_0.safetensors", "tables/t_cat_1.safetensors",
                 "dense.safetensors"):  # fmt: skip
        assert (saved / name).read_bytes() == (cli_path / name).read_bytes(), name
    assert loaded.plan.format_for("t_cat_0") == Rowwise(8)
    assert loaded.plan.format_for("t_cat_2") == Rowwise(4, "greedy")
    assert qmodel.stats["t_cat_1"]["format"] == "int4-greedy"
    assert loaded.metadata["tables"][0]["name"] == "t_cat_0"


def test_quantize_ebc_and_reload_its_lookups(dlrm, tmp_path):
    model, config = dlrm
    ebc = model.sparse_arch.embedding_bag_collection
    qmodel = embq.quantize(ebc, "int8", progress=False)
    _, kjt = _batch(config)
    pooled = qmodel(kjt)
    loaded = embq.load(embq.save(qmodel, tmp_path / "ebc.embq"))
    assert loaded.config is None
    got = loaded(kjt.values(), kjt.offsets())
    want = torch.cat([pooled[f] for f in config.sparse_feature_names], dim=1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_dense_plan_needs_calibration(dlrm):
    with pytest.raises(ConfigError, match="calib"):
        embq.quantize(dlrm[0], {"tables": {"*": "int4"}, "dense": "rtn:w8a8"}, progress=False)


def test_format_parameters_reach_the_encoder(dlrm):
    """A greedy config's n_bins / ratio are the ones ATen's optimized prepack receives."""
    import fbgemm_gpu  # noqa: F401

    model, _ = dlrm
    weight = model.sparse_arch.embedding_bag_collection.embedding_bags["t_cat_0"].weight.detach()
    plan = embq.Plan.parse({"*": "int4-greedy(n_bins=100,ratio=0.3)"})
    table = embq.quantize(model, plan, progress=False).tables[0]
    want = torch.ops.quantized.embedding_bag_4bit_prepack(weight, True, 100, 0.3).numpy()
    np.testing.assert_array_equal(table.codes, want)
    assert table.format == "int4-greedy(n_bins=100,ratio=0.3)"
