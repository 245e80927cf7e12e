"""A plan's per-table kernel choices reach the runtime, are recorded in the artifact, and are
what loading the artifact uses unless a kernel is given."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch

import embq
from embq.artifact.digest import DIGEST_FIELD, manifest_digest
from embq.artifact.seal import seal_artifact
from embq.errors import ArtifactError, ConfigError

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "docs" / "artifact.schema.json").read_text(encoding="utf-8"))
PLAN = {
    "tables": {"*": "int4-opt", "t_c1": "int8", "t_c2": "int2-opt"},
    "kernels": {"*": "compact", "t_c1": "tbe", "t_c2": "auto"},
}
# int4 under "compact": ATen n-bit; int8 under "tbe": TBE unpadded (dim 8: 12 B rows);
# int2 under "auto": TBE with its 6-byte rows padded to 8
EXPECTED = {"t_c0": "aten-nbit", "t_c1": "fbgemm-tbe", "t_c2": "fbgemm-tbe"}


@pytest.fixture(scope="module")
def toy():
    from tests.toy import toy_dlrm

    model, batches = toy_dlrm(rows=2048, epochs=1, seed=2)
    return model, batches


def _kernels(meta: dict) -> dict[str, str]:
    return {t["name"]: t["kernel"] for t in meta["tables"]}


def test_plan_kernels_are_served_recorded_and_reloaded(toy, tmp_path):
    from embq.runtime.load import load_inference_model

    model, batches = toy
    qmodel = embq.quantize(model, PLAN, progress=False)
    assert _kernels(qmodel.metadata) == EXPECTED
    memory = {t["name"]: t["memory_bytes"] for t in qmodel.metadata["tables"]}
    rows = {t.name: t.rows for t in qmodel.tables}
    assert memory == {"t_c0": rows["t_c0"] * 8, "t_c1": rows["t_c1"] * 12, "t_c2": rows["t_c2"] * 8}

    path = embq.save(qmodel, tmp_path / "plan.embq")
    manifest = json.loads((path / "manifest.json").read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(manifest)
    assert {t["name"]: t["kernel_choice"] for t in manifest["tables"]} == {
        "t_c0": "compact", "t_c1": "tbe", "t_c2": "auto"}  # fmt: skip

    loaded = embq.load(path)
    assert _kernels(loaded.metadata) == EXPECTED
    plan = embq.Plan.parse(PLAN)
    for name in EXPECTED:  # the manifest spells the plan out table by table
        assert loaded.plan.format_for(name) == plan.format_for(name)
        assert loaded.plan.kernel_for(name) == plan.kernel_for(name)
    assert _kernels(load_inference_model(path).metadata) == EXPECTED
    batch = batches[0]
    with torch.no_grad():
        assert torch.equal(loaded(batch.dense, batch.sparse), qmodel(batch.dense, batch.sparse))
        # an explicit choice overrides the recorded ones; the numbers agree up to rounding
        auto = embq.load(path, kernel="auto")
        assert set(_kernels(auto.metadata).values()) == {"fbgemm-tbe"}
        torch.testing.assert_close(auto(batch.dense, batch.sparse),
                                   loaded(batch.dense, batch.sparse), rtol=0, atol=1e-5)  # fmt: skip
        mixed = embq.load(path, kernel={"t_c0": "tbe"})  # the others keep their records
        assert _kernels(mixed.metadata) == {**EXPECTED, "t_c0": "fbgemm-tbe"}


def test_the_predictor_serves_the_recorded_kernels(toy, tmp_path):
    from embq_serving.predictor import Predictor

    model, _ = toy
    path = embq.save(embq.quantize(model, PLAN, progress=False), tmp_path / "p.embq")
    assert _kernels(Predictor(path).metadata()) == EXPECTED
    assert set(_kernels(Predictor(path, kernel="auto").metadata()).values()) == {"fbgemm-tbe"}


def test_a_bad_recorded_kernel_is_refused(toy, tmp_path):
    model, _ = toy
    path = embq.save(embq.quantize(model, PLAN, progress=False), tmp_path / "bad.embq")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["tables"][0]["kernel_choice"] = "fast"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(SCHEMA).validate(manifest)
    # sealed as if on purpose: the digest matches, the loader still refuses the value
    manifest[DIGEST_FIELD] = manifest_digest(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="kernel_choice"):
        embq.load(path)
    with pytest.raises(ArtifactError, match="kernel_choice"):
        seal_artifact(path)


def test_resolve_kernels():
    from embq.runtime.kernel_choice import resolve_kernels

    names = ["a", "b", "c"]
    assert resolve_kernels(names) == dict.fromkeys(names, "auto")
    assert resolve_kernels(names, "compact") == dict.fromkeys(names, "compact")
    assert resolve_kernels(names, None, {"b": "tbe"}) == {"a": "auto", "b": "tbe", "c": "auto"}
    assert resolve_kernels(names, {"*": "tbe", "a": "compact"}, {"b": "auto"}) == {
        "a": "compact", "b": "tbe", "c": "tbe"}  # fmt: skip
    assert resolve_kernels(names, {"a": "compact"}, {"b": "tbe"}) == {
        "a": "compact", "b": "tbe", "c": "auto"}  # fmt: skip
    with pytest.raises(ConfigError, match="not among"):
        resolve_kernels(names, {"z": "tbe"})
    with pytest.raises(ConfigError, match="kernel must be one of"):
        resolve_kernels(names, {"a": "fast"})
