"""The serving Predictor and the TorchScript export (embq_serving.predictor / .export, `embq export`).

Tolerances: the Predictor computes in float32 (fbgemm / codebook kernels, float32 MLPs); the
reference decodes each table with embq.formats, then pools and runs the MLPs in float64. With
inputs ~N(0, 1) and logits of order 1, float32 rounding stays far below the stated bounds:
|logit - reference| <= 1e-4 * (1 + |reference|), |probability - reference| <= 1e-5.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from embq.artifact.reader import load_artifact
from embq.embedding.registry import format_names
from embq.errors import ArtifactError, DataError

FEATURES = ["cat_0", "cat_1", "cat_2"]
ROWS = [700, 1000, 650]  # >= 39 * 16, so 16-centroid k-means has enough points without warnings
DIM = 16
N_DENSE = 13
# Every registered format (float, row-wise min/max, greedy and opt searches, codebooks), with
# PQ at sizes that fit dim 16: a format added to embq.formats is served and checked here too.
FORMATS = [f for f in format_names() if not f.startswith("pq")] + ["pq4x4", "pq8x4"]
LOGIT_RTOL = 1e-4
PROB_ATOL = 1e-5


def make_model_dir(path: Path, seed: int = 0) -> Path:
    """A small DLRM saved with embq.model.save_model, tables filled with trained-like values
    (rows ~N(0, s^2) with a per-row scale s in [0.05, 1]), so quantization error is visible."""
    from embq.models.dlrm import DLRMConfig, build_dlrm, save_model

    config = DLRMConfig(dense_in_features=N_DENSE, sparse_feature_names=FEATURES, num_embeddings=ROWS,
                        embedding_dim=DIM, dense_arch=[32, DIM], over_arch=[16, 1])  # fmt: skip
    model = build_dlrm(config, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bag in model.sparse_arch.embedding_bag_collection.embedding_bags.values():
            scale = 0.05 + 0.95 * torch.rand(bag.weight.shape[0], 1, generator=g)
            bag.weight.copy_(torch.randn(bag.weight.shape, generator=g) * scale)
    return save_model(model, config, path)


def make_artifact(model_dir: Path, fmt: str, out: Path) -> Path:
    """`embq quantize --model model_dir --plan fmt --output out`, as a library call."""
    from embq.cli.quantize import quantize_model_dir

    path, _ = quantize_model_dir(model_dir, fmt, out)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("serving") / "model")


class LazyDict(dict):
    """A dict that builds a missing value with `make(key)` on first use (so running one test
    quantizes only the formats it needs)."""

    def __init__(self, make) -> None:
        super().__init__()
        self._make = make

    def __missing__(self, key):
        self[key] = value = self._make(key)
        return value


@pytest.fixture(scope="module")
def artifacts(model_dir) -> dict[str, Path]:
    """{format: artifact path}, quantized from `model_dir` on first use."""
    return LazyDict(lambda fmt: make_artifact(model_dir, fmt, model_dir.parent / f"{fmt}.embq"))


@pytest.fixture(scope="module")
def predictors(artifacts):
    """{format: Predictor}, loaded on first use."""
    from embq_serving.predictor import Predictor

    return LazyDict(lambda fmt: Predictor(artifacts[fmt]))


def sample_batch(batch: int = 32, seed: int = 1, max_bag: int = 4):
    """dense float32 [batch, 13] and {feature: batch bags of 0..max_bag ids}, both table ends used."""
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((batch, N_DENSE)).astype(np.float32)
    sparse = {}
    for name, rows in zip(FEATURES, ROWS):
        bags = [
            rng.integers(0, rows, int(rng.integers(0, max_bag + 1))).tolist() for _ in range(batch)
        ]
        bags[0], bags[1] = [0, rows - 1, 0], []
        sparse[name] = bags
    return dense, sparse


# --------------------------------------------------------------------------- float64 reference


def _linears(tensors: dict[str, torch.Tensor], prefix: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (W, b) float64 pairs of the Linear layers under `prefix`, in layer order."""

    def order(key: str) -> list:
        return [int(p) if p.isdigit() else p for p in key.split(".")]

    keys = sorted((k for k in tensors if k.startswith(prefix) and k.endswith(".weight")), key=order)
    return [
        (tensors[k].double().numpy(), tensors[k[: -len("weight")] + "bias"].double().numpy())
        for k in keys
    ]


def reference_logits(artifact_path: Path, dense: np.ndarray, sparse: dict) -> np.ndarray:
    """DLRM logits in float64: each table decoded with its embq format, SUM-pooled per bag, then
    the bottom MLP (ReLU after every layer), pairwise dot interaction, top MLP (ReLU after every
    layer but the last), with the artifact's dense tensors."""
    artifact = load_artifact(artifact_path)
    pooled = []
    for name in FEATURES:
        table = artifact.table(f"t_{name}")
        entry = table.entry
        weights = table.format.decode(np.asarray(table.rows), table.params, entry.dim).astype(
            np.float64
        )
        pooled.append(
            np.stack(
                [weights[bag].sum(axis=0) if bag else np.zeros(entry.dim) for bag in sparse[name]]
            )
        )
    tensors = artifact.dense()
    x = dense.astype(np.float64)
    for w, b in _linears(tensors, "dense_arch."):
        x = np.maximum(x @ w.T + b, 0.0)
    combined = np.concatenate([x[:, None, :], np.stack(pooled, axis=1)], axis=1)  # [B, F+1, D]
    gram = combined @ combined.transpose(0, 2, 1)
    i, j = np.triu_indices(len(FEATURES) + 1, k=1)
    z = np.concatenate([x, gram[:, i, j]], axis=1)
    layers = _linears(tensors, "over_arch.")
    for k, (w, b) in enumerate(layers):
        z = z @ w.T + b
        if k < len(layers) - 1:
            z = np.maximum(z, 0.0)
    return z.reshape(-1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_predictor_matches_float64_reference(fmt, artifacts, predictors):
    dense, sparse = sample_batch()
    predictor = predictors[fmt]
    ref = reference_logits(artifacts[fmt], dense, sparse)
    logits = predictor.logits(dense, sparse).astype(np.float64)
    np.testing.assert_allclose(logits, ref, rtol=LOGIT_RTOL, atol=LOGIT_RTOL)  # 1e-4 * (1 + |ref|)
    probs = predictor.predict(dense, sparse)
    assert probs.dtype == np.float32 and probs.shape == (len(dense),)
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-ref)), rtol=0, atol=PROB_ATOL)


def test_reference_tells_formats_apart(artifacts, predictors):
    """The check above has teeth: int2 tables answer visibly differently from fp32 ones."""
    dense, sparse = sample_batch()
    gap = np.abs(
        predictors["int2"].logits(dense, sparse)
        - reference_logits(artifacts["fp32"], dense, sparse)
    )
    assert gap.max() > 100 * LOGIT_RTOL


# --------------------------------------------------------------------------- input forms


def test_input_forms_agree(predictors):
    from embq.data.prepared import ids_to_kjt

    predictor = predictors["int4"]
    rng = np.random.default_rng(2)
    dense = rng.standard_normal((8, N_DENSE)).astype(np.float32)
    ids = np.stack([rng.integers(0, n, 8) for n in ROWS], axis=1)
    as_dict = {f: [[int(i)] for i in ids[:, k]] for k, f in enumerate(FEATURES)}
    expected = predictor.predict(dense, ids)
    np.testing.assert_array_equal(predictor.predict(dense, as_dict), expected)
    np.testing.assert_array_equal(
        predictor.predict(torch.from_numpy(dense), ids_to_kjt(ids, FEATURES)), expected
    )
    # a KJT with its keys in another order is reordered, not misread
    reordered = ids_to_kjt(ids[:, ::-1], FEATURES[::-1])
    np.testing.assert_array_equal(predictor.predict(dense.tolist(), reordered), expected)
    rows = [
        {"dense": dense[r].tolist(), "sparse": {f: as_dict[f][r] for f in FEATURES}}
        for r in range(8)
    ]
    np.testing.assert_array_equal(predictor.predict_rows(rows), expected)


def test_metadata_describes_tables_and_inputs(predictors):
    meta = predictors["int4"].metadata()
    assert [t["format"] for t in meta["tables"]] == ["int4"] * 3
    assert meta["inputs"]["dense"]["shape"] == [None, N_DENSE]
    assert meta["inputs"]["sparse"]["feature_names"] == FEATURES
    assert meta["inputs"]["sparse"]["table_rows"] == dict(zip(FEATURES, ROWS))
    assert meta["table_bytes"] < 0.2 * meta["fp32_bytes"]
    json.dumps(meta, allow_nan=False)  # JSON-able, as /metadata serves it
    meta["tables"].clear()  # a copy: callers cannot corrupt the predictor's
    assert predictors["int4"].metadata()["tables"]


def _ids(**overrides):
    ids = np.zeros((2, 3), dtype=np.int64)
    for col, value in overrides.items():
        ids[0, int(col[1:])] = value
    return ids


BAD_INPUTS = {
    "wrong dense length": (np.zeros((2, 5)), _ids(), r"Expected dense of shape \[batch, 13\], but got \[2, 5\]"),
    "1-D dense": (np.zeros(13), _ids(), r"Expected dense of shape"),
    "NaN dense": (np.full((2, 13), np.nan), _ids(), r"finite.*\[0\]\[0\]"),
    "Inf dense": (np.full((2, 13), np.inf), _ids(), r"finite"),
    "float32 overflow": (np.full((2, 13), 1e39), _ids(), r"3.4e38"),
    "string dense": ([["a"] * 13] * 2, _ids(), r"real numbers"),
    "ragged dense": ([[0.0] * 13, [0.0] * 12], _ids(), r"dense"),
    "empty batch": (np.zeros((0, 13)), np.zeros((0, 3), np.int64), r"batch is empty"),
    "id too large": (np.zeros((2, 13)), _ids(c1=1000), r"'cat_1' row 0: id 1000 not in \[0, 1000\)"),
    "negative id": (np.zeros((2, 13)), _ids(c2=-1), r"'cat_2' row 0: id -1 not in \[0, 650\)"),
    "float ids": (np.zeros((2, 13)), np.zeros((2, 3)), r"integer ids"),
    "wrong id columns": (np.zeros((2, 13)), np.zeros((2, 4), np.int64), r"shape \[2, 3\]"),
    "batch mismatch": (np.zeros((3, 13)), _ids(), r"shape \[3, 3\]"),
    "unknown feature": (np.zeros((1, 13)), {"cat_0": [[1]], "cat_1": [[1]], "cat_2": [[1]], "zz": [[1]]},
                        r"unknown features 'zz'"),
    "missing feature": (np.zeros((1, 13)), {"cat_0": [[1]]}, r"missing features 'cat_1', 'cat_2'"),
    "bags per feature": (np.zeros((2, 13)), {f: [[1]] for f in FEATURES}, r"Expected 2 id lists"),
    "nested bag": (np.zeros((1, 13)), {f: [[[1]]] for f in FEATURES}, r"flat lists"),
    "bag not a list": (np.zeros((1, 13)), {f: [1] for f in FEATURES}, r"one list of ids per row"),
    "int64 overflow": (np.zeros((1, 13)), {f: [[2**70]] for f in FEATURES}, r"int64"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_clear_embq_errors(case, predictors):
    from embq_serving.predictor import InvalidInputError

    dense, sparse, message = BAD_INPUTS[case]
    with pytest.raises(InvalidInputError, match=message) as info:
        predictors["int4"].predict(dense, sparse)
    assert isinstance(info.value, DataError)


def test_bad_kjts_are_refused(predictors):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from embq_serving.predictor import InvalidInputError

    predictor = predictors["int4"]
    dense = np.zeros((2, N_DENSE), np.float32)
    weighted = KeyedJaggedTensor(keys=FEATURES, values=torch.zeros(6, dtype=torch.int64),
                                 lengths=torch.ones(6, dtype=torch.int64), weights=torch.ones(6))  # fmt: skip
    with pytest.raises(InvalidInputError, match="weighted"):
        predictor.predict(dense, weighted)
    short = KeyedJaggedTensor(keys=FEATURES, values=torch.zeros(3, dtype=torch.int64),
                              lengths=torch.ones(6, dtype=torch.int64))  # fmt: skip
    with pytest.raises(InvalidInputError, match="sum to its 3 values"):
        predictor.predict(dense, short)


def test_predictor_is_thread_safe(predictors):
    predictor = predictors["int4-greedy"]
    batches = [sample_batch(16, seed=s) for s in range(8)]
    expected = [predictor.predict(d, s) for d, s in batches]
    results: dict[int, list] = {}

    def worker(k: int) -> None:
        results[k] = [predictor.predict(d, s) for d, s in batches for _ in range(3)][::3]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(4):
        for got, want in zip(results[k], expected):
            np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- tampered artifacts


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped table byte", "truncated table", "flipped dense byte"])
def test_tampered_artifact_is_refused_at_load(damage, artifacts, tmp_path):
    from embq_serving.predictor import Predictor

    copy = Path(shutil.copytree(artifacts["int4"], tmp_path / "int4.embq"))
    table = copy / "tables" / "t_cat_1.safetensors"
    if damage == "flipped table byte":
        _flip_byte(table, table.stat().st_size - 10)
    elif damage == "truncated table":
        with open(table, "r+b") as f:
            f.truncate(table.stat().st_size - 36)
    else:
        _flip_byte(copy / "dense.safetensors", (copy / "dense.safetensors").stat().st_size - 3)
    with pytest.raises(ArtifactError, match="sha256|truncated"):
        Predictor(copy)


# --------------------------------------------------------------------------- TorchScript


@pytest.mark.parametrize(
    "fmt", ["fp16", "int8", "int4-greedy", "int2", "cb4-row", "cb4-shared", "pq4x4"]
)
def test_torchscript_export_equals_predictor(fmt, artifacts, predictors, tmp_path):
    from embq_serving.export import ScriptedPredictor, export_checked

    result = export_checked(predictors[fmt], tmp_path / f"{fmt}.pt")
    assert result["max_abs_logit_diff"] == 0.0
    scripted = ScriptedPredictor(tmp_path / f"{fmt}.pt")
    dense, sparse = sample_batch(seed=5)
    np.testing.assert_array_equal(
        scripted.predict(dense, sparse), predictors[fmt].predict(dense, sparse)
    )
    assert scripted.metadata()["inputs"] == predictors[fmt].metadata()["inputs"]


@pytest.mark.parametrize("fmt", ["int4", "int2-greedy"])
def test_kernel_choices_serve_alike(fmt, artifacts, predictors, tmp_path):
    """The same artifact on each kernel choice: "auto" (TBE, rows padded to a power of two),
    "compact" (ATen's n-bit ops on the memory-mapped rows) and "tbe" (unpadded TBE) answer alike,
    the metadata says which kernel holds how many bytes, and exports keep the choice."""
    from embq_serving.export import ScriptedPredictor, export_checked
    from embq_serving.predictor import Predictor

    dense, sparse = sample_batch(seed=9)
    auto = predictors[fmt]
    want = auto.logits(dense, sparse)
    np.testing.assert_allclose(
        want, reference_logits(artifacts[fmt], dense, sparse), rtol=LOGIT_RTOL, atol=LOGIT_RTOL
    )
    memory = {}
    for kernel, served_by in (("auto", "fbgemm-tbe"), ("compact", "aten-nbit"), ("tbe", "fbgemm-tbe")):
        predictor = auto if kernel == "auto" else Predictor(artifacts[fmt], kernel=kernel)
        meta = predictor.metadata()
        assert {t["kernel"] for t in meta["tables"]} == {served_by}
        memory[kernel] = meta["memory_bytes"]
        np.testing.assert_allclose(predictor.logits(dense, sparse), want, rtol=1e-6, atol=1e-6)
        if kernel == "compact":
            out = tmp_path / f"{fmt}-{kernel}.pt"
            assert export_checked(predictor, out)["max_abs_logit_diff"] == 0.0
            scripted = ScriptedPredictor(out).metadata()
            assert {t["kernel"] for t in scripted["tables"]} == {"aten-nbit"}
    rows_bytes = sum(t["rows"] * t["bytes_per_row"] for t in auto.metadata()["tables"])
    padded = sum(
        t["rows"] * (1 << (t["bytes_per_row"] - 1).bit_length()) for t in auto.metadata()["tables"]
    )
    assert memory["tbe"] == rows_bytes <= memory["auto"] == padded
    if fmt == "int4":  # dim 16: 12-byte rows, padded to 16 (int2's 8 bytes need no padding)
        assert memory["auto"] == memory["tbe"] * 16 // 12
    assert memory["compact"] == auto.metadata()["table_bytes"]  # the mapped files


def test_kernel_flags_offer_the_runtime_choices():
    import argparse

    from embq.cli.export import add_parser
    from embq.runtime.kernel_choice import KERNEL_CHOICES
    from embq_serving.http import build_parser

    def choices(parser: argparse.ArgumentParser) -> tuple[str, ...]:
        (action,) = [a for a in parser._actions if a.dest == "kernel"]
        assert action.default is None  # the artifact's recorded choices, else "auto"
        return tuple(action.choices)

    assert choices(build_parser()) == KERNEL_CHOICES
    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    assert choices(sub.choices["export"]) == KERNEL_CHOICES


_TORCH_ONLY = """
import json, sys
import torch, fbgemm_gpu
m = torch.jit.load(sys.argv[1])
x = json.loads(sys.stdin.read())
out = m(torch.tensor(x["dense"], dtype=torch.float32), torch.tensor(x["values"]),
        torch.tensor(x["offsets"]))
print(json.dumps({"logits": out.tolist(),
                  "modules": sorted(k for k in sys.modules if k.split(".")[0] in ("embq", "torchrec"))}))
"""


def run_embq_export(argv: list[str]) -> None:
    """`embq export ...`, in process."""
    from embq import cli

    assert cli.main(argv) == 0


def test_embq_export_runs_with_only_torch_and_fbgemm(artifacts, predictors, tmp_path, capsys):
    out = tmp_path / "m.pt"
    run_embq_export(["export", str(artifacts["int4"]), "--torchscript", str(out)])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == {
        **line,
        "output": str(out),
        "bytes": out.stat().st_size,
        "max_abs_logit_diff": 0.0,
    }

    predictor = predictors["int4"]
    dense, sparse = sample_batch(seed=7)
    x, values, offsets = predictor.prepare(dense, sparse)
    payload = json.dumps(
        {"dense": x.tolist(), "values": values.tolist(), "offsets": offsets.tolist()}
    )
    proc = subprocess.run([sys.executable, "-c", _TORCH_ONLY, str(out)], input=payload, check=False,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["modules"] == []  # neither embq nor torchrec was imported
    # float32 values round-trip through JSON exactly, so the outputs must be bit-identical
    np.testing.assert_array_equal(np.float32(result["logits"]), predictor.logits(dense, sparse))


def test_export_refuses_what_it_cannot_read(tmp_path, capsys):
    from embq import cli
    from embq_serving.export import ScriptedPredictor

    assert (
        cli.main(
            ["export", str(tmp_path / "missing.embq"), "--torchscript", str(tmp_path / "m.pt")]
        )
        == 2
    )
    assert "not an artifact directory" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a zip archive")
    with pytest.raises(ArtifactError, match="not a TorchScript file"):
        ScriptedPredictor(tmp_path / "junk.pt")
