"""Property tests of the artifact reader (issue 13, part 6): whatever bytes of an artifact are
changed, loading it either refuses with an ArtifactError or serves exactly the answers of the
original; it never fails with another exception, never crashes, and never loads silently
changed. hypothesis draws the edits: a byte anywhere in any file, a truncation, or a JSON value
of the manifest replaced (unsealed, and sealed with a recomputed digest: then any answer is
allowed, since sealing says the edit is meant, but still only ArtifactError refusals).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import embq
from embq.errors import ArtifactError
from tests.test_serving import make_artifact, make_model_dir, sample_batch

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])  # fmt: skip
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**65), 2**65)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A small int4 DLRM artifact and its logits on a fixed batch."""
    root = tmp_path_factory.mktemp("props")
    path = make_artifact(make_model_dir(root / "model"), "int4", root / "int4.embq")
    return path, answer(path)


def answer(path: Path) -> np.ndarray:
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    dense, sparse = sample_batch(batch=8, seed=3)
    model = embq.load(path)
    names = model.config.sparse_feature_names
    values = [i for f in names for bag in sparse[f] for i in bag]
    lengths = [len(bag) for f in names for bag in sparse[f]]
    kjt = KeyedJaggedTensor(keys=names, values=torch.tensor(values, dtype=torch.int64),
                            lengths=torch.tensor(lengths, dtype=torch.int64))  # fmt: skip
    with torch.inference_mode():
        return model(torch.from_numpy(dense), kjt).numpy().copy()


def files_of(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def load_outcome(path: Path, want: np.ndarray | None) -> str:
    """"refused" (ArtifactError), "same" (loaded, identical answers) or "changed"; any other
    exception propagates and fails the test."""
    try:
        got = answer(path)
    except ArtifactError:
        return "refused"
    return "same" if want is not None and np.array_equal(got, want) else "changed"


def edited_copy(original: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="embq-prop-"))
    return Path(shutil.copytree(original, tmp / "a.embq"))


@SETTINGS
@given(data=st.data())
def test_any_byte_changed_is_refused_or_harmless(original, data):
    path0, want = original
    files = files_of(path0)
    rel = data.draw(st.sampled_from(files), label="file")
    size = (path0 / rel).stat().st_size
    at = data.draw(st.integers(0, size - 1), label="offset")
    path = edited_copy(path0)
    try:
        raw = bytearray((path / rel).read_bytes())
        new = data.draw(st.integers(0, 255).filter(lambda b: b != raw[at]), label="byte")
        raw[at] = new
        (path / rel).write_bytes(bytes(raw))
        assert load_outcome(path, want) in ("refused", "same")
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


@SETTINGS
@given(data=st.data())
def test_any_truncation_or_extension_is_refused(original, data):
    path0, want = original
    rel = data.draw(st.sampled_from(files_of(path0)), label="file")
    size = (path0 / rel).stat().st_size
    new_size = data.draw(st.integers(0, size + 64).filter(lambda n: n != size), label="size")
    path = edited_copy(path0)
    try:
        with open(path / rel, "r+b") as f:
            f.truncate(new_size)  # zero bytes when it grows
        outcome = load_outcome(path, want)
        # a manifest cut inside trailing whitespace, or grown by NULs past its end, is no edit
        # of its JSON; JSON parsing refuses NULs, so only the first is "same"
        assert outcome == "refused" or (outcome == "same" and rel == "manifest.json"), outcome
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


def json_paths(obj, prefix=()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += json_paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += json_paths(v, (*prefix, i))
    return out


def reference_digest(m: dict) -> str:
    body = {k: v for k, v in m.items() if k != "digest"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


@SETTINGS
@given(data=st.data(), value=JSON_VALUES, seal=st.booleans())
def test_any_manifest_value_replaced_is_refused_unless_sealed(original, data, value, seal):
    path0, want = original
    manifest = json.loads((path0 / "manifest.json").read_text())
    where = data.draw(st.sampled_from([p for p in json_paths(manifest) if p and p != ("digest",)]),
                      label="path")  # fmt: skip
    edited = json.loads(json.dumps(manifest))
    node = edited
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    if seal:
        try:
            edited["digest"] = reference_digest(edited)
        except UnicodeEncodeError:  # a lone surrogate: nothing canonical to seal
            pass
    path = edited_copy(path0)
    try:
        (path / "manifest.json").write_text(json.dumps(edited), encoding="utf-8")
        outcome = load_outcome(path, want)
        if not seal:
            try:
                unchanged = reference_digest(edited) == manifest["digest"]
            except UnicodeEncodeError:
                unchanged = False
            assert outcome == "refused" or (unchanged and outcome == "same"), (where, value)
        # sealed: the edit is meant; whatever loads may answer differently, but every refusal
        # was an ArtifactError (load_outcome lets any other exception fail the test)
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)
