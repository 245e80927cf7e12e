"""Chunked, resumable table quantization and the table readers it uses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

from embq.artifact.reader import load_artifact
from embq.cli import main as embq_main
from embq.embedding.registry import get_format
from embq.embedding.sources import open_table
from embq.embedding.stream import quantize_table, row_range, staging_path
from embq.errors import ArtifactError, DataError, EmbqError, FormatError
from tests.helpers import codebook_format

ROWS, DIM, CHUNK = 1000, 16, 64  # 1000 is not a multiple of 64: the last chunk is short
REPO = Path(__file__).resolve().parents[1]


def _table(rows: int = ROWS, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # rows of different scales, so per-row qparams matter
    return (rng.normal(0, 1, (rows, DIM)) * rng.uniform(0.01, 2, (rows, 1))).astype(np.float32)


def _codebook_format() -> str | None:
    return codebook_format(DIM)


def _formats() -> list[str]:
    names = ["int4", "int8"]
    cb = _codebook_format()
    return names + ([cb] if cb else [])


def _rows(path: Path) -> np.ndarray:
    artifact = load_artifact(path)
    (name,) = artifact.table_names()
    return np.asarray(artifact.table(name).rows)


def _env() -> dict[str, str]:
    """The environment for subprocesses: this checkout first on PYTHONPATH."""
    extra = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), extra]))}


def _files(path: Path) -> dict[str, bytes]:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): p.read_bytes() for p in files}


@pytest.fixture
def npy(tmp_path: Path) -> tuple[Path, np.ndarray]:
    table = _table()
    path = tmp_path / "emb.npy"
    np.save(path, table)
    return path, table


# --------------------------------------------------------------------------- equals one-shot encode


def _inputs(tmp_path: Path, table: np.ndarray) -> dict[str, tuple[Path, str | None]]:
    np.save(tmp_path / "t.npy", table)
    save_numpy({"other": np.zeros((3, 2), np.float32), "emb": table},
               str(tmp_path / "t.safetensors"))  # fmt: skip
    torch.save({"model": {"emb.weight": torch.from_numpy(table), "step": torch.tensor(3)}},
               tmp_path / "t.pt")  # fmt: skip
    return {"npy": (tmp_path / "t.npy", None), "safetensors": (tmp_path / "t.safetensors", "emb"),
            "torch": (tmp_path / "t.pt", "model.emb.weight")}  # fmt: skip


@pytest.mark.parametrize("fmt_name", _formats())
@pytest.mark.parametrize("kind", ["npy", "safetensors", "torch"])
def test_stream_equals_one_shot_encode(tmp_path, kind, fmt_name):
    table = _table()
    path, tensor = _inputs(tmp_path, table)[kind]
    out = quantize_table(path, fmt_name, tmp_path / "o.embq", tensor=tensor, chunk_rows=CHUNK,
                         progress=False, sample_rows=500)  # fmt: skip
    artifact = load_artifact(out)
    (entry,) = artifact.tables.values()
    t = artifact.table(entry.name)
    fmt = get_format(fmt_name)
    # the reference encodes the whole table at once with the params the artifact stores
    np.testing.assert_array_equal(t.rows, fmt.encode(table, t.params))
    assert (entry.rows, entry.dim, entry.format) == (ROWS, DIM, fmt_name)
    assert entry.stats["sample_relative_rmse"] < 0.5
    if t.params:  # fitted on the seeded sample: a rerun gets the same params
        out2 = quantize_table(path, fmt_name, tmp_path / "o2.embq", tensor=tensor,
                              chunk_rows=300, progress=False, sample_rows=500)  # fmt: skip
        assert _files(out) == _files(out2)
    assert not staging_path(out).exists()


def test_low_precision_inputs(tmp_path):
    table = _table()
    bf16 = torch.from_numpy(table).to(torch.bfloat16)
    save_torch({"w": bf16}, str(tmp_path / "b.safetensors"))
    torch.save(bf16, tmp_path / "b.pt")
    np.save(tmp_path / "h.npy", table.astype(np.float16))
    want_bf16 = bf16.float().numpy()
    for name in ("b.safetensors", "b.pt"):
        with open_table(tmp_path / name) as src:
            assert src.dtype == "bfloat16"
            np.testing.assert_array_equal(src.read(10, 500), want_bf16[10:500])
    with open_table(tmp_path / "h.npy") as src:
        want_f16 = table.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(src.read(0, ROWS), want_f16)
    out = quantize_table(tmp_path / "b.pt", "int8", tmp_path / "o.embq", chunk_rows=CHUNK,
                         progress=False)  # fmt: skip
    np.testing.assert_array_equal(_rows(out), get_format("int8").encode(want_bf16, {}))


def test_fortran_order_and_reads_after_page_drops(tmp_path):
    table = _table()
    np.save(tmp_path / "f.npy", np.asfortranarray(table))
    with open_table(tmp_path / "f.npy") as src:
        for _ in range(2):  # pages dropped after the first pass are read again from the file
            np.testing.assert_array_equal(np.concatenate([src.read(a, min(a + 97, ROWS))
                                          for a in range(0, ROWS, 97)]), table)  # fmt: skip
        idx = np.array([0, 5, 999])
        np.testing.assert_array_equal(src.take(idx), table[idx])


# --------------------------------------------------------------------------- resume


class _Kill(Exception):
    pass


def _kill_after(n_chunks: int):
    seen = []

    def on_chunk(rows_done: int) -> None:
        seen.append(rows_done)
        if len(seen) == n_chunks:
            raise _Kill

    return on_chunk, seen


@pytest.mark.parametrize("fmt_name", ["int4", _codebook_format() or "int8"])
def test_resume_after_interruption(tmp_path, npy, fmt_name):
    path, table = npy
    clean = quantize_table(path, fmt_name, tmp_path / "clean.embq", chunk_rows=CHUNK,
                           progress=False)  # fmt: skip
    out = tmp_path / "o.embq"
    on_chunk, seen = _kill_after(3)
    with pytest.raises(_Kill):
        quantize_table(path, fmt_name, out, chunk_rows=CHUNK, progress=False, on_chunk=on_chunk,
                       checkpoint_seconds=0)  # fmt: skip
    assert not out.exists() and staging_path(out).exists()
    on_chunk, seen = _kill_after(-1)
    # a different chunk size is fine: encoding is per row
    quantize_table(path, fmt_name, out, chunk_rows=100, progress=False, on_chunk=on_chunk)
    assert seen[0] == 3 * CHUNK + 100  # continued after the third chunk, did not start over
    assert _files(out) == _files(clean)
    assert not staging_path(out).exists()


def test_resume_refuses_changed_arguments_or_input(tmp_path, npy):
    path, table = npy
    out = tmp_path / "o.embq"
    with pytest.raises(_Kill):
        quantize_table(path, "int4", out, chunk_rows=CHUNK, progress=False,
                       on_chunk=_kill_after(2)[0], checkpoint_seconds=0)  # fmt: skip
    with pytest.raises(EmbqError, match="format"):
        quantize_table(path, "int8", out, chunk_rows=CHUNK, progress=False)
    time.sleep(0.01)
    np.save(path, table * 2)  # same shape, new content
    with pytest.raises(EmbqError, match="input"):
        quantize_table(path, "int4", out, chunk_rows=CHUNK, progress=False)
    # --no-resume starts over with the new input
    quantize_table(path, "int4", out, chunk_rows=CHUNK, progress=False, resume=False)
    np.testing.assert_array_equal(_rows(out), get_format("int4").encode(table * 2, {}))


def test_resume_after_sigkill(tmp_path, npy):
    """A real kill -9 in the middle of a run, then a rerun, gives the clean run's bytes."""
    path, table = npy
    out = tmp_path / "o.embq"
    script = (
        "import sys, time\n"
        "from embq.embedding.stream import quantize_table\n"
        "quantize_table(sys.argv[1], 'int4', sys.argv[2], chunk_rows=16, progress=False,\n"
        "               checkpoint_seconds=0, on_chunk=lambda n: time.sleep(0.05))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(path), str(out)], env=_env())
    record = staging_path(out) / ".embq-stream" / f"rows-0-{ROWS}.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = json.loads(record.read_text()) if record.exists() else {}
        if state.get("rows_done", 0) >= 5 * 16:
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done_before = json.loads(record.read_text())["rows_done"]
    assert 0 < done_before < ROWS
    rows_seen: list[int] = []
    quantize_table(path, "int4", out, chunk_rows=CHUNK, progress=False, on_chunk=rows_seen.append)
    assert rows_seen[0] > done_before  # resumed, not restarted
    np.testing.assert_array_equal(_rows(out), get_format("int4").encode(table, {}))


# --------------------------------------------------------------------------- refusals


def test_existing_output_refused(tmp_path, npy):
    out = tmp_path / "o.embq"
    out.mkdir()
    (out / "keep").write_text("mine")
    with pytest.raises(ArtifactError, match="already exists"):
        quantize_table(npy[0], "int4", out, progress=False)
    assert (out / "keep").read_text() == "mine"


def test_zero_rows_refused(tmp_path):
    np.save(tmp_path / "z.npy", np.zeros((0, DIM), np.float32))
    with pytest.raises(EmbqError, match="0 rows"):
        quantize_table(tmp_path / "z.npy", "int4", tmp_path / "o.embq", progress=False)


@pytest.mark.parametrize("bad_row", [0, 777, ROWS - 1])
def test_nan_names_global_row(tmp_path, bad_row):
    table = _table()
    table[bad_row, 3] = np.nan
    np.save(tmp_path / "n.npy", table)
    # sample_rows=1: the NaN row is not in the sample, so the chunk loop must catch it
    with pytest.raises(FormatError, match=rf"row {bad_row}\b"):
        quantize_table(tmp_path / "n.npy", "int4", tmp_path / "o.embq", chunk_rows=100,
                       progress=False, sample_rows=1, seed=1)  # fmt: skip
    assert not (tmp_path / "o.embq").exists()


def _bad_table(tmp_path: Path, bad_row: int, value: float = np.nan) -> Path:
    table = _table()
    table[bad_row, 3] = value
    np.save(tmp_path / "n.npy", table)
    return tmp_path / "n.npy"


# NaN stops the run while it samples the table; a value beyond fp16 passes the sample and stops
# it in the chunk loop
@pytest.mark.parametrize("bad_row, value, said", [(0, np.nan, "row 0 "), (777, 7e4, "700..799.*row 77 ")])
def test_failure_before_any_durable_row_leaves_nothing(tmp_path, bad_row, value, said):
    """No empty `.o.embq.partial` is left behind."""
    out = tmp_path / "o.embq"
    with pytest.raises(FormatError, match=said) as e:
        quantize_table(_bad_table(tmp_path, bad_row, value), "int4", out, chunk_rows=100,
                       progress=False, checkpoint_seconds=3600)  # fmt: skip
    assert "resume" not in str(e.value)
    assert not out.exists() and not staging_path(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.npy"]


def test_cli_failure_leaves_no_partial_directory(tmp_path, capsys):
    out = tmp_path / "o.embq"
    args = ["quantize-table", "--input", str(_bad_table(tmp_path, 5)), "--format", "int4",
            "--output", str(out), "--quiet"]  # fmt: skip
    assert embq_main(args) == 2
    assert "row 5" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.npy"]


def test_failure_after_durable_rows_says_how_to_resume(tmp_path):
    path = _bad_table(tmp_path, 777, 7e4)
    out = tmp_path / "o.embq"
    with pytest.raises(FormatError) as e:
        quantize_table(path, "int4", out, chunk_rows=100, progress=False, checkpoint_seconds=0)
    msg = str(e.value)
    assert "700..799" in msg and "700 of 1,000 rows are saved" in msg and str(staging_path(out)) in msg
    assert "resumes" in msg and "--no-resume" in msg
    assert staging_path(out).exists() and not out.exists()
    # as the message says: a fixed input is a new input, so start over
    fixed = _table()
    time.sleep(0.01)
    np.save(path, fixed)
    with pytest.raises(EmbqError, match="input"):
        quantize_table(path, "int4", out, chunk_rows=100, progress=False)
    quantize_table(path, "int4", out, chunk_rows=100, progress=False, resume=False)
    np.testing.assert_array_equal(_rows(out), get_format("int4").encode(fixed, {}))
    assert not staging_path(out).exists()


@pytest.mark.parametrize("checkpoint_seconds", [3600, 0])
def test_interruption_cleans_up_or_notes_the_resume(tmp_path, npy, checkpoint_seconds):
    """Any exception, not only embq's: removed before the first checkpoint, noted after it."""
    out = tmp_path / "o.embq"
    with pytest.raises(_Kill) as e:
        quantize_table(npy[0], "int4", out, chunk_rows=CHUNK, progress=False,
                       on_chunk=_kill_after(2)[0], checkpoint_seconds=checkpoint_seconds)  # fmt: skip
    notes = getattr(e.value, "__notes__", [])
    if checkpoint_seconds:
        assert not staging_path(out).exists() and not notes
    else:
        assert staging_path(out).exists() and "128 of 1,000 rows are saved" in notes[0]


def test_failure_keeps_a_staging_directory_it_did_not_create(tmp_path):
    out = tmp_path / "o.embq"
    staging_path(out).mkdir()  # e.g. left by a run killed before its first checkpoint
    with pytest.raises(FormatError, match="row 0"):
        quantize_table(_bad_table(tmp_path, 0), "int4", out, progress=False)
    assert staging_path(out).is_dir()


def test_bad_dim_and_format(tmp_path):
    np.save(tmp_path / "odd.npy", np.ones((10, 3), np.float32))
    with pytest.raises(FormatError):
        quantize_table(tmp_path / "odd.npy", "int4", tmp_path / "o.embq", progress=False)
    with pytest.raises(EmbqError):
        quantize_table(tmp_path / "odd.npy", "no-such-format", tmp_path / "o.embq", progress=False)


def test_source_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_table(tmp_path / "missing.npy")
    (tmp_path / "t.csv").write_text("1,2\n")
    with pytest.raises(DataError, match="unknown extension"):
        open_table(tmp_path / "t.csv")
    np.save(tmp_path / "v.npy", np.zeros(8, np.float32))
    with pytest.raises(DataError, match="2-D"):
        open_table(tmp_path / "v.npy")
    np.save(tmp_path / "i.npy", np.zeros((4, 4), np.int64))
    with pytest.raises(DataError, match="int64"):
        open_table(tmp_path / "i.npy")
    save_numpy({"a": np.zeros((2, 2), np.float32), "b": np.zeros((2, 2), np.int32)},
               str(tmp_path / "m.safetensors"))  # fmt: skip
    with pytest.raises(DataError, match="--tensor"):
        open_table(tmp_path / "m.safetensors")
    with pytest.raises(DataError, match="no tensor 'c'"):
        open_table(tmp_path / "m.safetensors", "c")
    with pytest.raises(DataError, match="I32"):
        open_table(tmp_path / "m.safetensors", "b")
    torch.save({"x": torch.zeros(2, 3, 4)}, tmp_path / "x.pt")
    with pytest.raises(DataError, match="2-D"):
        open_table(tmp_path / "x.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="torch.load"):
        open_table(tmp_path / "bad.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x01")
    with pytest.raises(DataError):
        open_table(tmp_path / "bad.safetensors")


# --------------------------------------------------------------------------- CLI and torchrun


def test_cli(tmp_path, npy, capsys):
    out = tmp_path / "o.embq"
    argv = ["quantize-table", "--input", str(npy[0]), "--format", "int4", "--output", str(out), "--chunk-rows", "100",
            "--feature-name", "cat_0", "--quiet"]  # fmt: skip
    assert embq_main(argv) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["rows"] == ROWS and line["format"] == "int4"
    assert load_artifact(out).tables["emb"].feature_names == ["cat_0"]
    assert embq_main(argv) == 2  # exists
    assert "already exists" in capsys.readouterr().err


def test_row_ranges_tile_the_table():
    for rows in (1, 7, 1000):
        for world in (1, 2, 3, 8):
            ranges = [row_range(rows, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_torchrun_two_ranks(tmp_path, npy):
    """torchrun --nproc_per_node 2: each rank writes its rows; the artifact equals one process's."""
    path, table = npy
    out = tmp_path / "d.embq"
    env = {**_env(), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "embq", "quantize-table", "--distributed", "--input", str(path),
           "--format", "int4", "--output", str(out), "--chunk-rows", "100", "--quiet"]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stdout.strip().splitlines()) == 1  # rank 0 alone prints the summary
    single = quantize_table(path, "int4", tmp_path / "s.embq", chunk_rows=CHUNK, progress=False)
    assert _files(out) == _files(single)


def test_concurrent_run_refused(tmp_path, npy):
    from embq.embedding.stream import DirectoryLock

    out = tmp_path / "o.embq"
    staging_path(out).mkdir()
    lock = DirectoryLock(staging_path(out))
    try:
        with pytest.raises(EmbqError, match="another process"):
            quantize_table(npy[0], "int4", out, progress=False)
    finally:
        lock.release()
    quantize_table(npy[0], "int4", out, progress=False)


def test_kill_between_manifest_and_rename(tmp_path, npy, monkeypatch):
    """The finished staging directory of a run killed just before its rename is published."""
    import embq.artifact.writer

    out = tmp_path / "o.embq"

    def killed(staging, path):
        raise _Kill

    monkeypatch.setattr(embq.artifact.writer, "publish_directory", killed)
    with pytest.raises(_Kill):
        quantize_table(npy[0], "int4", out, progress=False)
    monkeypatch.undo()
    assert (staging_path(out) / "manifest.json").exists() and not out.exists()
    assert quantize_table(npy[0], "int4", out, progress=False) == out
    np.testing.assert_array_equal(_rows(out), get_format("int4").encode(npy[1], {}))
