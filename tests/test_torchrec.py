"""quantize_model: every format's pooled outputs against a float64 reference, plans, DLRMs.

Reference: decode each table with the format's own `decode` (checked once against fbgemm's
dequantizer for the row-wise formats), then SUM / MEAN the decoded rows of each bag in float64.
The kernels gather exactly those decoded values and accumulate in float32, so the only
difference is float32 summation over bags of at most MAX_BAG rows of values below ~1:
ATOL = 2e-6 (absolute), RTOL = 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from embq.embedding.registry import format_names, get_format
from embq.errors import ConfigError, FormatError

DIMS = (16, 32, 64)
ROWS = 300  # >= 256: PQ with 8-bit codes fits 256 centroids per sub-quantizer
BATCH, MAX_BAG = 12, 6
ATOL, RTOL = 2e-6, 1e-5


# --------------------------------------------------------------------------- shared helpers


def _formats_at(dim: int) -> list[str]:
    ok = []
    for name in format_names():
        try:
            get_format(name).check_dim(dim)
            ok.append(name)
        except FormatError:
            pass
    return ok


def _format_dims() -> list[tuple[str, list[int]]]:
    """(format, the dims among DIMS it can store) for every registered format."""
    out = []
    for name in format_names():
        dims = [d for d in DIMS if name in _formats_at(d)]
        if dims:
            out.append((name, dims))
    return out


def _ebc(dims: list[int], pooling: list[str] | None = None, seed: int = 0):
    """A float TorchRec EBC, one table t_f<i> of ROWS x dims[i] per feature f<i>, with
    N(0, 0.1) weights (plus one large row so min/max ranges matter)."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    pooling = pooling or ["SUM"] * len(dims)
    configs = [
        EmbeddingBagConfig(
            name=f"t_f{i}",
            embedding_dim=d,
            num_embeddings=ROWS,
            feature_names=[f"f{i}"],
            pooling=PoolingType[p],
        )
        for i, (d, p) in enumerate(zip(dims, pooling))
    ]
    ebc = EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for c in configs:
            w = ebc.embedding_bags[c.name].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.1)
            w[7] *= 10.0
    return ebc.eval()


def _bags(features: list[str], seed: int = 0, batch: int = BATCH):
    """A KJT with variable bag sizes 0..MAX_BAG (empty bags included) per feature."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, MAX_BAG + 1, size=len(features) * batch)
    lengths[::5] = 0
    values = rng.integers(0, ROWS, size=int(lengths.sum()))
    values[:3] = 7  # the large row
    return KeyedJaggedTensor.from_lengths_sync(
        keys=features, values=torch.from_numpy(values), lengths=torch.from_numpy(lengths)
    )


def _reference(tables, kjt) -> dict[str, np.ndarray]:
    """{feature: float64 [B, dim]} pooled from each format's own decode of the encoded rows."""
    out = {}
    jt = kjt.to_dict()
    for t in tables:
        decoded = (
            get_format(t.format).decode(np.asarray(t.codes), t.params, t.dim).astype(np.float64)
        )
        for f in t.feature_names:
            lengths = jt[f].lengths().numpy()
            ids = jt[f].values().numpy()
            pooled = np.zeros((len(lengths), t.dim))
            pos = 0
            for b, n in enumerate(lengths):
                rows = decoded[ids[pos : pos + n]]
                pos += n
                if n:
                    pooled[b] = rows.sum(0) if t.pooling == "SUM" else rows.mean(0)
            out[f] = pooled
    return out


def _assert_pooled(got: dict[str, torch.Tensor], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for f, ref in want.items():
        np.testing.assert_allclose(got[f].double().numpy(), ref, atol=ATOL, rtol=RTOL, err_msg=f)


def _planted_data(n: int, n_dense: int, rows: list[int], seed: int):
    """Clicks from a planted logistic model: per-id effects plus a dense linear term."""
    rng = np.random.default_rng(seed)
    dense = rng.normal(size=(n, n_dense)).astype(np.float32)
    ids = np.stack([rng.integers(0, r, n) for r in rows], axis=1)
    effects = [rng.normal(0, 1.0, r) for r in rows]
    logit = dense @ rng.normal(0, 0.5, n_dense) - 1.0
    logit += sum(e[ids[:, j]] for j, e in enumerate(effects))
    labels = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int32)
    return dense, ids, labels


def make_trained_dlrm(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """A small DLRM trained for a few hundred steps on planted data, saved with its prepared
    dataset: (model dir, data dir). A few seconds on two cores."""
    from embq.data.prepared import PreparedData
    from embq.models.dlrm import DLRMConfig, build_dlrm, save_model

    names, rows, n_dense = ["c0", "c1", "c2", "c3"], [400, 300, 200, 100], 5
    dense, ids, labels = _planted_data(12_000, n_dense, rows, seed)
    data_dir = root / "prepared"
    data_dir.mkdir(parents=True)
    np.save(data_dir / "dense.npy", dense)
    np.save(data_dir / "sparse.npy", ids.astype(np.int64))
    np.save(data_dir / "labels.npy", labels.reshape(-1, 1))
    (data_dir / "summary.json").write_text(
        json.dumps(
            {
                "dataset": "planted",
                "dense_feature_names": [f"d{i}" for i in range(n_dense)],
                "sparse_feature_names": names,
                "num_embeddings": rows,
            }
        )
    )
    config = DLRMConfig(
        dense_in_features=n_dense,
        sparse_feature_names=names,
        num_embeddings=rows,
        embedding_dim=16,
        dense_arch=[32, 16],
        over_arch=[32, 1],
    )
    model = build_dlrm(config, seed=seed)
    data = PreparedData(data_dir)
    (start, stop), _ = data.split(0.1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    for epoch in range(2):
        for batch in data.batches(start, stop, batch_size=256, shuffle=True, seed=epoch):
            loss = loss_fn(model(batch.dense, batch.sparse).reshape(-1), batch.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    model_dir = save_model(model, config, root / "model")
    return model_dir, data_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    return make_trained_dlrm(tmp_path_factory.mktemp("trained"))


# --------------------------------------------------------------------------- formats vs reference


def test_rowwise_decode_matches_fbgemm_dequantizer():
    """The reference's decode agrees with fbgemm's own dequantizer on row-wise formats."""
    import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)

    w = torch.randn(64, 32) * 0.3
    for name in ("int8", "int4", "int2", "int4-greedy", "int2-greedy", "int4-opt", "int2-opt"):
        fmt = get_format(name)
        codes = fmt.encode(w.numpy(), {})
        ours = fmt.decode(codes, {}, 32)
        theirs = torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(
            torch.from_numpy(codes), fmt.bits
        )
        np.testing.assert_array_equal(ours, theirs.numpy(), err_msg=name)


@pytest.mark.parametrize("name,dims", _format_dims(), ids=[n for n, _ in _format_dims()])
def test_quantized_ebc_pools_like_float64_reference(name: str, dims: list[int]):
    from embq.models.quantized import quantize_model
    from embq.models.tables import find_tables

    pooling = ["SUM", "MEAN", "SUM"][: len(dims)]
    ebc = _ebc(dims, pooling)
    before = {t.name: t.weight.clone() for t in find_tables(ebc)}
    result = quantize_model(ebc, name)
    kjt = _bags([f"f{i}" for i in range(len(dims))])
    got = result.model(kjt).to_dict()
    _assert_pooled(got, _reference(result.tables, kjt))
    for t in find_tables(ebc):  # the float model is left as it was
        assert torch.equal(t.weight, before[t.name])
    for t in result.tables:
        fmt = get_format(name)
        assert t.codes.shape == (ROWS, fmt.bytes_per_row(t.dim)) and t.codes.dtype == np.uint8
        s = t.stats
        assert s["bytes"] == t.codes.nbytes + fmt.params_bytes(t.dim, t.params)
        assert s["size_ratio"] == pytest.approx(s["bytes"] / (ROWS * t.dim * 4))
        assert 0.0 <= s["relative_mse"] < (1e-12 if name == "fp32" else 0.5)


def test_rowwise_plans_use_torchrec_quant_ebc_with_unchanged_bytes():
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC

    from embq.models.quantized import quantize_model

    result = quantize_model(
        _ebc([16, 32, 64]), {"t_f0": "int4-greedy", "t_f1": "int2", "t_f2": "fp16"}
    )
    assert isinstance(result.model, QuantEBC)
    tbe = result.model._emb_modules[0]
    for t, (weights, scale_bias) in zip(result.tables, tbe.split_embedding_weights()):
        codes = torch.from_numpy(t.codes)
        if scale_bias is None:  # fp16: the raw bytes
            assert torch.equal(weights, codes)
        else:  # qparams first inside the TBE, last in embq rows: same bytes, moved
            assert torch.equal(weights, codes[:, :-4]) and torch.equal(scale_bias, codes[:, -4:])


def test_mixed_plan_per_table():
    from embq.models.quantized import quantize_model

    # row-wise tables with interleaved poolings: TorchRec groups them by pooling internally
    ebc = _ebc([16, 32, 64, 16, 32], ["SUM", "MEAN", "SUM", "MEAN", "SUM"])
    plan = {"*": "int4", "t_f1": "int8", "t_f2": "fp16", "t_f3": "cb4-shared", "t_f4": "pq16x8"}
    result = quantize_model(ebc, plan)
    formats = {t.name: t.format for t in result.tables}
    assert formats == {
        "t_f0": "int4",
        "t_f1": "int8",
        "t_f2": "fp16",
        "t_f3": "cb4-shared",
        "t_f4": "pq16x8",
    }
    assert result.stats["t_f3"]["format"] == "cb4-shared"
    kjt = _bags(["f4", "f2", "f0", "f3", "f1"], seed=4)  # keys in another order than the tables
    _assert_pooled(result.model(kjt).to_dict(), _reference(result.tables, kjt))


# --------------------------------------------------------------------------- plans


@pytest.mark.parametrize(
    "plan,match",
    [
        ("int5", "unknown format 'int5'.*valid formats: fp32, fp16, int8"),
        ({"t_f0": "int4", "t_nope": "int4", "*": "int8"}, r"tables \['t_nope'\].*its tables are"),
        ({"t_f0": "int4"}, r"no format for tables \['t_f1'\]"),
        ({"*": "int4", "t_f1": "nf4"}, "unknown format 'nf4'"),
        ({}, "non-empty"),
        (["int4"], "non-empty"),
    ],
)
def test_bad_plans_raise_config_error(plan, match):
    from embq.models.quantized import quantize_model

    with pytest.raises(ConfigError, match=match):
        quantize_model(_ebc([16, 16]), plan)


def test_dims_that_do_not_pack_raise_format_error():
    from embq.models.quantized import quantize_model

    with pytest.raises(FormatError, match=r"t_f0.*dim 6"):
        quantize_model(_ebc([6]), "int4")
    with pytest.raises(FormatError, match=r"t_f1.*dim 12"):
        quantize_model(_ebc([16, 12]), {"*": "int2"})


def test_not_a_torchrec_model_is_refused():
    from embq.models.quantized import quantize_model

    with pytest.raises(ConfigError, match="EmbeddingBagCollection"):
        quantize_model(torch.nn.Linear(3, 4), "int8")


# --------------------------------------------------------------------------- DLRM end to end


def test_quantize_trained_dlrm_then_evaluate(trained):
    from torchrec.models.dlrm import DLRM

    from embq.data.prepared import PreparedData
    from embq.models.dlrm import load_model
    from embq.models.metrics import evaluate
    from embq.models.quantized import quantize_model

    model_dir, data_dir = trained
    model, _ = load_model(model_dir)
    data = PreparedData(data_dir)
    _, (start, stop) = data.split(0.1)
    base = evaluate(model, data.batches(start, stop, 1024))
    assert base["auc"] > 0.65, base  # it learned something
    for plan in ("int8", {"*": "int4-greedy", "t_c1": "cb4-row", "t_c0": "pq8x8"}):
        result = quantize_model(model, plan)
        assert isinstance(result.model, DLRM)
        assert result.model.dense_arch is not model.dense_arch  # towers copied, input untouched
        got = evaluate(result.model, data.batches(start, stop, 1024))
        assert got["rows"] == base["rows"]
        assert abs(got["auc"] - base["auc"]) < 0.02, (plan, got, base)
    # the quantized DLRM's logits equal the float DLRM's with decoded tables swapped in
    result = quantize_model(model, "int4")
    batch = next(data.batches(start, stop, 256))
    dequant, _ = load_model(model_dir)
    ebc = dequant.sparse_arch.embedding_bag_collection
    with torch.no_grad():
        for t in result.tables:
            decoded = get_format(t.format).decode(t.codes, t.params, t.dim)
            ebc.embedding_bags[t.name].weight.copy_(torch.from_numpy(decoded))
        torch.testing.assert_close(
            result.model(batch.dense, batch.sparse),
            dequant(batch.dense, batch.sparse),
            atol=1e-5,
            rtol=1e-5,
        )


def test_quality_table_rows(trained):
    from embq.reports.quality import format_markdown, quality_table

    model_dir, data_dir = trained
    rows = quality_table(model_dir, data_dir, ["int8", "int2"], batch_size=2048)
    assert [r["format"] for r in rows] == ["fp32", "int8", "int2"]
    assert rows[0]["size_ratio"] == 1.0 and rows[0]["ne_delta_pct"] == 0.0
    assert rows[1]["size_ratio"] == pytest.approx(20 / 64) and rows[2][
        "size_ratio"
    ] == pytest.approx(8 / 64)
    assert 0 < rows[1]["relative_mse"] < rows[2]["relative_mse"] < 1
    assert "| int2 |" in format_markdown(rows)


def test_tables_too_small_for_a_default_codebook_stay_fp16():
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from embq.embedding.encode import SMALL_TABLE_FALLBACK, resolve_plan
    from embq.models.tables import find_tables

    configs = [EmbeddingBagConfig(name="big", embedding_dim=16, num_embeddings=400, feature_names=["a"]),
               EmbeddingBagConfig(name="tiny", embedding_dim=16, num_embeddings=4, feature_names=["b"])]
    tables = find_tables(EmbeddingBagCollection(tables=configs, device=torch.device("cpu")))
    resolved = {name: str(fmt) for name, fmt in resolve_plan(tables, "pq8x8").items()}
    assert resolved == {"big": "pq8x8", "tiny": SMALL_TABLE_FALLBACK}
    # Asked for by name, the impossible format is an error, not a silent substitute.
    from embq.embedding.encode import encode_tables as quantize_tables

    with pytest.raises(FormatError, match="tiny.*at least 256"):
        quantize_tables(tables, {"big": "pq8x8", "tiny": "pq8x8"})
