"""Sensitivity and the planner against independent references: quantizing one table for real
and scoring the model, the proxy's definition computed row by row, embq.quantize's encodings,
the runtime's memory and log loss; the `embq plan` command end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import embq
from embq.errors import ConfigError
from embq.hardware.search import InfeasibleError
from embq.hardware.sensitivity import monotone

CARDINALITIES = (700, 300, 40, 4)
FORMATS = ["fp32", "int8", "int4-opt", "int2-opt", "pq4x8(sample_rows=512)"]


def _write_prepared(root, rows: int = 24_000, seed: int = 0):
    """A prepared dataset (PreparedData layout) of synthetic clicks over CARDINALITIES."""
    rng = np.random.default_rng(seed)
    truth = np.random.default_rng(99)
    effects = [truth.normal(0, 1.0, c) for c in CARDINALITIES]
    dense = np.log1p(rng.exponential(3.0, (rows, 3))).astype(np.float32)
    ids = np.stack([np.minimum(rng.zipf(1.2, rows) - 1, c - 1) for c in CARDINALITIES], 1)
    logit = -1.0 + 0.5 * (dense[:, 0] - 1) + sum(e[ids[:, k]] for k, e in enumerate(effects))
    labels = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int32).reshape(-1, 1)
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "dense.npy", dense)
    np.save(root / "sparse.npy", ids.astype(np.int64))
    np.save(root / "labels.npy", labels)
    (root / "summary.json").write_text(json.dumps({
        "dataset": "toy", "dense_feature_names": ["d0", "d1", "d2"],
        "sparse_feature_names": [f"cat_{k}" for k in range(len(CARDINALITIES))],
        "num_embeddings": list(CARDINALITIES)}))  # fmt: skip
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from embq.data.prepared import PreparedData
    from embq.models.dlrm import save_model
    from embq.models.train import TrainSettings, train_dlrm

    root = tmp_path_factory.mktemp("planner")
    data = PreparedData(_write_prepared(root / "prepared"))
    model, config, _ = train_dlrm(data, TrainSettings(embedding_dim=16, epochs=2, batch_size=256),
                                  progress=False)  # fmt: skip
    for p in model.parameters():
        p.requires_grad_(False)
    save_model(model, config, root / "model")
    return model, data, root


@pytest.fixture(scope="module")
def planner(trained):
    from embq.hardware.planner import Planner
    from embq.hardware.spec import load_spec

    model, data, _ = trained
    return Planner(model, data, load_spec("x86-fbgemm"), formats=FORMATS, calib_rows=6000,
                   progress=False, batch=128)  # fmt: skip


def _mean_bce(module, batches) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            z = module(b.dense, b.sparse).reshape(-1).double()
            total += float(torch.nn.functional.binary_cross_entropy_with_logits(
                z, b.labels.double(), reduction="sum"))  # fmt: skip
            n += len(b)
    return total / n


def test_exact_sensitivity_equals_quantizing_the_table(trained, planner):
    """The measured increase equals quantizing only that table with embq.quantize and scoring
    the runtime model on the calibration rows."""
    model, data, _ = trained
    sens = planner.sensitivity()
    calib = list(data.batches(*planner.calib_range, batch_size=4096))
    base = _mean_bce(embq.quantize(model, "fp32", progress=False), calib)
    assert sens.base_loss == pytest.approx(base, abs=1e-6)
    checked = 0
    for table in ("t_cat_0", "t_cat_1", "t_cat_3"):
        for fmt in sens.formats(table):
            if fmt == "fp32":
                continue
            q = embq.quantize(model, {table: fmt, "*": "fp32"}, progress=False)
            want = _mean_bce(q, calib) - base
            assert sens.measured(table, fmt) == pytest.approx(want, abs=2e-6, rel=1e-3), (table, fmt)
            checked += 1
    assert checked >= 9
    assert "pq4x8(sample_rows=512)" not in sens.formats("t_cat_2")  # 40 rows < 256 centroids
    assert sens.measured("t_cat_0", "int2-opt") > sens.measured("t_cat_0", "int8")


def test_proxy_follows_its_definition_row_by_row(trained):
    """proxy = 1/(2N) sum_n sum_d (d loss_n / d pooled_n,d)^2 err_n,d^2, with the gradient taken
    here from the whole TorchRec model one row at a time (the id's row gradient)."""
    from embq.embedding.encode import encode_table
    from embq.embedding.registry import get_format
    from embq.hardware.sensitivity import collect, table_sensitivity
    from embq.models.tables import find_tables

    model, data, _ = trained
    rows = list(data.batches(1000, 1200, batch_size=200))
    cal = collect(model, rows)
    sens = table_sensitivity(model, cal, ["int2-opt", "int4-opt"], method="proxy", progress=False)
    batch = rows[0]
    ebc = model.sparse_arch.embedding_bag_collection
    tables = {t.name: t for t in find_tables(model)}
    for name, feature in (("t_cat_0", "cat_0"), ("t_cat_1", "cat_1")):
        weight = ebc.embedding_bags[name].weight
        ids = batch.sparse[feature].values()
        grads = []
        for n in range(len(batch)):
            weight.requires_grad_(True)
            one = type(batch)(batch.dense[n : n + 1], _row_kjt(batch, n), batch.labels[n : n + 1])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                model(one.dense, one.sparse).reshape(-1), one.labels, reduction="sum")  # fmt: skip
            (g,) = torch.autograd.grad(loss, weight)
            grads.append(g[ids[n]].double())
            weight.requires_grad_(False)
        g = torch.stack(grads)
        for fmt in ("int2-opt", "int4-opt"):
            t = encode_table(tables[name], fmt)
            decoded = torch.from_numpy(get_format(fmt).decode(t.codes, t.params, 16)).double()
            err = decoded[ids] - weight.detach().double()[ids]
            want = float(0.5 * (g * g * err * err).sum() / len(batch))
            assert sens.measured(name, fmt) == pytest.approx(want, rel=1e-4), (name, fmt)
    assert sens.measured("t_cat_0", "int2-opt") > sens.measured("t_cat_0", "int4-opt")


def _row_kjt(batch, n: int):
    from embq.data.prepared import ids_to_kjt

    keys = batch.sparse.keys()
    ids = np.array([[int(batch.sparse[k].values()[n]) for k in keys]])
    return ids_to_kjt(ids, keys)


def test_sensitivity_is_cached_by_model_rows_and_formats(trained, tmp_path):
    from embq.hardware.sensitivity import collect, table_sensitivity

    model, data, _ = trained
    cal = collect(model, data.batches(0, 2000, batch_size=1000))
    first = table_sensitivity(model, cal, ["int4-opt"], cache_dir=tmp_path, progress=False)
    again = table_sensitivity(model, cal, ["int4-opt"], cache_dir=tmp_path, progress=False)
    assert not first.cached and again.cached and again.tables == first.tables
    other = table_sensitivity(model, cal, ["int2-opt"], cache_dir=tmp_path, progress=False)
    assert not other.cached and len(list(tmp_path.glob("sensitivity-*.json"))) == 2
    with pytest.raises(ConfigError, match="'exact' or 'proxy'"):
        table_sensitivity(model, cal, ["int4-opt"], method="hessian", progress=False)


def test_encodings_are_what_quantize_makes(trained, planner):
    model, _, _ = trained
    qmodel = embq.quantize(model, {"*": "int4-opt", "t_cat_0": "pq4x8(sample_rows=512)"},
                           progress=False)  # fmt: skip
    for t in qmodel.tables:
        mine = planner.encodings.table(t.name, t.format)
        np.testing.assert_array_equal(mine.codes, t.codes)
        ids = np.array([0, 3, 3, t.rows - 1])
        want = embq.embedding.registry.get_format(t.format).decode(t.codes[ids], t.params, t.dim)
        got = planner.encodings.decoded_rows(t.name, t.format, ids).numpy()
        np.testing.assert_array_equal(got, want)


def test_monotone_predictions():
    out = monotone({"fp32": 0.0, "fp16": -1e-6, "int8": 2e-6, "int4-opt": 1e-6,
                    "int4-greedy": 5e-6, "int2-opt": -3e-6, "pq4x8": -1.0, "pq8x8": 9e-6}, 16)  # fmt: skip
    assert out["fp32"] == 0 and out["fp16"] > 0 and out["int8"] == 2e-6
    assert out["int4-opt"] > out["int8"] and out["int4-greedy"] == 5e-6
    assert out["int2-opt"] > out["int4-opt"] and out["int2-opt"] < out["int4-greedy"]
    # PQ by its code bits per value at dim 16: pq8x8 has 4 (with int4), pq4x8 2 (with int2)
    assert out["pq8x8"] == 9e-6 and out["pq4x8"] == out["int2-opt"]


def test_plans_fit_and_measure_as_quantize_serves_them(trained, planner):
    model, data, _ = trained
    planned = planner.plan(0.3)
    assert planned.predicted["bytes"] <= round(0.3 * planner.total_fp32)
    planner.measure_loss([planned])
    # the runtime holds exactly the predicted bytes (its own memory accounting)
    assert planned.measured["bytes"] == planned.predicted["bytes"]
    # an independent path: embq.quantize with the plan, scored on the held-out rows
    qmodel = embq.quantize(model, planned.plan, progress=False)
    kernels = {t["name"]: t["kernel_choice"] for t in qmodel.metadata["tables"]}
    assert kernels == {t.name: c.runtime for t, c in zip(planner.tables, planned.choices)}
    from embq.models.metrics import evaluate

    got = evaluate(qmodel.module, data.batches(*planner.heldout_range, batch_size=8192))["logloss"]
    assert planned.measured["loss"] == pytest.approx(got, abs=1e-9)
    assert set(range(*planner.calib_range)).isdisjoint(range(*planner.heldout_range))


def test_infeasible_budgets_name_the_smallest_feasible_one(planner):
    least = planner.min_bytes()
    with pytest.raises(InfeasibleError, match="smallest feasible budget there is") as info:
        planner.plan(least - 1)
    assert info.value.min_bytes == least
    assert f"{least / planner.total_fp32:.4f} of fp32" in str(info.value)
    assert planner.plan(least).predicted["bytes"] == least


def test_a_latency_budget_is_respected(planner):
    free = planner.plan(0.25)
    tight = free.predicted["seconds"] * 0.9
    try:
        bound = planner.plan(0.25, max_seconds=tight)
    except InfeasibleError:
        return
    assert bound.predicted["seconds"] <= tight * (1 + 1e-9)
    assert bound.solution.loss >= free.solution.loss


def test_nvidia_minimum_includes_fbgemms_table_alignment(trained):
    """On nvidia-fbgemm the smallest plan is every table at 16-byte rows, each table rounded
    to 128 bytes: fbgemm's own split-state sizing says the same."""
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import nbit_construct_split_state

    from embq.hardware.planner import Planner
    from embq.hardware.spec import load_spec

    model, data, _ = trained
    nv = Planner(model, data, load_spec("nvidia-fbgemm"), formats=FORMATS, calib_rows=6000,
                 progress=False)  # fmt: skip
    specs = [(f"t{i}", rows, 16, SparseType.INT4, EmbeddingLocation.DEVICE)
             for i, rows in enumerate(CARDINALITIES)]  # fmt: skip
    want = nbit_construct_split_state(specs, cacheable=False, row_alignment=16).dev_size
    assert nv.min_bytes() == want
    plan = nv.plan(want)
    assert not any(c.format.startswith("int2") for c in plan.choices)
    assert all(c.runtime is None for c in plan.choices) and plan.plan.kernels == ()


def test_the_plan_command(trained, tmp_path):
    from embq.cli import main
    from embq.cli.quantize import quantize_model_dir

    _, _, root = trained
    out = tmp_path / "plan.json"
    rc = main(["plan", "--model", str(root / "model"), "--data", str(root / "prepared"),
               "--max-bytes", "0.3", "--output", str(out), "--formats", ",".join(FORMATS),
               "--calib-rows", "5000", "--sweep", "0.2,0.3", "--quiet"])  # fmt: skip
    assert rc == 0
    plan = embq.Plan.load(out)
    report = json.loads((tmp_path / "plan.report.json").read_text())
    assert report["plan"]["predicted_bytes"] <= 0.3 * report["fp32_bytes"] + 1
    assert {t["name"]: t["format"] for t in report["tables"]} == {
        k: str(v) for k, v in plan.tables}  # fmt: skip
    assert "measured_loss_pct" in report["plan"] and len(report["sweep"]) >= 4
    artifact, _ = quantize_model_dir(root / "model", plan, tmp_path / "q.embq", progress=False)
    loaded = embq.load(artifact)
    chosen = {t["name"]: t["runtime_kernel"] for t in report["tables"]}
    assert {t["name"]: t["kernel_choice"] for t in loaded.metadata["tables"]} == chosen
    assert main(["plan", "--model", str(root / "model"), "--data", str(root / "prepared"),
                 "--max-bytes", "0.01", "--output", str(tmp_path / "no.json"),
                 "--formats", "int8,int4-opt", "--calib-rows", "5000", "--quiet"]) == 2  # fmt: skip


def test_the_search_prices_plans_as_the_latency_model_does(planner):
    """The integer program's linear latency (calls shared, permutes and the reorder saved when
    one call serves every table) equals the cost model's prediction for the same plan."""
    from embq.hardware.search import evaluate

    problem = planner.problem()
    for budget in (0.2, 0.3, 1.0):
        planned = planner.plan(budget)
        got = evaluate(problem, planned.solution.picks).seconds
        assert got == pytest.approx(planned.predicted["seconds"], rel=1e-12)
    uniform = planner.uniform("int8")  # one call: no permute, no reorder
    picks = [next(k for k, o in enumerate(item.options) if o.label == c.label)
             for item, c in zip(problem.items, uniform.choices)]  # fmt: skip
    assert evaluate(problem, picks).seconds == pytest.approx(uniform.predicted["seconds"], rel=1e-12)


def test_calibration_rows_never_overlap_the_held_out_rows(trained):
    from embq.hardware.planner import Planner
    from embq.hardware.spec import load_spec

    model, data, _ = trained
    spec = load_spec("x86-fbgemm")
    (_, train_stop), (held_start, held_stop) = data.split(0.1)
    train = Planner(model, data, spec, calib_rows=5000, progress=False)
    assert train.calib_range == (train_stop - 5000, train_stop)
    assert train.heldout_range == (held_start, held_stop)
    held = Planner(model, data, spec, calib_rows=5000, calibration="holdout", progress=False)
    middle = (held_start + held_stop) // 2
    assert held.calib_range == (held_start, min(middle, held_start + 5000))
    assert held.heldout_range == (middle, held_stop)
    with pytest.raises(ConfigError, match="exceeds"):
        Planner(model, data, spec, calib_rows=10**9, progress=False)
    with pytest.raises(ConfigError, match="calibration must be"):
        Planner(model, data, spec, calibration="test", progress=False)
