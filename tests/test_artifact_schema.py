"""The manifests embq writes follow docs/artifact.schema.json (the documented contract), and the
schema is strict enough to reject a manifest that breaks it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

import embq

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "docs" / "artifact.schema.json").read_text(encoding="utf-8"))


def _validate(manifest: dict) -> None:
    jsonschema.Draft202012Validator(SCHEMA).validate(manifest)


def test_schema_is_valid():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    """Real manifests: a DLRM with mixed formats (codebooks included), one with quantized dense
    towers, and a streamed one-table artifact."""
    from tests.toy import toy_dlrm

    root = tmp_path_factory.mktemp("schema")
    model, batches = toy_dlrm(rows=2048, epochs=1, seed=1)
    plan = {"*": "int4-greedy", "t_c0": "cb4-shared", "t_c1": "int8"}
    mixed = embq.save(embq.quantize(model, plan, progress=False), root / "mixed.embq")
    calib = batches[:2]
    dense_plan = {"tables": {"*": "int8"}, "dense": "rtn:w8a8"}
    dense = embq.save(embq.quantize(model, dense_plan, calib=calib, progress=False),
                      root / "dense.embq")  # fmt: skip
    np.save(root / "t.npy", np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32))
    table = embq.quantize_table(root / "t.npy", "pq4x8(sample_rows=300)", root / "t.embq",
                                progress=False)  # fmt: skip
    return [json.loads((p / "manifest.json").read_text()) for p in (mixed, dense, table)]


def test_written_manifests_follow_the_schema(manifests):
    import hashlib

    kinds = set()
    for manifest in manifests:
        _validate(manifest)
        kinds.add((manifest["dense"] or {}).get("meta", {}).get("kind"))
        # the digest as docs/artifact.md defines it, recomputed here independently
        body = {k: v for k, v in manifest.items() if k != "digest"}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert manifest["digest"] == "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
    assert kinds == {"fp32", "embq-dense-ptq", None}


@pytest.mark.parametrize("edit", [
    lambda m: m.update(version=2),
    lambda m: m.update(format="other"),
    lambda m: m["tables"][0].pop("sha256"),
    lambda m: m["tables"][0].update(rows=0),
    lambda m: m["tables"][0].update(name="../escape"),
    lambda m: m["tables"][0].update(file="/etc/passwd"),
    lambda m: m["tables"][0].update(sha256="abc"),
    lambda m: m["model"]["pooling"].update(t_c0="MAX"),
    lambda m: m.update(extra=1),
    lambda m: m.pop("digest"),
    lambda m: m.update(digest="sha256:" + "A" * 64),
    lambda m: m.update(digest="md5:0123"),
])  # fmt: skip
def test_schema_rejects_broken_manifests(manifests, edit):
    manifest = copy.deepcopy(manifests[0])
    edit(manifest)
    with pytest.raises(jsonschema.ValidationError):
        _validate(manifest)


def test_the_loader_refuses_what_the_schema_refuses(manifests, tmp_path):
    """Two of the schema's rules checked against the reader itself: both must say no."""
    from embq.artifact.reader import load_artifact
    from embq.errors import ArtifactError

    del manifests  # the edits below are made on a fresh copy on disk
    from tests.toy import toy_dlrm

    model, _ = toy_dlrm(rows=2048, epochs=1, seed=1)
    path = embq.save(embq.quantize(model, "int8", progress=False), tmp_path / "a.embq")
    manifest = json.loads((path / "manifest.json").read_text())
    for edit in (lambda m: m.update(version=2), lambda m: m["tables"][0].update(rows=0)):
        broken = copy.deepcopy(manifest)
        edit(broken)
        (path / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(jsonschema.ValidationError):
            _validate(broken)
        with pytest.raises(ArtifactError):
            load_artifact(path)
