"""The runtime: fbgemm TBE / codebook-bag lookups against a float64 reference, artifacts written
by `embq quantize` served by `load_inference_model`, and the TorchScript export.

Tolerances are those of test_torchrec (float32 accumulation of exactly decoded rows).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from embq.errors import ArtifactError, ConfigError, DataError
from tests.test_torchrec import (
    _assert_pooled,
    _bags,
    _ebc,
    _format_dims,
    _reference,
    make_trained_dlrm,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    return make_trained_dlrm(tmp_path_factory.mktemp("trained"), seed=1)


def _cli(argv: list[str]) -> None:
    """Run `embq quantize ...` through the parser that cli_quantize registers."""
    from embq.cli_quantize import add_parser

    parser = argparse.ArgumentParser(prog="embq")
    add_parser(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def _split(pooled: torch.Tensor, tables) -> dict[str, torch.Tensor]:
    """Runtime output [B, sum dims] (features in table order) -> {feature: [B, dim]}."""
    out, col = {}, 0
    for t in tables:
        for f in t.feature_names:
            out[f] = pooled[:, col : col + t.dim]
            col += t.dim
    return out


# --------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("name,dims", _format_dims(), ids=[n for n, _ in _format_dims()])
def test_runtime_bags_pool_like_float64_reference(name: str, dims: list[int]):
    from embq.runtime import build_embedding_bags
    from embq.torchrec import find_tables, quantize_tables

    pooling = ["MEAN", "SUM", "MEAN"][: len(dims)]
    tables = quantize_tables(find_tables(_ebc(dims, pooling, seed=2)), name)
    bags = build_embedding_bags(tables)
    kjt = _bags([f"f{i}" for i in range(len(dims))], seed=5)
    _assert_pooled(_split(bags(kjt.values(), kjt.offsets()), tables), _reference(tables, kjt))


def test_mixed_kernels_interleaved_features_and_tables_stay_compressed():
    """SUM-TBE, MEAN-TBE and codebook tables interleaved: each kernel gets its features' bags,
    the output columns come back in feature order, and only compressed bytes are held."""
    from embq.runtime import build_embedding_bags
    from embq.torchrec import find_tables, quantize_tables

    dims = [16, 32, 64, 16, 32]
    ebc = _ebc(dims, ["SUM", "MEAN", "SUM", "MEAN", "SUM"], seed=3)
    plan = {"t_f0": "cb4-shared", "t_f1": "int4", "t_f2": "int8", "t_f3": "pq8x8", "t_f4": "fp16"}
    tables = quantize_tables(find_tables(ebc), plan)
    bags = build_embedding_bags(tables)
    assert [type(g.kernel).__name__ for g in bags.groups] == [
        "IntNBitTableBatchedEmbeddingBagsCodegen",
        "IntNBitTableBatchedEmbeddingBagsCodegen",
        "CodebookBagCollection",
    ]
    kjt = _bags([f"f{i}" for i in range(len(dims))], seed=6)
    _assert_pooled(_split(bags(kjt.values(), kjt.offsets()), tables), _reference(tables, kjt))
    held = sum(g.kernel.weights_host.numel() for g in bags.groups[:2])
    held += sum(b.codes.numel() + 4 * b.codebook.numel() for b in bags.groups[2].kernel.bags)
    encoded = sum(t.stats["bytes"] for t in tables)
    assert held < encoded + 128 * len(tables)  # cacheline alignment only, no float copies
    assert encoded < 0.5 * sum(t.stats["fp32_bytes"] for t in tables)


def test_codebook_bags_script_and_decode_like_the_formats():
    """Each codebook kind decodes rows bit-identically to its format's numpy decode, and the
    collection scripts to TorchScript with the same pooled outputs."""
    from embq.codebook_bag import CodebookBagCollection
    from embq.formats import get_format
    from embq.torchrec import find_tables, quantize_tables

    ebc = _ebc([16, 32, 64, 32], ["SUM", "MEAN", "SUM", "MEAN"], seed=7)
    plan = {"t_f0": "cb4-row", "t_f1": "cb4-shared", "t_f2": "pq16x8", "t_f3": "pq8x5"}
    tables = quantize_tables(find_tables(ebc), plan)
    bags = CodebookBagCollection.from_tables(tables)
    for t, bag in zip(tables, bags.bags):
        want = get_format(t.format).decode(t.codes, t.params, t.dim)
        np.testing.assert_array_equal(bag.decode(torch.arange(t.rows)).numpy(), want)
    kjt = _bags(bags.feature_names, seed=8)
    scripted = torch.jit.script(bags)
    eager = bags(kjt.values(), kjt.offsets())
    torch.testing.assert_close(scripted(kjt.values(), kjt.offsets()), eager, atol=0, rtol=0)
    _assert_pooled(_split(eager, tables), _reference(tables, kjt))


def test_out_of_range_ids_raise():
    from embq.runtime import build_embedding_bags
    from embq.torchrec import find_tables, quantize_tables

    for fmt in ("int4", "cb4-row"):
        bags = build_embedding_bags(quantize_tables(find_tables(_ebc([16])), fmt))
        with pytest.raises(RuntimeError):
            bags(torch.tensor([0, 300]), torch.tensor([0, 1, 2]))


# --------------------------------------------------------------------------- artifacts


@pytest.fixture(scope="module")
def quantized(trained, tmp_path_factory):
    """A mixed-plan artifact written by `embq quantize`, with the plan and paths."""
    model_dir, data_dir = trained
    out = tmp_path_factory.mktemp("art")
    plan = {"*": "int4-greedy", "t_c0": "pq8x8", "t_c2": "cb4-shared", "t_c3": "int8"}
    plan_file = out / "plan.json"
    plan_file.write_text(json.dumps(plan))
    artifact = out / "model.embq"
    _cli(
        ["quantize", "--model", str(model_dir), "--plan", str(plan_file), "--output", str(artifact)]
    )
    return artifact, plan, model_dir, data_dir


def test_cli_artifact_predicts_like_in_memory_quantized_model(quantized, capsys):
    from embq.artifact import load_artifact
    from embq.data.prepared import PreparedData
    from embq.model import load_model
    from embq.runtime import load_inference_model
    from embq.torchrec import quantize_model

    artifact, plan, model_dir, data_dir = quantized
    art = load_artifact(artifact)
    assert art.model["type"] == "dlrm" and art.dense_meta == {"kind": "fp32"}
    assert {n: e.format for n, e in art.tables.items()} == {
        "t_c0": "pq8x8",
        "t_c1": "int4-greedy",
        "t_c2": "cb4-shared",
        "t_c3": "int8",
    }
    assert art.tables["t_c2"].feature_names == ["c2"]
    model, _ = load_model(model_dir)
    expected = quantize_model(model, plan)
    served = load_inference_model(artifact)
    data = PreparedData(data_dir)
    _, (start, stop) = data.split(0.1)
    for batch in data.batches(start, stop, 512):
        want = expected.model(batch.dense, batch.sparse).reshape(-1)
        got = served(batch.dense, batch.sparse)
        assert got.dtype == torch.float32 and got.shape == (len(batch),)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for t in expected.tables:  # the artifact holds exactly the in-memory model's bytes
        np.testing.assert_array_equal(art.table(t.name).rows, t.codes)


def test_cli_prints_summary_and_refuses_bad_plans(trained, tmp_path, capsys):
    model_dir, _ = trained
    _cli(
        [
            "quantize",
            "--model",
            str(model_dir),
            "--plan",
            "int8",
            "--output",
            str(tmp_path / "a.embq"),
        ]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["formats"] == {"int8": 4} and summary["size_ratio"] == pytest.approx(20 / 64)
    with pytest.raises(ConfigError, match="unknown format"):
        _cli(
            [
                "quantize",
                "--model",
                str(model_dir),
                "--plan",
                "int3",
                "--output",
                str(tmp_path / "b.embq"),
            ]
        )
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"t_zz": "int4"}))
    with pytest.raises(ConfigError, match="t_zz"):
        _cli(
            [
                "quantize",
                "--model",
                str(model_dir),
                "--plan",
                str(bad),
                "--output",
                str(tmp_path / "c.embq"),
            ]
        )
    assert not (tmp_path / "b.embq").exists() and not (tmp_path / "c.embq").exists()


def test_inference_metadata(quantized):
    from embq.runtime import inference_metadata

    artifact, *_ = quantized
    meta = inference_metadata(artifact)
    assert meta["model"] == "dlrm" and meta["output"] == "logits float32 [B]"
    assert meta["inputs"]["dense"] == {"shape": [None, 5], "dtype": "float32"}
    assert meta["inputs"]["sparse"]["feature_names"] == ["c0", "c1", "c2", "c3"]
    assert meta["inputs"]["sparse"]["table_rows"] == {"c0": 400, "c1": 300, "c2": 200, "c3": 100}
    kernels = {t["name"]: t["kernel"] for t in meta["tables"]}
    assert kernels == {
        "t_c0": "codebook-bag",
        "t_c1": "fbgemm-tbe",
        "t_c2": "codebook-bag",
        "t_c3": "fbgemm-tbe",
    }
    assert meta["formats"] == {"pq8x8": 1, "int4-greedy": 1, "cb4-shared": 1, "int8": 1}
    assert meta["table_bytes"] < meta["fp32_bytes"] and meta["dense"]["kind"] == "fp32"
    json.dumps(meta)


def test_inputs_are_checked(quantized):
    from embq.data.prepared import ids_to_kjt
    from embq.runtime import load_inference_model

    artifact, *_ = quantized
    model = load_inference_model(artifact, verify=False)
    ids = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    dense = torch.zeros(2, 5)
    ok = model(dense, ids_to_kjt(ids, ["c0", "c1", "c2", "c3"]))
    shuffled = model(dense, ids_to_kjt(ids[:, [2, 0, 3, 1]], ["c2", "c0", "c3", "c1"]))
    torch.testing.assert_close(ok, shuffled, atol=0, rtol=0)
    with pytest.raises(DataError, match="lacks features"):
        model(dense, ids_to_kjt(ids[:, :3], ["c0", "c1", "c2"]))
    with pytest.raises(DataError, match="feature 'c3'.*100 rows"):
        model(dense, ids_to_kjt(np.array([[1, 2, 3, 100], [5, 6, 7, 8]]), ["c0", "c1", "c2", "c3"]))
    with pytest.raises(DataError, match=r"float32 \[B, 5\]"):
        model(torch.zeros(2, 4), ids_to_kjt(ids, ["c0", "c1", "c2", "c3"]))
    with pytest.raises(DataError, match="B=3"):
        model(torch.zeros(3, 5), ids_to_kjt(ids, ["c0", "c1", "c2", "c3"]))


def _halved_towers(config, tensors, meta):
    """A stand-in dense loader for a new kind: fp32 towers with the top MLP's output halved."""
    from embq.runtime import DENSE_LOADERS

    towers = DENSE_LOADERS["fp32"](config, tensors, meta)
    last = [m for m in towers.over_arch.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(0.5)
        last.bias.mul_(0.5)
    return towers


def test_dense_kinds_dispatch_in_one_table(trained, tmp_path, monkeypatch):
    from embq.cli_quantize import write_artifact
    from embq.data.prepared import ids_to_kjt
    from embq.model import load_model
    from embq.runtime import DENSE_LOADERS, load_inference_model
    from embq.torchrec import dense_state_dict, find_tables, quantize_tables

    model, config = load_model(trained[0])
    tables = quantize_tables(find_tables(model), "int4")
    path = write_artifact(tmp_path / "ok.embq", tables, config, dense_state_dict(model))
    batch = (torch.randn(3, 5), ids_to_kjt(np.array([[1, 2, 3, 4]] * 3), ["c0", "c1", "c2", "c3"]))
    base = load_inference_model(path)(*batch)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["dense"]["meta"]["kind"] = "int8-brecq-v9"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="kind 'int8-brecq-v9'.*known kinds: \\['fp32'"):
        load_inference_model(path, verify=False)
    # a kind registered by "module:function" is imported when first needed
    monkeypatch.setitem(DENSE_LOADERS, "int8-brecq-v9", "tests.test_runtime:_halved_towers")
    torch.testing.assert_close(load_inference_model(path, verify=False)(*batch), base * 0.5)


def test_non_dlrm_artifacts_are_refused_but_serve_lookups(trained, tmp_path):
    from embq.artifact import ArtifactWriter
    from embq.model import load_model
    from embq.runtime import load_embedding_bags, load_inference_model
    from embq.torchrec import find_tables, quantize_tables

    model, _ = load_model(trained[0])
    tables = quantize_tables(find_tables(model), "int4")
    with ArtifactWriter(tmp_path / "tables-only.embq") as w:
        w.add_table("t", "int4", tables[0].codes, 16, feature_names=["c0"])
        w.publish()
    with pytest.raises(ArtifactError, match="holds no DLRM"):
        load_inference_model(tmp_path / "tables-only.embq")
    bags = load_embedding_bags(tmp_path / "tables-only.embq")  # tables alone still serve lookups
    assert bags(torch.tensor([1, 2]), torch.tensor([0, 2])).shape == (1, 16)


# --------------------------------------------------------------------------- TorchScript


_LOAD_SCRIPT = """
import sys, torch, fbgemm_gpu
from safetensors.torch import load_file, save_file
m = torch.jit.load(sys.argv[1])
inputs = load_file(sys.argv[2])
out = m(inputs["dense"], inputs["values"], inputs["offsets"])
assert not any(k.split(".")[0] in ("embq", "torchrec") for k in sys.modules), "imported more"
save_file({"logits": out}, sys.argv[3])
"""


def test_torchscript_export_round_trip(quantized, tmp_path):
    from embq.data.prepared import PreparedData
    from embq.runtime import METADATA_FILE, export_torchscript, load_inference_model

    artifact, _, _, data_dir = quantized
    out = export_torchscript(artifact, tmp_path / "model.pt")
    eager = load_inference_model(artifact)
    data = PreparedData(data_dir)
    batch = next(data.batches(0, 300, 300))
    want = eager(batch.dense, batch.sparse)
    extra = {METADATA_FILE: ""}
    scripted = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra[METADATA_FILE])["inputs"]["sparse"]["feature_names"] == [
        "c0",
        "c1",
        "c2",
        "c3",
    ]
    values, offsets = batch.sparse.values(), batch.sparse.offsets()
    torch.testing.assert_close(scripted(batch.dense, values, offsets), want, atol=0, rtol=0)
    # a fresh process with only torch + fbgemm_gpu imported runs it
    save_file(
        {"dense": batch.dense, "values": values.long(), "offsets": offsets.long()},
        str(tmp_path / "in.safetensors"),
    )
    subprocess.run(
        [
            sys.executable,
            "-c",
            _LOAD_SCRIPT,
            str(out),
            str(tmp_path / "in.safetensors"),
            str(tmp_path / "out.safetensors"),
        ],
        check=True,
        timeout=120,
    )
    got = load_file(str(tmp_path / "out.safetensors"))["logits"]
    torch.testing.assert_close(got, want, atol=0, rtol=0)
