"""DCP checkpoints in, one artifact out (embq.checkpoint): checkpoints written the way users write
them (TorchRec DistributedModelParallel TABLE_WISE and COLUMN_WISE on CPU/gloo; row-wise
ShardedTensors built directly, since TorchRec offers ROW_WISE only on CUDA), read bit-exactly against `dcp.load`,
quantized to the same bytes as a one-process quantization of the `dcp.load`ed model, served like
a float64 dequantize-then-pool reference; split over ranks, killed and resumed; bad checkpoints
refused with clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from embq.errors import ConfigError, DataError, EmbqError
from embq.models.dlrm import DLRMConfig
from tests.dcp_checkpoints import (
    dcp_state_dict,
    free_port,
    write_dmp_checkpoint,
    write_rowwise_checkpoint,
)

warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
CONFIG = DLRMConfig(dense_in_features=4, sparse_feature_names=["a", "b", "c"],
                    num_embeddings=[1000, 37, 3001], embedding_dim=16)  # fmt: skip
SPLITS = {"t_a": [0, 333, 1000], "t_b": [0, 37, 37], "t_c": [0, 1501, 3001]}  # uneven, one empty
PLAN = {"tables": {"*": "int4", "t_b": "int8", "t_c": "cb4-shared"}, "kernels": {"t_a": "compact"}}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dcp")
    (root / "config.json").write_text(json.dumps(CONFIG.to_json()))
    kinds = write_dmp_checkpoint(CONFIG, root / "dmp", sharding="table_wise", seed=3)
    assert set(kinds.values()) == {"table_wise"}
    kinds = write_dmp_checkpoint(CONFIG, root / "cw", sharding="column_wise", seed=5)
    assert set(kinds.values()) == {"column_wise"}
    write_rowwise_checkpoint(CONFIG, root / "rw", SPLITS, seed=4)
    return {"dmp": root / "dmp", "cw": root / "cw", "rw": root / "rw",
            "config": root / "config.json"}  # fmt: skip


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _same_as_reference(out: Path, ref: Path) -> None:
    """Every table and tower file byte-identical, and the manifests equal but for the tables'
    stats (the in-memory path measures over the whole table, the streamed one on a sample)
    and therefore the digest."""
    got, want = _files(out), _files(ref)
    assert got.keys() == want.keys()
    for name in got:
        if name != "manifest.json":
            assert got[name] == want[name], name

    def strip(raw: bytes) -> dict:
        m = json.loads(raw)
        m.pop("digest")
        for t in m["tables"]:
            t.pop("stats")
        return m

    assert strip(got["manifest.json"]) == strip(want["manifest.json"])


def _reference_artifact(ckpt: Path, tmp: Path, plan) -> Path:
    """One-process quantization of the `dcp.load`ed model through embq's in-memory path."""
    from embq.cli.quantize import quantize_model_dir
    from embq.models.dlrm import build_dlrm, save_model

    model = build_dlrm(CONFIG)
    model.load_state_dict(dcp_state_dict(ckpt, CONFIG))
    save_model(model, CONFIG, tmp / "ref-model")
    out, _ = quantize_model_dir(tmp / "ref-model", plan, tmp / "ref.embq", progress=False)
    return out


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize("kind", ["dmp", "cw", "rw"])
def test_reader_is_bit_exact_against_dcp_load(checkpoints, kind):
    from embq.checkpoint.metadata import read_index
    from embq.checkpoint.model import map_checkpoint
    from embq.checkpoint.source import CheckpointTable

    want = dcp_state_dict(checkpoints[kind], CONFIG)
    index = read_index(checkpoints[kind])
    model = map_checkpoint(index, CONFIG)
    chunks = index.tensors[model.tables[0].key].chunks
    if kind == "rw":  # really row-sharded over two files, one shard empty
        assert [c.sizes[0] for c in chunks] == [333, 667] and len({c.file for c in chunks}) == 2
    if kind == "cw":  # really column-sharded: two halves of the width in two files
        assert [c.offsets for c in chunks] == [(0, 0), (0, 8)] and len({c.file for c in chunks}) == 2
    rng = np.random.default_rng(0)
    for t in model.tables:
        ref = want[f"sparse_arch.embedding_bag_collection.embedding_bags.{t.name}.weight"].numpy()
        with CheckpointTable(index, t.key) as src:
            got = np.concatenate([src.read(a, min(a + 97, src.rows)) for a in range(0, src.rows, 97)])
            assert got.tobytes() == ref.tobytes()
            idx = np.sort(rng.choice(src.rows, size=min(50, src.rows), replace=False))
            assert src.take(idx).tobytes() == ref[idx].tobytes()
    from embq.checkpoint.model import read_dense

    for k, v in read_dense(index, model).items():
        assert torch.equal(v, want[k]), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.float32])
def test_reader_widens_every_float_dtype_like_dcp_load(tmp_path, dtype):
    """A one-process `dcp.save` of plain tensors (several records in one file, the second at a
    non-zero offset): rows read in chunks equal `dcp.load`'s tensor widened to float32."""
    import torch.distributed.checkpoint as dcp

    from embq.checkpoint.metadata import read_index
    from embq.checkpoint.source import CheckpointTable

    gen = torch.Generator().manual_seed(0)
    state = {"x.weight": torch.randn(300, 12, generator=gen).to(dtype),
             "y.weight": torch.randn(41, 5, generator=gen).to(dtype)}  # fmt: skip
    dcp.save(state, checkpoint_id=str(tmp_path / "ck"), no_dist=True)
    back = {k: torch.empty_like(v) for k, v in state.items()}
    dcp.load(back, checkpoint_id=str(tmp_path / "ck"), no_dist=True)
    index = read_index(tmp_path / "ck")
    assert index.tensors["y.weight"].chunks[0].offset > 0 or index.tensors["x.weight"].chunks[0].offset > 0
    for key, want in back.items():
        with CheckpointTable(index, key) as src:
            got = np.concatenate([src.read(a, min(a + 64, src.rows)) for a in range(0, src.rows, 64)])
        assert got.tobytes() == want.float().numpy().tobytes(), key


def test_rows_are_assigned_exactly_once_for_uneven_splits():
    from embq.embedding.stream import row_range

    for rows in (1, 2, 7, 37, 1000, 3001):
        for world in (1, 2, 3, 4, 7):
            covered = np.concatenate([np.arange(*row_range(rows, r, world)) for r in range(world)])
            assert np.array_equal(covered, np.arange(rows)), (rows, world)


# --------------------------------------------------------------------------- quantizing


@pytest.mark.parametrize("kind", ["dmp", "cw", "rw"])
def test_one_process_equals_in_memory_quantization_and_serves(checkpoints, tmp_path, kind):
    import embq
    from embq.checkpoint.quantize import quantize_checkpoint

    out = quantize_checkpoint(checkpoints[kind], checkpoints["config"], PLAN, tmp_path / "o.embq",
                              chunk_rows=128, progress=False)  # fmt: skip
    _same_as_reference(out, _reference_artifact(checkpoints[kind], tmp_path, PLAN))
    _assert_predicts_like_float64(out, checkpoints[kind])
    assert embq.load(out).config == CONFIG


def _assert_predicts_like_float64(artifact: Path, ckpt: Path) -> None:
    """Predictor on the artifact vs a float64 DLRM holding the decoded tables and the
    checkpoint's towers (dequantize, then pool and run the towers in float64)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from embq.artifact.reader import load_artifact
    from embq.models.dlrm import build_dlrm
    from embq_serving.predictor import Predictor

    state = dcp_state_dict(ckpt, CONFIG)
    art = load_artifact(artifact)
    for name in art.table_names():
        key = f"sparse_arch.embedding_bag_collection.embedding_bags.{name}.weight"
        state[key] = torch.from_numpy(art.table(name).decode().astype(np.float64))
    ref = build_dlrm(CONFIG).double()
    ref.load_state_dict({k: v.double() for k, v in state.items()})
    rng = np.random.default_rng(1)
    batch = 64
    dense = rng.normal(size=(batch, CONFIG.dense_in_features)).astype(np.float32)
    sparse = {f: [list(rng.integers(0, n, size=rng.integers(0, 4))) for _ in range(batch)]
              for f, n in zip(CONFIG.sparse_feature_names, CONFIG.num_embeddings)}  # fmt: skip
    lengths = torch.tensor([len(ids) for f in CONFIG.sparse_feature_names for ids in sparse[f]])
    values = torch.tensor([i for f in CONFIG.sparse_feature_names for ids in sparse[f] for i in ids],
                          dtype=torch.int64)  # fmt: skip
    kjt = KeyedJaggedTensor.from_lengths_sync(CONFIG.sparse_feature_names, values, lengths)
    with torch.no_grad():
        want = torch.sigmoid(ref(torch.from_numpy(dense).double(), kjt)).squeeze(-1).numpy()
    for kernel in ("compact", "tbe"):
        got = Predictor(artifact, kernel=kernel).predict(dense, sparse)
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


@pytest.mark.slow  # ~25 s on 2 cores: two torchrun ranks start torch + torchrec
def test_torchrun_two_ranks_equals_one_process(checkpoints, tmp_path):
    from embq.checkpoint.quantize import quantize_checkpoint

    out = tmp_path / "d.embq"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "embq", "quantize", "--checkpoint", str(checkpoints["rw"]), "--config",
           str(checkpoints["config"]), "--plan", json.dumps(PLAN), "--output", str(out),
           "--chunk-rows", "100", "--quiet"]  # fmt: skip
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip())["ranks"] == 2  # one summary line, from rank 0
    _same_as_reference(out, _reference_artifact(checkpoints["rw"], tmp_path, PLAN))
    single = tmp_path / "single.embq"
    quantize_checkpoint(checkpoints["rw"], checkpoints["config"], PLAN, single, progress=False)
    assert _files(out) == _files(single)  # stats and digest too: the split changes nothing


def _rank_main(rank: int, world: int, port: int, ckpt: str, config: str, out: str,
               die_after: int, log: str) -> None:  # fmt: skip
    """One rank of a 2-process job; with die_after > 0 rank 1 kills itself mid-table."""
    import datetime
    import signal

    import torch.distributed as dist

    from embq.checkpoint.quantize import quantize_checkpoint

    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    seen = [0]

    def on_chunk(_rows: int) -> None:
        seen[0] += 1
        if die_after and rank == 1 and seen[0] >= die_after:
            os.kill(os.getpid(), signal.SIGKILL)  # a killed rank: no cleanup, no message

    try:
        quantize_checkpoint(ckpt, config, PLAN, out, chunk_rows=50, progress=False,
                            checkpoint_seconds=0, on_chunk=on_chunk)  # fmt: skip
        Path(f"{log}.{rank}").write_text("ok")
    except EmbqError as e:
        Path(f"{log}.{rank}").write_text(f"EmbqError: {e}")


def _spawn_job(args: tuple) -> None:
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_rank_main, args=(2, free_port(), *args), nprocs=2, join=False,
                             start_method="spawn")  # fmt: skip
    for p in ctx.processes:
        p.join(timeout=180)


def test_killed_rank_fails_the_job_and_a_rerun_resumes(checkpoints, tmp_path):
    from embq.embedding.stream import staging_path

    out, log = tmp_path / "k.embq", str(tmp_path / "log")
    args = (str(checkpoints["rw"]), str(checkpoints["config"]), str(out))
    _spawn_job((*args, 5, log))
    assert not out.exists()  # nothing that looks finished
    staging = staging_path(out)
    assert staging.exists() and not (staging / "manifest.json").exists()
    message = Path(f"{log}.0").read_text()
    assert message.startswith("EmbqError") and "rerun" in message, message
    assert not Path(f"{log}.1").exists()  # rank 1 was killed
    records = list((staging / ".embq-stream").glob("rows-*.json"))
    assert records  # durable progress to resume from
    _spawn_job((*args, 0, log))
    assert Path(f"{log}.0").read_text() == "ok" and Path(f"{log}.1").read_text() == "ok"
    assert not staging.exists()
    _same_as_reference(out, _reference_artifact(checkpoints["rw"], tmp_path, PLAN))


# --------------------------------------------------------------------------- bad input


def _copy(src: Path, tmp: Path) -> Path:
    dst = tmp / "ck"
    shutil.copytree(src, dst)
    return dst


def test_incomplete_or_corrupt_checkpoints_are_refused(checkpoints, tmp_path):
    from embq.checkpoint.quantize import quantize_checkpoint

    def run(ck: Path) -> None:
        out = tmp_path / f"x{len(list(tmp_path.iterdir()))}.embq"
        quantize_checkpoint(ck, checkpoints["config"], "int4", out, progress=False)
        raise AssertionError("should have raised")

    ck = _copy(checkpoints["rw"], tmp_path / "a")
    (ck / ".metadata").unlink()
    with pytest.raises(DataError, match="no .metadata"):
        run(ck)
    ck = _copy(checkpoints["rw"], tmp_path / "b")
    (ck / "__1_0.distcp").unlink()
    with pytest.raises(DataError, match="incomplete: __1_0.distcp"):
        run(ck)
    ck = _copy(checkpoints["rw"], tmp_path / "c")
    with open(ck / "__1_0.distcp", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    with pytest.raises(DataError, match="truncated or corrupt"):
        run(ck)
    ck = _copy(checkpoints["rw"], tmp_path / "d")
    (ck / ".metadata").write_bytes((ck / ".metadata").read_bytes()[:100])
    with pytest.raises(DataError, match="cannot read"):
        run(ck)
    ck = _copy(checkpoints["rw"], tmp_path / "e")
    with open(ck / "__0_0.distcp", "r+b") as f:  # the first record's zip magic
        f.write(b"XXXX")
    with pytest.raises(DataError, match="not stored as a torch.save record"):
        run(ck)
    assert not any(p.name.endswith(".embq") or ".partial" in p.name for p in tmp_path.iterdir())


def test_layouts_not_readable_in_bounded_memory_are_refused(tmp_path):
    """DCP's safetensors serialization and storage transforms (compression) are refused with a
    DataError naming the tensor, never loaded whole."""
    import pickle

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.filesystem import FileSystemWriter, SerializationFormat

    from embq.checkpoint.metadata import read_index
    from embq.checkpoint.source import CheckpointTable

    state = {"x.weight": torch.randn(30, 4)}
    writer = FileSystemWriter(tmp_path / "st", serialization_format=SerializationFormat.SAFETENSORS)
    dcp.save(state, storage_writer=writer, no_dist=True)
    with pytest.raises(DataError, match="'x.weight'.*not stored as a torch.save record"):
        CheckpointTable(read_index(tmp_path / "st"), "x.weight")
    dcp.save(state, checkpoint_id=str(tmp_path / "tr"), no_dist=True)
    meta = FileSystemReader(str(tmp_path / "tr")).read_metadata()  # test-side: torch's reader
    for info in meta.storage_data.values():
        info.transform_descriptors = ["zstd"]
    (tmp_path / "tr" / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(DataError, match=r"storage transforms \['zstd'\]"):
        read_index(tmp_path / "tr")


def test_metadata_with_foreign_objects_is_refused(checkpoints, tmp_path):
    import pickle

    from embq.checkpoint.metadata import read_index

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    ck = _copy(checkpoints["rw"], tmp_path)
    (ck / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(DataError, match="does not unpickle arbitrary objects"):
        read_index(ck)


def test_config_and_checkpoint_must_agree(checkpoints, tmp_path):
    from dataclasses import replace

    from embq.checkpoint.quantize import quantize_checkpoint

    other = replace(CONFIG, sparse_feature_names=["a", "b", "z"])
    with pytest.raises(ConfigError, match=r"embedding_bags\.t_z\.weight.*unexpected tables \['t_c'\]"):
        quantize_checkpoint(checkpoints["rw"], other, "int4", tmp_path / "o.embq", progress=False)
    bigger = replace(CONFIG, num_embeddings=[1000, 37, 3002])
    with pytest.raises(ConfigError, match=r"shape \[3001, 16\].*\[3002, 16\]"):
        quantize_checkpoint(checkpoints["rw"], bigger, "int4", tmp_path / "o.embq", progress=False)
    with pytest.raises(ConfigError, match="calibration"):
        quantize_checkpoint(checkpoints["rw"], CONFIG, "rtn:w8a8", tmp_path / "o.embq")
    assert not list(tmp_path.iterdir())
