"""The runtime: ATen n-bit / fbgemm TBE / codebook-bag lookups against a float64 reference,
artifacts written by `embq quantize` served by `load_inference_model`, and the TorchScript export.

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
    from embq.cli.quantize import add_parser

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


NBIT_FORMATS = ["int4", "int4-greedy", "int4-opt", "int2", "int2-greedy", "int2-opt"]


@pytest.mark.parametrize("name,dims", _format_dims(), ids=[n for n, _ in _format_dims()])
def test_runtime_bags_pool_like_float64_reference(name: str, dims: list[int]):
    from embq.embedding.encode import encode_tables as quantize_tables
    from embq.models.tables import find_tables
    from embq.runtime.bags import build_embedding_bags

    pooling = ["MEAN", "SUM", "MEAN"][: len(dims)]
    tables = quantize_tables(find_tables(_ebc(dims, pooling, seed=2)), name)
    bags = build_embedding_bags(tables)
    kjt = _bags([f"f{i}" for i in range(len(dims))], seed=5)
    _assert_pooled(_split(bags(kjt.values(), kjt.offsets()), tables), _reference(tables, kjt))


@pytest.mark.parametrize("pooling", ["SUM", "MEAN"])
@pytest.mark.parametrize("name", NBIT_FORMATS)
def test_nbit_kernels_pool_like_float64_reference(name: str, pooling: str):
    """4-bit / 2-bit tables at dims 16, 32, 64 on every kernel choice -- the TBE with rows padded
    to a power of two ("auto", the default), ATen's n-bit ops on the rows as they are
    ("compact") and the TBE with unpadded rows ("tbe") -- pool like the float64 reference,
    agree with each other, and script."""
    from embq.embedding.encode import encode_tables as quantize_tables
    from embq.models.tables import find_tables
    from embq.runtime.bags import build_embedding_bags
    from embq.runtime.nbit import RowwiseNBitBagCollection

    dims = [16, 32, 64]
    tables = quantize_tables(find_tables(_ebc(dims, [pooling] * 3, seed=11)), name)
    kjt = _bags([f"f{i}" for i in range(3)], seed=12, batch=40)
    want = _reference(tables, kjt)
    values, offsets = kjt.values(), kjt.offsets()
    row_bytes = [t.codes.shape[1] for t in tables]  # 4-bit: 12, 20, 36; 2-bit: 8, 12, 20
    padded = [1 << (b - 1).bit_length() for b in row_bytes]  # next power of two
    outputs = {}
    for kernel in ("auto", "compact", "tbe"):
        bags = build_embedding_bags(tables, kernel=kernel)
        if kernel == "compact":
            assert [type(g.kernel) for g in bags.groups] == [RowwiseNBitBagCollection]
        else:  # one TBE per row alignment: a TBE pads all its rows alike
            tbes = [part for g in bags.groups for part in g.kernel.parts]
            names = {type(t).__name__ for t in tbes}
            assert names == {"IntNBitTableBatchedEmbeddingBagsCodegen"}
            want_alignments = set(padded) if kernel == "auto" else {1}
            assert {t.row_alignment for t in tbes} == want_alignments
            held = sum(t.weights_host.numel() for t in tbes)
            rows_bytes = padded if kernel == "auto" else row_bytes
            want_held = sum(t.rows * b for t, b in zip(tables, rows_bytes))
            assert want_held <= held <= want_held + 128 * len(tables)  # + fbgemm's padding
        got = bags(values, offsets)
        assert got.dtype == torch.float32 and got.shape == (40, sum(dims))
        _assert_pooled(_split(got, tables), want)
        scripted = torch.jit.script(bags)
        torch.testing.assert_close(scripted(values, offsets), got, atol=0, rtol=0)
        outputs[kernel] = got
    torch.testing.assert_close(outputs["auto"], outputs["tbe"], atol=0, rtol=0)  # same kernel
    # ATen's n-bit ops and the TBE sum in a different order: float32 rounding apart
    torch.testing.assert_close(outputs["compact"], outputs["auto"], atol=1e-6, rtol=1e-6)


def test_nbit_kernel_multi_feature_tables_mixed_with_other_kernels():
    """A 4-bit table serving two features, a 2-bit MEAN table and TBE / codebook tables
    interleaved: the n-bit kernel reads its features' bags out of the whole input in place and
    the columns come back in feature order."""
    from embq.artifact.schema import QuantizedTable
    from embq.embedding.encode import encode_tables as quantize_tables
    from embq.models.tables import find_tables
    from embq.runtime.bags import build_embedding_bags
    from embq.runtime.nbit import RowwiseNBitBagCollection

    ebc = _ebc([32, 16, 64, 16, 32], ["SUM", "MEAN", "MEAN", "SUM", "SUM"], seed=13)
    plan = {"t_f0": "int8", "t_f1": "int4-opt", "t_f2": "int2", "t_f3": "cb4-row", "t_f4": "int4"}
    tables = quantize_tables(find_tables(ebc), plan)
    shared = tables[4]  # t_f4 serves f4 and f5
    tables[4] = QuantizedTable(
        name=shared.name, rows=shared.rows, dim=shared.dim, feature_names=["f4", "f5"],
        pooling=shared.pooling, format=shared.format, codes=shared.codes, params=shared.params,
        stats=shared.stats,
    )  # fmt: skip
    bags = build_embedding_bags(tables, kernel="compact")
    assert isinstance(bags.groups[0].kernel, RowwiseNBitBagCollection)
    assert [t.name for t in bags.groups[0].kernel.tables] == ["t_f1", "t_f2", "t_f4"]
    kjt = _bags([f"f{i}" for i in range(6)], seed=14)
    got = bags(kjt.values(), kjt.offsets())
    _assert_pooled(_split(got, tables), _reference(tables, kjt))
    torch.testing.assert_close(
        torch.jit.script(bags)(kjt.values(), kjt.offsets()), got, atol=0, rtol=0
    )


@pytest.mark.parametrize("kernel", ["compact", "auto"], ids=["n-bit", "tbe"])
def test_range_check_with_tables_of_different_sizes(kernel: str):
    """Tables of 300, 120 and 40 rows (an int8 TBE table in between): ids below the smallest
    table take the one-min/max path; others are checked per feature (`SparseCheck`), all
    exactly, eager and scripted."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from embq.embedding.encode import encode_tables as quantize_tables
    from embq.models.tables import find_tables
    from embq.runtime.bags import build_embedding_bags

    plan = {"t_f0": "int4", "t_f1": "int8", "t_f2": "int2", "t_f3": "int4-greedy"}
    tables = quantize_tables(find_tables(_ebc([16, 16, 32, 16], seed=17)), plan)
    for t, rows in zip(tables, [300, 300, 120, 40]):
        t.codes, t.rows = t.codes[:rows], rows  # the first rows: a smaller table
    bags = build_embedding_bags(tables, kernel=kernel)
    scripted = torch.jit.script(bags)
    rng = np.random.default_rng(18)
    batch = 64
    lengths = rng.integers(0, 4, size=4 * batch)
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]))
    limits = np.repeat([300, 300, 120, 40], batch)
    values = torch.from_numpy(
        np.concatenate([rng.integers(0, limits[i], lengths[i]) for i in range(4 * batch)])
    )
    keys = [f"f{i}" for i in range(4)]
    kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=torch.from_numpy(lengths))
    got = bags(values, offsets)
    _assert_pooled(_split(got, tables), _reference(tables, kjt))
    torch.testing.assert_close(scripted(values, offsets), got, atol=0, rtol=0)
    f3 = int(offsets[3 * batch])  # feature f3's first id: table of 40 rows
    f1 = int(offsets[1 * batch])  # feature f1's first id: int8, TBE, 300 rows
    for position, value, what in (
        (f3, 40, r"feature 'f3' row \d+: id 40 not in \[0, 40\) \(table 't_f3'\)"),
        (f3, 299, r"feature 'f3' row \d+: id 299 not in \[0, 40\)"),
        (0, 300, r"feature 'f0' row 0: id 300 not in \[0, 300\)"),
        (f1, -2, r"feature 'f1' row \d+: id -2 not in \[0, 300\)"),
    ):
        bad = values.clone()
        bad[position] = value
        with pytest.raises(DataError, match=what):
            bags(bad, offsets)
        with pytest.raises(torch.jit.Error, match="DataError: ids out of range: " + what):
            scripted(bad, offsets)
    ok = values.clone()
    ok[f1] = 299  # in range for f1's own (TBE) table, above the n-bit tables' smallest
    torch.testing.assert_close(scripted(ok, offsets), bags(ok, offsets), atol=0, rtol=0)


def test_split_runs_balances_consecutive_items():
    from embq.runtime.tbe import split_runs

    assert split_runs([1] * 26, 2) == [13, 13]
    assert split_runs([1] * 26, 3) == [9, 9, 8]
    assert split_runs([1] * 5, 8) == [1] * 5  # never an empty run
    assert split_runs([3, 1, 1, 1], 2) == [1, 3]
    assert split_runs([1, 1, 1, 3], 2) == [3, 1]
    assert split_runs([2], 4) == [1] and split_runs([1] * 7, 1) == [7]


def test_tbe_parts_spread_over_threads_with_the_same_result():
    """Loaded under 3 torch threads, 5 int4 tables of one size become 3 TBEs (one per thread);
    eager (parts in turn or forked) and scripted lookups equal one TBE's, bit for bit, and an
    id out of range in the last part is still refused."""
    from embq.embedding.encode import encode_tables as quantize_tables
    from embq.models.tables import find_tables
    from embq.runtime.bags import build_embedding_bags

    tables = quantize_tables(find_tables(_ebc([64] * 5, ["SUM"] * 5, seed=21)), "int4")
    kjt = _bags([f"f{i}" for i in range(5)], seed=22, batch=64)
    values, offsets = kjt.values(), kjt.offsets()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        (single,) = build_embedding_bags(tables).groups
        assert len(single.kernel.parts) == 1
        want = single.kernel(values, offsets)
        torch.set_num_threads(3)
        (group,) = build_embedding_bags(tables).groups
        kernel = group.kernel
        assert [p.weights_host.numel() > 0 for p in kernel.parts] == [True] * 3
        assert kernel.part_firsts == [0, 2, 4, 5]
        in_turn = kernel(values, offsets)  # fewer ids than parallel_min_ids: no fork
        kernel.parallel_min_ids = 0  # (the eager calls' scripted copy is made again)
        forked = kernel(values, offsets)
        assert kernel._scripted.parallel_min_ids == 0
        scripted = torch.jit.script(kernel)
        scripted.threads = 3
        bad = values.clone()
        bad[int(offsets[4 * 64]) + 1] = 300  # f4's second id: the last part's
        with pytest.raises(DataError, match=r"feature 'f4' row \d+: id 300 "):
            kernel(bad, offsets)
        with pytest.raises(torch.jit.Error, match=r"DataError: ids out of range: feature 'f4' row \d+: id 300 "):
            scripted(bad, offsets)
    finally:
        torch.set_num_threads(threads)
    for got in (in_turn, forked, scripted(values, offsets)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    _assert_pooled(_split(want, tables), _reference(tables, kjt))


def test_nbit_kernel_spreads_tables_over_threads_with_the_same_result():
    from embq.embedding.encode import encode_tables as quantize_tables
    from embq.models.tables import find_tables
    from embq.runtime.bags import build_embedding_bags

    dims = [16, 32, 64, 16, 32]
    ebc = _ebc(dims, ["SUM", "MEAN", "SUM", "MEAN", "SUM"], seed=19)
    tables = quantize_tables(find_tables(ebc), {"*": "int4", "t_f1": "int2", "t_f3": "int8"})
    bags = build_embedding_bags(tables, kernel="compact")
    kernel = bags.groups[0].kernel
    assert kernel._cuts([0, 10, 20, 30, 40, 50], 2) == [0, 2, 4]  # 4 n-bit tables, 10 ids each
    assert kernel._cuts([0, 10, 20, 30, 40, 50], 8) == [0, 1, 2, 3, 4]
    kjt = _bags([f"f{i}" for i in range(5)], seed=20, batch=64)
    values, offsets = kjt.values(), kjt.offsets()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = bags(values, offsets)
        kernel.parallel_min_ids = 0  # fork whatever the batch (the eager copy is re-scripted)
        assert kernel._scripted is None
        scripted = torch.jit.script(bags)
        scripted.groups[0].kernel.threads = 3
        torch.set_num_threads(3)
        three = bags(values, offsets)
        assert kernel._scripted.parallel_min_ids == 0
        bad = values.clone()
        bad[int(offsets[4 * 64]) + 1] = 300  # f4's second id: checked in the last task
        with pytest.raises(DataError, match=r"feature 'f4' row \d+: id 300 "):
            bags(bad, offsets)
        # resumed after waiting for a forked task, TorchScript raises a plain RuntimeError
        with pytest.raises((torch.jit.Error, RuntimeError), match=r"DataError: ids out of range: feature 'f4' row \d+: id 300 "):
            scripted(bad, offsets)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(three, one, atol=0, rtol=0)
    torch.testing.assert_close(scripted(values, offsets), one, atol=0, rtol=0)
    _assert_pooled(_split(one, tables), _reference(tables, kjt))


def test_nbit_kernel_eager_calls_leave_the_module_as_it_was():
    """Eager calls run a scripted copy of the kernel; it stays out of the module's state, and
    the module still copies, pickles, scripts and takes int32 / strided / empty inputs."""
    import copy
    import io

    from embq.embedding.encode import encode_tables as quantize_tables
    from embq.models.tables import find_tables
    from embq.runtime.bags import build_embedding_bags

    tables = quantize_tables(find_tables(_ebc([16, 32], ["SUM", "MEAN"], seed=15)), "int2-opt")
    bags = build_embedding_bags(tables, kernel="compact")
    keys = list(bags.state_dict())
    kjt = _bags(["f0", "f1"], seed=16)
    values, offsets = kjt.values(), kjt.offsets()
    out = bags(values, offsets)
    assert list(bags.state_dict()) == keys == ["groups.0.kernel.tables.0.weight",
                                               "groups.0.kernel.tables.1.weight"]  # fmt: skip
    torch.testing.assert_close(copy.deepcopy(bags)(values, offsets), out, atol=0, rtol=0)
    buffer = io.BytesIO()
    torch.save(bags, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(values, offsets), out, atol=0, rtol=0)
    torch.testing.assert_close(torch.jit.script(bags)(values, offsets), out, atol=0, rtol=0)
    strided = torch.stack([values, values], dim=1)[:, 0]
    torch.testing.assert_close(bags(strided, offsets), out, atol=0, rtol=0)
    torch.testing.assert_close(bags(values.int(), offsets.int()), out, atol=0, rtol=0)
    assert bags(torch.zeros(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)).shape == (
        0,
        48,
    )


def test_nbit_kernel_uses_the_memory_mapped_rows(quantized):
    """kernel="compact": the artifact's 4-bit rows are used where they are mapped, no copy."""
    from embq.artifact.reader import load_artifact
    from embq.runtime.bags import artifact_tables, build_embedding_bags
    from embq.runtime.nbit import RowwiseNBitBagCollection

    artifact, *_ = quantized
    tables = artifact_tables(load_artifact(artifact))
    bags = build_embedding_bags(tables, kernel="compact")
    (nbit,) = [g.kernel for g in bags.groups if isinstance(g.kernel, RowwiseNBitBagCollection)]
    (table,) = nbit.tables
    (codes,) = [t.codes for t in tables if t.name == table.name]
    assert isinstance(codes, np.memmap) and table.weight.data_ptr() == codes.ctypes.data
    assert table.weight.shape == codes.shape


def test_mixed_kernels_interleaved_features_and_tables_stay_compressed():
    """SUM-TBE, MEAN-TBE and codebook tables interleaved: each kernel gets its features' bags,
    the output columns come back in feature order, and only compressed bytes are held: the
    encoded rows ("compact", "tbe"), or rows padded to a power of two up to 64 bytes ("auto"),
    as `table_memory_bytes` (the metadata's "memory_bytes") says."""
    from embq.embedding.encode import encode_tables as quantize_tables
    from embq.models.tables import find_tables
    from embq.runtime.bags import build_embedding_bags
    from embq.runtime.kernel_choice import table_memory_bytes

    dims = [16, 32, 64, 16, 32]
    ebc = _ebc(dims, ["SUM", "MEAN", "SUM", "MEAN", "SUM"], seed=3)
    plan = {"t_f0": "cb4-shared", "t_f1": "int4", "t_f2": "int8", "t_f3": "pq8x8", "t_f4": "fp16"}
    tables = quantize_tables(find_tables(ebc), plan)
    # int4 dim 32: 20-byte rows (32 padded), int8 dim 64: 68 (unpadded), fp16 dim 32: 64
    kernels = {
        "tbe": ["fbgemm-tbe", "fbgemm-tbe", "codebook-bag"],  # SUM, MEAN, codebook
        "compact": ["aten-nbit", "fbgemm-tbe", "codebook-bag"],  # int4 (MEAN), SUM, codebook
        "auto": ["fbgemm-tbe", "fbgemm-tbe", "fbgemm-tbe", "codebook-bag"],  # MEAN 32, SUM 1, 64
    }
    classes = {
        "aten-nbit": "RowwiseNBitBagCollection",
        "fbgemm-tbe": "CheckedTBE",
        "codebook-bag": "CodebookBagCollection",
    }
    kjt = _bags([f"f{i}" for i in range(len(dims))], seed=6)
    for kernel, expected in kernels.items():
        bags = build_embedding_bags(tables, kernel=kernel)
        assert [type(g.kernel).__name__ for g in bags.groups] == [classes[k] for k in expected]
        _assert_pooled(_split(bags(kjt.values(), kjt.offsets()), tables), _reference(tables, kjt))
        held = 0
        for g, k in zip(bags.groups, expected):
            if k == "fbgemm-tbe":
                held += sum(part.weights_host.numel() for part in g.kernel.parts)
            elif k == "aten-nbit":
                held += sum(t.weight.numel() for t in g.kernel.tables)
            else:
                held += sum(b.codes.numel() + 4 * b.codebook.numel() for b in g.kernel.bags)
        encoded = sum(t.stats["bytes"] for t in tables)
        memory = sum(
            table_memory_bytes(t.format, t.rows, t.stats["bytes"], t.codes.shape[1], kernel)
            for t in tables
        )
        assert abs(held - memory) <= 128 * len(tables)  # fbgemm's / codebook params' padding
        if kernel == "auto":  # the int4 table's 20-byte rows take 32
            assert memory == encoded + 12 * tables[1].rows
        else:
            assert memory == encoded
        assert memory < 0.5 * sum(t.stats["fp32_bytes"] for t in tables)


def test_codebook_bags_script_and_decode_like_the_formats():
    """Each codebook kind decodes rows bit-identically to its format's numpy decode, and the
    collection scripts to TorchScript with the same pooled outputs."""
    from embq.embedding.encode import encode_tables as quantize_tables
    from embq.embedding.registry import get_format
    from embq.models.tables import find_tables
    from embq.runtime.codebook_bag import CodebookBagCollection

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
    from embq.embedding.encode import encode_tables as quantize_tables
    from embq.models.tables import find_tables
    from embq.runtime.bags import build_embedding_bags

    for fmt, kernel, error in (
        ("int4", "tbe", DataError),
        ("int8", "auto", DataError),
        ("cb4-row", "auto", DataError),
    ):
        tables = quantize_tables(find_tables(_ebc([16])), fmt)
        bags = build_embedding_bags(tables, kernel=kernel)
        with pytest.raises(error, match="300"):
            bags(torch.tensor([0, 300]), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("kernel", ["compact", "auto"])
@pytest.mark.parametrize("name", ["int4", "int2-greedy"])
def test_kernels_refuse_out_of_range_ids_before_the_op(name: str, kernel: str):
    """ATen's n-bit ops ("compact") and the TBE ("auto", no bounds check of its own) need ids in
    range: embq checks every table's min / max first and raises DataError naming the feature
    (eager) or a torch.jit.Error carrying it (TorchScript)."""
    from embq.embedding.encode import encode_tables as quantize_tables
    from embq.models.tables import find_tables
    from embq.runtime.bags import build_embedding_bags

    tables = quantize_tables(find_tables(_ebc([16, 32], ["SUM", "MEAN"])), name)
    bags = build_embedding_bags(tables, kernel=kernel)
    scripted = torch.jit.script(bags)
    offsets = torch.tensor([0, 2, 2, 3, 5])  # B = 2; f0: [a, b], []; f1: [c], [d, e]
    ok = torch.tensor([0, 299, 5, 6, 7])
    torch.testing.assert_close(scripted(ok, offsets), bags(ok, offsets), atol=0, rtol=0)
    for values, what in (
        ([0, 300, 5, 6, 7], r"feature 'f0' row 0: id 300 not in \[0, 300\)"),
        ([0, 1, 5, -1, 7], r"feature 'f1' row 1: id -1 not in \[0, 300\)"),
        ([0, 1, 5, 6, 1 << 40], rf"feature 'f1' row 1: id {1 << 40} not in \[0, 300\)"),
    ):
        with pytest.raises(DataError, match=what):
            bags(torch.tensor(values), offsets)
        with pytest.raises(torch.jit.Error, match="DataError: ids out of range: " + what):
            scripted(torch.tensor(values), offsets)


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
    from embq.artifact.reader import load_artifact
    from embq.data.prepared import PreparedData
    from embq.models.dlrm import load_model
    from embq.models.quantized import quantize_model
    from embq.runtime.load import load_inference_model

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
    from embq.runtime.load import inference_metadata

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
    compact = inference_metadata(artifact, "compact")
    assert {t["name"]: t["kernel"] for t in compact["tables"]} == {**kernels, "t_c1": "aten-nbit"}
    tbe = {t["name"]: t["kernel"] for t in inference_metadata(artifact, "tbe")["tables"]}
    assert tbe == kernels
    # what the loaded kernels hold: "auto" pads TBE rows of at most 64 bytes to a power of two,
    # "compact" holds the TBE's rows as encoded and maps the n-bit and codebook tables' files
    def padded(row_bytes: int) -> int:
        return 1 << (row_bytes - 1).bit_length() if row_bytes <= 64 else row_bytes

    for choice, tables in (("auto", meta["tables"]), ("compact", compact["tables"])):
        for t in tables:
            row = padded(t["bytes_per_row"]) if choice == "auto" else t["bytes_per_row"]
            want = t["rows"] * row if t["kernel"] == "fbgemm-tbe" else t["bytes"]
            assert t["memory_bytes"] == want, (choice, t["name"])
    assert any(padded(t["bytes_per_row"]) > t["bytes_per_row"] for t in meta["tables"])
    memory = {t["name"]: t["memory_bytes"] for t in meta["tables"]}
    assert meta["memory_bytes"] == sum(memory.values())
    with pytest.raises(ConfigError, match="kernel must be one of"):
        inference_metadata(artifact, "fast")
    assert meta["formats"] == {"pq8x8": 1, "int4-greedy": 1, "cb4-shared": 1, "int8": 1}
    assert meta["table_bytes"] < meta["fp32_bytes"] and meta["dense"]["kind"] == "fp32"
    json.dumps(meta)


def test_inputs_are_checked(quantized):
    from embq.data.prepared import ids_to_kjt
    from embq.runtime.load import load_inference_model

    artifact, *_ = quantized
    model = load_inference_model(artifact, verify=False)
    ids = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    dense = torch.zeros(2, 5)
    ok = model(dense, ids_to_kjt(ids, ["c0", "c1", "c2", "c3"]))
    shuffled = model(dense, ids_to_kjt(ids[:, [2, 0, 3, 1]], ["c2", "c0", "c3", "c1"]))
    torch.testing.assert_close(ok, shuffled, atol=0, rtol=0)
    with pytest.raises(DataError, match="lacks features"):
        model(dense, ids_to_kjt(ids[:, :3], ["c0", "c1", "c2"]))
    with pytest.raises(DataError, match=r"feature 'c3' row 0: id 100 not in \[0, 100\)"):
        model(dense, ids_to_kjt(np.array([[1, 2, 3, 100], [5, 6, 7, 8]]), ["c0", "c1", "c2", "c3"]))
    with pytest.raises(DataError, match=r"float32 \[B, 5\]"):
        model(torch.zeros(2, 4), ids_to_kjt(ids, ["c0", "c1", "c2", "c3"]))
    with pytest.raises(DataError, match="B=3"):
        model(torch.zeros(3, 5), ids_to_kjt(ids, ["c0", "c1", "c2", "c3"]))
    # c1 (int4-greedy) is served by the TBE, which the core's check guards
    with pytest.raises(DataError, match=r"feature 'c1' row 0: id 300 not in \[0, 300\)"):
        model(dense, ids_to_kjt(np.array([[1, 300, 3, 4], [5, 6, 7, 8]]), ["c0", "c1", "c2", "c3"]))
    # ... for callers of the plain-tensor core (Predictor) too
    kjt = ids_to_kjt(np.array([[1, 2, 3, 4], [5, -3, 7, 8]]), ["c0", "c1", "c2", "c3"])
    with pytest.raises(DataError, match=r"feature 'c1' row 1: id -3 not in \[0, 300\)"):
        model.core(dense, kjt.values(), kjt.offsets())


def test_kernel_choices_predict_alike(quantized):
    from embq.data.prepared import PreparedData
    from embq.runtime.load import load_inference_model

    artifact, _, _, data_dir = quantized
    auto = load_inference_model(artifact, verify=False)
    compact = load_inference_model(artifact, verify=False, kernel="compact")
    tbe = load_inference_model(artifact, verify=False, kernel="tbe")
    assert {t["kernel"] for t in compact.metadata["tables"]} == {
        "aten-nbit", "fbgemm-tbe", "codebook-bag"
    }  # fmt: skip
    assert {t["kernel"] for t in auto.metadata["tables"]} == {"fbgemm-tbe", "codebook-bag"}
    assert {t["kernel"] for t in tbe.metadata["tables"]} == {"fbgemm-tbe", "codebook-bag"}
    batch = next(PreparedData(data_dir).batches(0, 256, 256))
    want = auto(batch.dense, batch.sparse)
    torch.testing.assert_close(tbe(batch.dense, batch.sparse), want, atol=0, rtol=0)  # same TBE
    torch.testing.assert_close(compact(batch.dense, batch.sparse), want, atol=1e-6, rtol=1e-6)
    with pytest.raises(ConfigError, match="kernel must be one of"):
        load_inference_model(artifact, kernel="aten")


@pytest.mark.parametrize("features, dim, batch", [(26, 64, 37), (1, 8, 5), (3, 16, 0)])
def test_dot_interaction_equals_torchrec_interaction_arch(features: int, dim: int, batch: int):
    """DotInteraction (flat index_select) and TorchRec's InteractionArch (2-D index) give the
    same numbers bit for bit, eager and scripted."""
    from torchrec.models.dlrm import InteractionArch

    from embq.runtime.dlrm import DotInteraction

    g = torch.Generator().manual_seed(features)
    dense = torch.randn(batch, dim, generator=g)
    sparse = torch.randn(batch, features, dim, generator=g)
    want = InteractionArch(num_sparse_features=features)(dense, sparse)
    ours = DotInteraction(num_sparse_features=features)
    assert want.shape == (batch, dim + features + features * (features - 1) // 2)
    torch.testing.assert_close(ours(dense, sparse), want, atol=0, rtol=0)
    torch.testing.assert_close(torch.jit.script(ours)(dense, sparse), want, atol=0, rtol=0)


def _halved_towers(config, tensors, meta):
    """A stand-in dense loader for a new kind: fp32 towers with the top MLP's output halved."""
    from embq.runtime.dense_towers import DENSE_LOADERS

    towers = DENSE_LOADERS["fp32"](config, tensors, meta)
    last = [m for m in towers.over_arch.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(0.5)
        last.bias.mul_(0.5)
    return towers


def test_dense_kinds_dispatch_in_one_table(trained, tmp_path, monkeypatch):
    from embq.artifact.seal import seal_artifact
    from embq.artifact.writer import write_model_artifact as write_artifact
    from embq.data.prepared import ids_to_kjt
    from embq.embedding.encode import encode_tables as quantize_tables
    from embq.models.dlrm import load_model
    from embq.models.tables import dense_state_dict, find_tables
    from embq.runtime.dense_towers import DENSE_LOADERS
    from embq.runtime.load import load_inference_model

    model, config = load_model(trained[0])
    tables = quantize_tables(find_tables(model), "int4")
    path = write_artifact(tmp_path / "ok.embq", tables, config, dense_state_dict(model))
    batch = (torch.randn(3, 5), ids_to_kjt(np.array([[1, 2, 3, 4]] * 3), ["c0", "c1", "c2", "c3"]))
    base = load_inference_model(path)(*batch)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["dense"]["meta"]["kind"] = "int8-brecq-v9"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="changed after the artifact was written"):
        load_inference_model(path, verify=False)
    seal_artifact(path)  # the edit was meant: record its digest
    with pytest.raises(ArtifactError, match="kind 'int8-brecq-v9'.*known kinds: \\['embq-dense-ptq', 'fp32'"):
        load_inference_model(path, verify=False)
    # a kind registered by "module:function" is imported when first needed
    monkeypatch.setitem(DENSE_LOADERS, "int8-brecq-v9", _halved_towers)
    torch.testing.assert_close(load_inference_model(path, verify=False)(*batch), base * 0.5)


def test_non_dlrm_artifacts_are_refused_but_serve_lookups(trained, tmp_path):
    from embq.artifact.writer import ArtifactWriter
    from embq.embedding.encode import encode_tables as quantize_tables
    from embq.models.dlrm import load_model
    from embq.models.tables import find_tables
    from embq.runtime.bags import load_embedding_bags
    from embq.runtime.load import load_inference_model

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
    from embq.runtime.export import METADATA_FILE, export_torchscript
    from embq.runtime.load import load_inference_model

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
    # out-of-range ids of c1 (int4-greedy: ATen's 4-bit op) are refused by the module itself
    bad = values.clone().long()
    c1 = slice(int(offsets[300]), int(offsets[600]))  # feature 1's ids (B = 300)
    bad[c1.start + 3] = 300
    with pytest.raises(torch.jit.Error, match=r"DataError: .*feature 'c1' row 3: id 300 not in \[0, 300\)"):
        scripted(batch.dense, bad, offsets)
