"""Bytes on a target against independent references: embq's runtime (the metadata's
"memory_bytes" of a loaded artifact, the TBE's own allocation) on x86-fbgemm, and fbgemm's own
row and table sizing functions on nvidia-fbgemm."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import embq
from embq.hardware.accounting import (
    padded_row_bytes,
    params_bytes,
    table_bytes,
    table_choices,
)
from embq.hardware.spec import format_key, load_spec

FORMATS = ["fp32", "fp16", "int8", "int4-opt", "int2-opt", "cb4-row", "cb4-shared(sample_rows=512)",
           "pq4x8(sample_rows=512)"]  # fmt: skip


@pytest.fixture(scope="module")
def dlrm16():
    from embq.models.dlrm import DLRMConfig, build_dlrm

    config = DLRMConfig(dense_in_features=3, sparse_feature_names=["a", "b", "c"],
                        num_embeddings=[700, 333, 260], embedding_dim=16)  # fmt: skip
    model = build_dlrm(config, seed=1)
    with torch.no_grad():
        for t in model.sparse_arch.embedding_bag_collection.embedding_bags.values():
            t.weight.mul_(0.05)
    return model.eval()


def _header_bytes(path) -> int:
    """A safetensors file's header: 8 length bytes plus the JSON header (read independently)."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


@pytest.mark.parametrize("kernel", ["auto", "compact", "tbe", "codebook"])
def test_x86_bytes_equal_the_runtimes_memory_bytes(dlrm16, kernel, tmp_path):
    spec = load_spec("x86-fbgemm")
    served = [f for f in FORMATS if spec.lookup_kernels[kernel].serves_format(f)]
    runtime = spec.lookup_kernels[kernel].runtime
    names = ["t_a", "t_b", "t_c"]
    for i in range(len(served)):
        # each table takes the format in turn, so every (format, kernel) meets two row counts
        plan = embq.Plan.parse({"tables": {n: served[(i + j) % len(served)] for j, n in
                                           enumerate(names)}, "kernels": {"*": runtime}})  # fmt: skip
        qmodel = embq.quantize(dlrm16, plan, progress=False)
        path = embq.save(qmodel, tmp_path / f"{kernel}{i}.embq")
        loaded = embq.load(path)
        in_memory = {t["name"]: t for t in qmodel.metadata["tables"]}
        for t in loaded.metadata["tables"]:
            want = table_bytes(spec, spec.lookup_kernels[kernel], t["format"], t["rows"], 16)
            assert in_memory[t["name"]]["memory_bytes"] == want, (kernel, t["format"])
            if t["kernel"] == "fbgemm-tbe":  # copied into the TBE: the same bytes
                assert t["memory_bytes"] == want
            else:  # mapped in place: the table file, whose safetensors header adds to it
                header = _header_bytes(path / "tables" / f"{t['name']}.safetensors")
                assert t["memory_bytes"] == want + header, (kernel, t["format"])


def test_tbe_allocation_is_the_accounting_plus_fbgemms_table_alignment(dlrm16):
    """fbgemm's CPU TBE rounds each table up to 128 bytes (cacheline_alignment), which the
    runtime's memory_bytes (and so x86-fbgemm) leaves out: at most 127 bytes a table."""
    spec = load_spec("x86-fbgemm")
    for kernel in ("auto", "tbe"):
        qmodel = embq.quantize(dlrm16, {"tables": {"*": "int4", "t_b": "int8", "t_c": "fp16"},
                                        "kernels": {"*": kernel}}, progress=False)  # fmt: skip
        want = sum(table_bytes(spec, spec.lookup_kernels[kernel], t.format, t.rows, 16)
                   for t in qmodel.tables)  # fmt: skip
        held = sum(part.weights_host.numel() for g in qmodel.module.core.embeddings.groups
                   for part in g.kernel.parts)  # fmt: skip
        assert 0 <= held - want <= 127 * len(qmodel.tables)
        assert held == sum(-(-table_bytes(spec, spec.lookup_kernels[kernel], t.format, t.rows, 16)
                             // 128) * 128 for t in qmodel.tables)  # fmt: skip


def test_params_bytes_equal_what_fitting_stores():
    from embq.embedding.encode import encode_table
    from embq.models.tables import TableInfo

    weight = torch.randn(400, 16) * 0.1
    for fmt in FORMATS:
        table = encode_table(TableInfo("t", 400, 16, ["f"], "SUM", weight), fmt)
        assert table.stats["bytes"] == table.codes.nbytes + params_bytes(fmt, 16), fmt
        assert sum(np.asarray(v).nbytes for v in table.params.values()) == params_bytes(fmt, 16)


@pytest.mark.parametrize("dim", [16, 64, 128])
def test_nvidia_rows_and_tables_follow_fbgemms_own_sizing(dim):
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
        nbit_construct_split_state,
        rounded_row_size_in_bytes,
    )

    spec = load_spec("nvidia-fbgemm")
    kernel = spec.lookup_kernels["tbe-hbm"]
    for fmt, ty in [("fp32", "FP32"), ("fp16", "FP16"), ("int8", "INT8"), ("int4-opt", "INT4"),
                    ("int2", "INT2")]:  # fmt: skip
        sparse = SparseType[ty]
        assert padded_row_bytes(spec, kernel, fmt, dim) == rounded_row_size_in_bytes(dim, sparse, 16)
        for rows in (1, 7, 1000):
            state = nbit_construct_split_state([("t", rows, dim, sparse, EmbeddingLocation.DEVICE)],
                                               cacheable=False, row_alignment=16)  # fmt: skip
            assert table_bytes(spec, kernel, fmt, rows, dim) == state.dev_size, (fmt, rows)


def test_nvidia_dim16_pads_int2_and_int4_alike():
    spec = load_spec("nvidia-fbgemm")
    kernel = spec.lookup_kernels["tbe-hbm"]
    assert padded_row_bytes(spec, kernel, "int2-opt", 16) == 16
    assert padded_row_bytes(spec, kernel, "int4-opt", 16) == 16
    assert padded_row_bytes(spec, kernel, "int4", 64) == 48  # 36 -> 48, int2 20 -> 32
    assert padded_row_bytes(spec, kernel, "int2", 64) == 32


def test_choices_respect_the_spec():
    x86, nvidia, accel = (load_spec(n) for n in ("x86-fbgemm", "nvidia-fbgemm", "accelerator"))
    choices = table_choices(x86, 1000, 16, FORMATS)
    labels = {c.label for c in choices}
    assert "int4-opt@compact" in labels and "int4-opt@auto" in labels and "int8@compact" not in labels
    by = {c.label: c for c in choices}
    assert by["int4-opt@auto"].row_bytes == 16 and by["int4-opt@compact"].row_bytes == 12
    assert by["int4-opt@auto"].group != by["int4-opt@tbe"].group  # 16- vs 1-byte alignment
    assert by["int8@tbe"].group == by["int4-opt@tbe"].group  # one unpadded TBE
    # PQ needs a row per centroid: a 100-row table has no pq4x8 choice
    assert not any(c.format.startswith("pq") for c in table_choices(x86, 100, 16, FORMATS))
    assert {format_key(c.format) for c in table_choices(nvidia, 1000, 16, FORMATS)} == {
        "fp32", "fp16", "int8", "int4", "int2"}  # fmt: skip
    accel_choices = table_choices(accel, 1000, 16, FORMATS)
    assert {format_key(c.format) for c in accel_choices} == {"int8", "int4"}
    assert {c.row_bytes for c in accel_choices} == {32}
    # a row longer than the kernel takes is no choice: fbgemm's CUDA INT2 rows stop at 1024 B
    assert [c.row_bytes for c in table_choices(nvidia, 10, 4064, ["int2"])] == [1024] * 2
    assert not table_choices(nvidia, 10, 4096, ["int2"])  # 1028 -> 1040 bytes
    json.dumps([c.__dict__ for c in choices])
