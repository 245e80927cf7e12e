"""Issue 13, parts 2 and 3: an artifact's identity is its digest, every load failure is an
EmbqError, and a published artifact is never written to, nor served once it changed on disk.

Before the digest, fields no hash covered changed answers silently (pooling SUM -> MEAN, the
order of `tables`, feature names in the config, dense quantizer bits); several edits failed
with KeyError / RuntimeError / RecursionError / ValueError instead of an ArtifactError; and a
table file edited in place under a "compact" model changed its answers (or, truncated, killed
the process with SIGBUS: tests/test_http_hardening.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import embq
from embq.artifact.reader import load_artifact
from embq.errors import ArtifactError, EmbqError
from tests.test_serving import make_artifact, make_model_dir, sample_batch


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("integrity") / "model")


@pytest.fixture(scope="module")
def int4(model_dir) -> Path:
    return make_artifact(model_dir, "int4", model_dir.parent / "int4.embq")


@pytest.fixture(scope="module")
def ptq(tmp_path_factory) -> Path:
    """A toy DLRM with int8 tables and dense towers quantized W4A8 by embq.dense (rtn)."""
    from tests.toy import toy_dlrm

    model, batches = toy_dlrm(rows=2048, epochs=1, seed=2)
    plan = {"tables": {"*": "int8"}, "dense": "rtn:w4a8"}
    qmodel = embq.quantize(model, plan, calib=batches[:2], progress=False)
    return embq.save(qmodel, tmp_path_factory.mktemp("ptq") / "ptq.embq")


def copy_of(artifact: Path, tmp_path: Path, name: str = "copy.embq") -> Path:
    return Path(shutil.copytree(artifact, tmp_path / name))


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text(encoding="utf-8"))


def reference_digest(m: dict) -> str:
    """The digest as docs/artifact.md defines it, computed here independently of embq."""
    body = {k: v for k, v in m.items() if k != "digest"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def write_manifest(path: Path, m: dict, seal: bool) -> None:
    """An edited manifest, sealed as `embq seal` would (its digest recomputed) or keeping the
    digest it had."""
    if seal:
        m = {**m, "digest": reference_digest(m)}
    (path / "manifest.json").write_text(json.dumps(m, indent=1), encoding="utf-8")


def logits(path: Path, **kwargs) -> np.ndarray:
    from embq_serving.predictor import Predictor

    dense, sparse = sample_batch()
    return Predictor(path, **kwargs).logits(dense, sparse)


# --------------------------------------------------------------------------- the digest


def test_the_digest_identifies_the_artifact_everywhere(int4):
    from embq_serving.predictor import Predictor

    m = manifest(int4)
    digest = reference_digest(m)
    assert m["digest"] == digest
    assert embq.load(int4).digest == digest
    predictor = Predictor(int4)
    assert predictor.digest == predictor.metadata()["digest"] == digest
    assert load_artifact(int4).digest == digest


def test_save_records_the_digest(model_dir, tmp_path):
    from embq.models.dlrm import load_model

    model, _ = load_model(model_dir)
    qmodel = embq.quantize(model, "int8", progress=False)
    assert qmodel.digest is None
    path = embq.save(qmodel, tmp_path / "q.embq")
    assert qmodel.digest == manifest(path)["digest"] == embq.load(path).digest


def test_whitespace_and_key_order_do_not_change_the_digest(int4, tmp_path):
    path = copy_of(int4, tmp_path)
    m = manifest(path)
    reordered = dict(reversed(list(m.items())))
    (path / "manifest.json").write_text(json.dumps(reordered, indent=7), encoding="utf-8")
    np.testing.assert_array_equal(logits(path), logits(int4))


def _pooling_to_mean(m: dict) -> None:
    m["model"]["pooling"]["t_cat_1"] = "MEAN"


def _tables_reordered(m: dict) -> None:
    m["tables"] = m["tables"][::-1]


def _config_features_swapped(m: dict) -> None:
    names = m["model"]["config"]["sparse_feature_names"]
    names[0], names[1] = names[1], names[0]


def _format_int4_to_cb4_shared(m: dict) -> None:
    m["tables"][0]["format"] = "cb4-shared"  # same bytes per row (dim/2 + 4) as int4


def _rows_in_config(m: dict) -> None:
    m["model"]["config"]["num_embeddings"][0] -= 1


SILENT_EDITS = {
    "pooling SUM -> MEAN": _pooling_to_mean,
    "tables reordered": _tables_reordered,
    "config feature names swapped": _config_features_swapped,
    "format int4 -> cb4-shared": _format_int4_to_cb4_shared,
    "config rows": _rows_in_config,
}


@pytest.mark.parametrize("edit", list(SILENT_EDITS))
def test_an_edited_manifest_is_refused_until_sealed(edit, int4, tmp_path):
    path = copy_of(int4, tmp_path)
    m = manifest(path)
    SILENT_EDITS[edit](m)
    write_manifest(path, m, seal=False)
    for load in (lambda: embq.load(path), lambda: logits(path)):
        with pytest.raises(ArtifactError, match="manifest.json was changed after the artifact "
                           "was written.*embq seal"):  # fmt: skip
            load()


SEALED_REFUSALS = {
    "tables reordered": r"lists the tables in the order \['t_cat_2', 't_cat_1', 't_cat_0'\].*"
    r"config orders its features \['cat_0', 'cat_1', 'cat_2'\]",
    "config feature names swapped": r"lists the tables in the order.*config orders its features "
    r"\['cat_1', 'cat_0', 'cat_2'\]",
    "format int4 -> cb4-shared": r"format cb4-shared cannot read this table with params \[\]",
    "config rows": r"table 't_cat_0' is \[700, 16\], but the model's config says \[699, 16\]",
}


@pytest.mark.parametrize("edit", list(SEALED_REFUSALS))
def test_a_sealed_manifest_that_disagrees_with_itself_is_refused(edit, int4, tmp_path):
    """Sealing does not make an inconsistent manifest loadable: one source of truth for the
    table order (the config's features), rows and features checked against the tables, and the
    format checked against the table's params."""
    path = copy_of(int4, tmp_path)
    m = manifest(path)
    SILENT_EDITS[edit](m)
    write_manifest(path, m, seal=True)
    with pytest.raises(ArtifactError, match=SEALED_REFUSALS[edit]):
        embq.load(path)


def test_a_sealed_pooling_edit_is_served_as_sealed(int4, tmp_path):
    """An intended, sealed edit loads, and the model does what the manifest now says."""
    path = copy_of(int4, tmp_path)
    m = manifest(path)
    _pooling_to_mean(m)
    write_manifest(path, m, seal=True)
    dense, sparse = sample_batch()
    model = embq.load(path)
    assert model.metadata["tables"][1]["pooling"] == "MEAN"
    from embq_serving.predictor import Predictor

    mean, total = Predictor(path).logits(dense, sparse), Predictor(int4).logits(dense, sparse)
    assert not np.allclose(mean, total)  # cat_1's bags of 2+ ids now pool to their mean


def test_expect_digest_pins_the_artifact(int4, tmp_path):
    from embq_serving.predictor import Predictor

    digest = manifest(int4)["digest"]
    assert Predictor(int4, expect_digest=digest).digest == digest
    assert embq.load(int4, expect_digest=digest).digest == digest
    other = "sha256:" + "0" * 64
    for load in (lambda: Predictor(int4, expect_digest=other),
                 lambda: embq.load(int4, expect_digest=other)):  # fmt: skip
        with pytest.raises(ArtifactError, match=f"is not the pinned artifact: its digest is "
                           f"{digest}, the expected one {other}"):  # fmt: skip
            load()
    with pytest.raises(ArtifactError, match="64 lowercase hex digits"):
        Predictor(int4, expect_digest=digest.upper())


def test_an_artifact_without_a_digest_is_refused_until_sealed(int4, tmp_path, capsys):
    from embq import cli

    path = copy_of(int4, tmp_path)
    m = manifest(path)
    write_manifest(path, {k: v for k, v in m.items() if k != "digest"}, seal=False)  # as before
    with pytest.raises(ArtifactError, match=r'has no "digest".*run `embq seal'):
        embq.load(path)
    assert cli.main(["seal", str(path)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == {"artifact": str(path), "digest": m["digest"], "previous": None,
                    "changed": True}  # fmt: skip
    np.testing.assert_array_equal(logits(path), logits(int4))
    assert cli.main(["seal", str(path)]) == 0  # sealed already: nothing to write
    assert json.loads(capsys.readouterr().out.strip())["changed"] is False


def test_seal_refuses_files_that_do_not_match_and_never_writes_into_them(int4, tmp_path, capsys):
    from embq import cli

    path = copy_of(int4, tmp_path)
    table = path / "tables" / "t_cat_0.safetensors"
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (path / "tables").iterdir()}
    m = manifest(path)
    _pooling_to_mean(m)
    write_manifest(path, m, seal=False)
    manifest_inode = (path / "manifest.json").stat().st_ino
    assert cli.main(["seal", str(path)]) == 0  # the intended edit: sealed
    capsys.readouterr()
    assert (path / "manifest.json").stat().st_ino != manifest_inode  # a new file, renamed in
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (path / "tables").iterdir()} == before
    embq.load(path)
    data = bytearray(table.read_bytes())
    data[-3] ^= 0x10
    table.write_bytes(bytes(data))
    sealed = (path / "manifest.json").read_bytes()
    assert cli.main(["seal", str(path)]) == 2
    assert "does not match its sha256" in capsys.readouterr().err
    assert (path / "manifest.json").read_bytes() == sealed  # untouched


def test_seal_refuses_what_cannot_load(ptq, tmp_path, capsys):
    from embq import cli

    path = copy_of(ptq, tmp_path)
    m = manifest(path)
    m["dense"]["meta"]["kind"] = "int8-brecq-v9"
    write_manifest(path, m, seal=False)
    assert cli.main(["seal", str(path)]) == 2
    assert "kind 'int8-brecq-v9'" in capsys.readouterr().err


# --------------------------------------------------------------------------- every failure is an EmbqError


def test_dense_bit_width_edits_are_refused(ptq, tmp_path):
    """W4 codes read as 8-bit (or 2-bit) would be other weights: refused even when sealed."""
    for bits in (8, 2):
        path = copy_of(ptq, tmp_path, f"b{bits}.embq")
        m = manifest(path)
        layers = [e for e in m["dense"]["meta"]["layers"] if e["weight"]["kind"] == "uniform"]
        edited = [e for e in layers if e["weight"]["spec"]["bits"] == 4]
        assert edited, "the plan quantizes some weights to 4 bits"
        edited[0]["weight"]["spec"]["bits"] = bits
        write_manifest(path, m, seal=False)
        with pytest.raises(ArtifactError, match="changed after"):
            embq.load(path)
        write_manifest(path, m, seal=True)
        with pytest.raises(ArtifactError, match="codes and the bit width in the metadata disagree"):
            embq.load(path)


def _dense_shape_changed(path: Path) -> None:
    """dense.safetensors with one weight of another shape, its sha256 and size recorded."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "dense.safetensors"))
    key = next(k for k in sorted(tensors) if k.endswith("weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, str(path / "dense.safetensors"))
    m = manifest(path)
    data = (path / "dense.safetensors").read_bytes()
    m["dense"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    write_manifest(path, m, seal=True)


def _deep_manifest(path: Path) -> None:
    (path / "manifest.json").write_text('{"format": "embq", "version": 1, "x": '
                                        + "[" * 100_000 + "]" * 100_000 + "}")  # fmt: skip


def _nul_in_path(path: Path) -> None:
    m = manifest(path)
    m["tables"][0]["file"] = "tables/t_cat_0.safetensors\x00.txt"
    write_manifest(path, m, seal=True)


def _params_type(path: Path) -> None:
    m = manifest(path)
    m["dense"]["tensors"] = 5
    write_manifest(path, m, seal=True)


def _lone_surrogate(path: Path) -> None:
    text = (path / "manifest.json").read_text().replace('"cat_0"', '"\\ud800"', 1)
    (path / "manifest.json").write_text(text)


LOAD_FAILURES = {
    "dense tensor of another shape (was RuntimeError)": (_dense_shape_changed, "(?s)cannot "
                                                         "build the inference model.*size mismatch"),
    "deeply nested manifest (was RecursionError)": (_deep_manifest, "nests deeper"),
    "NUL byte in a file path (was ValueError)": (_nul_in_path, "control characters"),
    "dense tensors not a list (was TypeError)": (_params_type, "dense 'tensors' must be a list"),
    "lone surrogate in the manifest": (_lone_surrogate, "cannot be serialised canonically"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LOAD_FAILURES))
def test_every_load_failure_is_an_artifact_error(case, int4, tmp_path):
    path = copy_of(int4, tmp_path)
    damage, message = LOAD_FAILURES[case]
    damage(path)
    with pytest.raises(ArtifactError, match=message):
        embq.load(path)


# --------------------------------------------------------------------------- immutability


@pytest.mark.parametrize("change", ["modified in place", "truncated", "replaced", "removed"])
def test_a_predictor_stops_serving_once_its_artifact_changed(change, int4, tmp_path):
    """Under kernel "compact" the table files are read in place at every lookup: an in-place
    edit used to change the answers without a restart (and a truncation kill the process).
    Now the predictor refuses, naming what changed; so does a server's /healthz."""
    from embq_serving.predictor import Predictor

    path = copy_of(int4, tmp_path)
    predictor = Predictor(path, kernel="compact")
    dense, sparse = sample_batch()
    want = predictor.logits(dense, sparse)
    assert predictor.health() is None and predictor.check_files() == []
    table = path / "tables" / "t_cat_1.safetensors"
    if change == "modified in place":
        with open(table, "r+b") as f:  # the same size, other row bytes
            f.seek(-40, os.SEEK_END)
            f.write(bytes(40))
    elif change == "truncated":
        os.truncate(table, 4096)
    elif change == "replaced":
        new = table.with_name("new.safetensors")
        shutil.copy(table, new)
        os.replace(new, table)
    else:
        table.unlink()
    with pytest.raises(ArtifactError, match=f"tables/t_cat_1.safetensors was {change}"):
        predictor.logits(dense, sparse)
    assert "Artifacts are immutable once published" in predictor.health()
    assert predictor.check_files()[0].startswith("tables/t_cat_1.safetensors was")
    assert not np.array_equal(want, np.zeros_like(want))


def test_a_change_under_a_copied_table_is_reported_too(int4, tmp_path):
    """Under kernel "auto" the TBE holds a copy of the rows, so lookups are safe, but the
    artifact on disk is no longer the one loaded: check_files (a server's watcher) says so."""
    from embq_serving.predictor import Predictor

    path = copy_of(int4, tmp_path)
    predictor = Predictor(path)
    dense, sparse = sample_batch()
    predictor.logits(dense, sparse)
    size = (path / "manifest.json").stat().st_size
    (path / "manifest.json").write_text((path / "manifest.json").read_text() + " ")
    assert predictor.check_files() == [f"manifest.json grew from {size} to {size + 1} bytes"]
    with pytest.raises(ArtifactError, match="manifest.json grew"):
        predictor.logits(dense, sparse)


def test_embq_never_writes_into_a_published_artifact(int4, tmp_path):
    from embq.artifact.writer import ArtifactWriter, TableFileWriter

    path = copy_of(int4, tmp_path)
    table = path / "tables" / "t_cat_0.safetensors"
    state = (table.read_bytes(), table.stat().st_mtime_ns)
    with pytest.raises(ArtifactError, match="finished artifact.*never writes into one"):
        TableFileWriter.open(table, 700, 12)
    with pytest.raises(ArtifactError, match="finished artifact"):
        TableFileWriter.create(table, 700, 12)
    with pytest.raises(ArtifactError, match="finished artifact"):
        ArtifactWriter(tmp_path / "other.embq", staging=path)
    with pytest.raises(EmbqError, match="already exists"):
        embq.quantize_table(tmp_path / "missing.npy", "int4", path)
    assert (table.read_bytes(), table.stat().st_mtime_ns) == state
    assert manifest(path) == manifest(int4)


def test_a_symlink_flipped_to_a_new_artifact_is_noticed(int4, tmp_path):
    """Publishing by flipping a symlink (`ln -sfn v2.embq current.embq`) is the atomic swap:
    a predictor loaded through the link keeps serving what it loaded, and says the disk moved on
    (a server restarts on the new one)."""
    from embq_serving.predictor import Predictor

    first, second = copy_of(int4, tmp_path, "v1.embq"), copy_of(int4, tmp_path, "v2.embq")
    current = tmp_path / "current.embq"
    current.symlink_to(first)
    predictor = Predictor(current)
    link = tmp_path / "next"
    link.symlink_to(second)
    os.replace(link, current)
    assert "manifest.json was replaced by another file" in predictor.check_files()
