"""The artifact directory: round trip, atomic publish, and every refusal on load."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from embq.artifact.digest import manifest_digest
from embq.artifact.reader import load_artifact
from embq.artifact.safetensors_io import read_safetensors_header, sha256_file
from embq.artifact.writer import ArtifactWriter
from embq.embedding.registry import get_format
from embq.errors import ArtifactError
from tests.helpers import codebook_format

ROWS, DIM = 300, 16


def _table(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.05, (ROWS, DIM)).astype(np.float32)


def _codebook_format() -> str | None:
    return codebook_format(DIM)


def _write(path: Path, *, with_dense: bool = True) -> dict:
    """An artifact with an int4 table, an int8 table, dense tensors and a model dict."""
    table = _table()
    int4, int8 = get_format("int4"), get_format("int8")
    codes4, codes8 = int4.encode(table, {}), int8.encode(table[:100], {})
    dense = {"bottom.0.weight": torch.randn(8, 4),
             "bottom.0.bias": torch.zeros(8, dtype=torch.float16)}  # fmt: skip
    with ArtifactWriter(path) as w:
        w.add_table("t_a", "int4", codes4, DIM, feature_names=["a"], stats={"mse": 0.5})
        w.add_table("t_b", "int8", codes8, DIM, feature_names=["b", "c"])
        if with_dense:
            w.add_dense(dense, meta={"scheme": "int8"})
        w.set_model({"embedding_dim": DIM, "tables": ["t_a", "t_b"]})
        w.publish()
    return {"table": table, "codes4": codes4, "codes8": codes8, "dense": dense}


@pytest.fixture
def art(tmp_path: Path) -> tuple[Path, dict]:
    path = tmp_path / "m.embq"
    return path, _write(path)


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _save_manifest(path: Path, manifest: dict, seal: bool = True) -> None:
    """Write an edited manifest; sealed (its digest recomputed, as `embq seal` does) unless
    `seal` is False, so that the checks behind the digest check are reached."""
    if seal:
        manifest = {**manifest, "digest": manifest_digest(manifest)}
    (path / "manifest.json").write_text(json.dumps(manifest))


# --------------------------------------------------------------------------- round trip


def test_round_trip(art):
    path, ref = art
    a = load_artifact(path)
    assert a.table_names() == ["t_a", "t_b"]
    t = a.table("t_a")
    assert t.rows.dtype == np.uint8
    assert t.rows.shape == (ROWS, get_format("int4").bytes_per_row(DIM))
    assert isinstance(t.rows, np.memmap)
    np.testing.assert_array_equal(t.rows, ref["codes4"])
    np.testing.assert_array_equal(t.decode(), get_format("int4").decode(ref["codes4"], {}, DIM))
    assert t.entry.feature_names == ["a"] and t.entry.stats == {"mse": 0.5} and t.params == {}
    np.testing.assert_array_equal(a.table("t_b").rows, ref["codes8"])
    dense = a.dense()
    assert set(dense) == set(ref["dense"])
    for k, v in ref["dense"].items():
        assert dense[k].dtype == v.dtype and torch.equal(dense[k], v)
    assert a.dense_meta == {"scheme": "int8"}
    assert a.model == {"embedding_dim": DIM, "tables": ["t_a", "t_b"]}
    m = _manifest(path)
    assert (m["format"], m["version"]) == ("embq", 1)
    entry = m["tables"][0]
    assert entry["file"] == "tables/t_a.safetensors"
    assert entry["sha256"] == sha256_file(path / entry["file"])
    assert entry["bytes"] == (path / entry["file"]).stat().st_size
    # nothing but the artifact is left next to it
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.embq"]


def test_table_files_are_plain_safetensors(art):
    """The header embq writes itself is read by the safetensors library unchanged."""
    path, ref = art
    with safe_open(str(path / "tables" / "t_a.safetensors"), framework="numpy") as f:
        assert list(f.keys()) == ["rows"]
        np.testing.assert_array_equal(f.get_tensor("rows"), ref["codes4"])


def test_params_round_trip(tmp_path):
    name = _codebook_format()
    if name is None:
        pytest.skip("no format with table-level params in embq.formats yet")
    fmt, table = get_format(name), _table()
    params = fmt.fit(table)
    codes = fmt.encode(table, params)
    with ArtifactWriter(tmp_path / "cb.embq") as w:
        w.add_table("t", name, codes, DIM, params=params)
        w.publish()
    t = load_artifact(tmp_path / "cb.embq").table("t")
    assert sorted(t.params) == sorted(params) == t.entry.params
    for k in params:
        np.testing.assert_array_equal(t.params[k], params[k])
    np.testing.assert_array_equal(t.decode(), fmt.decode(codes, params, DIM))
    with safe_open(str(tmp_path / "cb.embq" / t.entry.file), framework="numpy") as f:
        assert sorted(f.keys()) == sorted(["rows", *params])


def test_streamed_rows_in_any_order(tmp_path):
    table = _table()
    fmt = get_format("int4")
    codes = fmt.encode(table, {})
    with ArtifactWriter(tmp_path / "s.embq") as w:
        tw = w.begin_table("t", "int4", ROWS, DIM)
        for start in (200, 0, 100):
            tw.write_rows(start, codes[start : start + 100])
        with pytest.raises(ArtifactError, match="outside"):
            tw.write_rows(250, codes[:100])
        with pytest.raises(ArtifactError, match="uint8"):
            tw.write_rows(0, codes[:10].astype(np.int16))
        w.publish()
    np.testing.assert_array_equal(load_artifact(tmp_path / "s.embq").table("t").rows, codes)


# --------------------------------------------------------------------------- writing refusals


def test_existing_output_is_never_replaced(tmp_path):
    path = tmp_path / "m.embq"
    path.mkdir()
    (path / "mine.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="already exists"):
        ArtifactWriter(path)
    assert (path / "mine.txt").read_text() == "keep me"


def test_output_appearing_during_write_is_kept(tmp_path):
    path = tmp_path / "m.embq"
    w = ArtifactWriter(path)
    w.add_table("t", "int8", get_format("int8").encode(_table(), {}), DIM)
    path.write_text("someone else's file")
    with pytest.raises(ArtifactError, match="appeared"):
        w.publish()
    assert path.read_text() == "someone else's file"


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "m.embq"
    with pytest.raises(RuntimeError):
        with ArtifactWriter(path) as w:
            w.add_table("t", "int4", get_format("int4").encode(_table(), {}), DIM)
            raise RuntimeError("crash before publish")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../evil", ".hidden", "a/b", "", "x" * 300])
def test_bad_table_names(tmp_path, name):
    with ArtifactWriter(tmp_path / "m.embq") as w:
        with pytest.raises(ArtifactError, match="table name"):
            w.add_table(name, "int4", get_format("int4").encode(_table(), {}), DIM)


def test_duplicate_table_and_wrong_width(tmp_path):
    codes = get_format("int4").encode(_table(), {})
    with ArtifactWriter(tmp_path / "m.embq") as w:
        w.add_table("t", "int4", codes, DIM)
        with pytest.raises(ArtifactError, match="already"):
            w.add_table("t", "int4", codes, DIM)
        with pytest.raises(ArtifactError, match="width"):
            w.add_table("u", "int8", codes, DIM)
        with pytest.raises(ArtifactError, match="JSON"):
            w.set_model({"loss": float("nan")})


# --------------------------------------------------------------------------- loading refusals


def _truncate(path: Path) -> None:
    f = path / "tables" / "t_a.safetensors"
    os.truncate(f, f.stat().st_size - 7)


def _flip_byte(path: Path) -> None:
    f = path / "tables" / "t_a.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x01
    f.write_bytes(bytes(data))


def _edit(**changes):
    def apply(path: Path) -> None:
        m = _manifest(path)
        for key, value in changes.items():
            if key in m:
                m[key] = value
            else:
                m["tables"][0][key] = value
        _save_manifest(path, m)

    return apply


def _symlink_escape(path: Path) -> None:
    """Swap the table file for a symlink to an identical copy outside: sizes and hashes match,
    only the path check can refuse it."""
    f = path / "tables" / "t_a.safetensors"
    outside = path.parent / "outside.safetensors"
    shutil.copy(f, outside)
    f.unlink()
    f.symlink_to(outside)


def _dense_tampered(path: Path) -> None:
    f = path / "dense.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))


def _header_disagrees(path: Path) -> None:
    """A consistent file and hash, but the manifest claims one more row."""
    m = _manifest(path)
    m["tables"][0]["rows"] += 1
    _save_manifest(path, m)


def _extra_tensor(path: Path) -> None:
    m = _manifest(path)
    m["tables"][0]["params"] = ["centroids"]
    _save_manifest(path, m)


REFUSALS = {
    "truncated": (_truncate, "truncated"),
    "tampered": (_flip_byte, "sha256"),
    "version 99": (_edit(version=99), "version 99 is newer"),
    "version string": (_edit(version="1"), "unknown"),
    "not embq": (_edit(format="onnx"), "format"),
    "dotdot path": (_edit(file="../x.safetensors"), "escapes"),
    "nested dotdot": (_edit(file="tables/../../x.safetensors"), "escapes"),
    "absolute path": (_edit(file="/etc/passwd"), "absolute"),
    "symlink escape": (_symlink_escape, "outside the artifact"),
    "missing manifest": (lambda p: (p / "manifest.json").unlink(), "no manifest.json"),
    "invalid json": (lambda p: (p / "manifest.json").write_text("{not json"), "not valid JSON"),
    "manifest not object": (lambda p: (p / "manifest.json").write_text("[1, 2]"), "format"),
    "missing file": (lambda p: (p / "tables" / "t_a.safetensors").unlink(), "missing"),
    "shape disagrees": (_header_disagrees, r"uint8 \[301, "),
    "unknown format": (_edit(format="int7-magic"), "int7-magic"),
    "wrong bytes_per_row": (_edit(bytes_per_row=99), "bytes per row"),
    "params disagree": (_extra_tensor, "params"),
    "missing field": (_edit(sha256=None), "sha256"),
    "bool rows": (_edit(rows=True), "rows"),
    "dense tampered": (_dense_tampered, "sha256"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_load_refuses(art, case):
    path, _ = art
    damage, message = REFUSALS[case]
    damage(path)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(path)


def test_not_a_directory(tmp_path):
    with pytest.raises(ArtifactError, match="not an artifact directory"):
        load_artifact(tmp_path / "nothing.embq")


def test_verify_false_checks_sizes_but_not_hashes(art):
    path, ref = art
    _flip_byte(path)
    a = load_artifact(path, verify=False)  # same size: only a hash would notice
    assert a.table("t_a").rows.shape == ref["codes4"].shape
    _truncate(path)
    with pytest.raises(ArtifactError, match="truncated"):
        load_artifact(path, verify=False)


def test_corrupt_safetensors_header(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(ArtifactError, match="header length"):
        read_safetensors_header(f)
    f.write_bytes((2).to_bytes(8, "little") + b"{]")
    with pytest.raises(ArtifactError, match="corrupt"):
        read_safetensors_header(f)
