"""Benchmark: serving large tables, fp32 (TorchRec) against embq's formats and TorchRec's own int4,
plus an HTTP load test.

    python scripts/bench_serving.py --quick      # 26 x 200,000 x 64: a few minutes
    python scripts/bench_serving.py              # 26 x 1,000,000 x 64 (6.7 GB fp32; ~12 GB RAM)

1. Build (in a subprocess, cached in --workdir): 26 tables with trained-like values (rows
   ~N(0, s^2), per-row scale s log-normal around 0.05), the demo's MLP shapes at dim 64, and
   one artifact per format, written by embq (`embq.embedding.encode.encode_tables` +
   `embq.artifact.writer.write_model_artifact`, what `embq quantize` runs).
2. Measure, in this one process, every model through the SAME input path, the one a TorchRec
   user has: a dense float32 tensor and a KeyedJaggedTensor of the ids (built once per batch).
   - "fp32-torchrec": TorchRec's float `EmbeddingBagCollection` inside TorchRec's DLRM (what a
     user serves without embq); lookups = `ebc(kjt)`.
   - "torchrec-int4": TorchRec's quant `EmbeddingBagCollection` (fbgemm's TBE at TorchRec's
     defaults, what `quantize_inference_model` deploys) holding the int4 artifact's bytes
     (`embq.runtime.quant_ebc.build_torchrec_qebc`) swapped into the same DLRM: what a user would
     otherwise deploy at 4 bits.
   - each artifact, loaded by the serving Predictor with the default kernel choice ("auto":
     fbgemm's TBE for every row-wise format, rows of at most 64 bytes padded to a power of two so
     that none straddles a cache line; "codebook-bag" for PQ / codebooks; the "fp32" artifact is
     the same fp32 tables in the TBE), called as `model(dense, kjt)` with embq's input
     validation on (every id checked against its table); lookups = the same validation, then
     the pooled lookups (`model.sparse_inputs(kjt, B)` then `model.core.embeddings`);
   - "int4/compact": the int4 artifact with kernel="compact" (ATen's n-bit op on the
     memory-mapped rows, the least memory) and "int4/tbe" with kernel="tbe" (the TBE at fbgemm's
     default 16-byte row alignment); --no-kernel-rows drops them;
   - "int4 Predictor.predict": the Predictor's own call at batch 512 (its input checks too).
   Predictions per second and p50 / p99 latency at batch 1, 64 and 512, for the lookups alone
   and the whole prediction, and the resident memory each model adds (RSS delta after loading it
   and one warm-up pass). Models are loaded one after the other, then timed in interleaved
   rounds (rotating who goes first), so that load from other processes on a shared machine falls
   on all of them alike. Rows/s is the MEDIAN over the rounds of each round's rate; a "vs" ratio
   is the median over the rounds of the ratio within the round (paired: both measured within the
   same few seconds); p50 / p99 pool every call. Threads: --threads torch threads for everyone
   (default 1), wall-clock time.
3. HTTP: `embq-serve` on the int4 artifact in a subprocess on a free loopback port, several
   client threads (httpx, keep-alive) sending a bounded number of requests for a bounded time,
   then SIGTERM; reports requests per second, p50 / p99 and errors (non-200 or failed calls).

Ids are uniform over each table by default (--ids zipf for a Zipf(1.05) popularity), 20 ids per
bag, so one row costs 26 x 20 row reads and the tables, far larger than the caches, make the
lookups memory-bound. Prints a table, then one JSON line (the last line).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "serving"))

N_DENSE, N_TABLES, DIM = 13, 26, 64
DENSE_ARCH, OVER_ARCH = [64, DIM], [64, 32, 1]  # the demo's MLPs (embq.train) at dim 64
BATCHES = (1, 64, 512)
DEFAULT_FORMATS = ["fp32", "int8", "int4", "int4-greedy", "int2", "pq8x8"]
SAMPLE_ROWS = 16_384  # rows per table that codebook (PQ) formats are fitted on
GEN_CHUNK = 1 << 17
FEATURES = [f"cat_{i}" for i in range(N_TABLES)]
PREDICT_ROW = "int4 Predictor.predict"  # timed besides the model: what the Predictor adds
TORCHREC_INT4 = "torchrec-int4"  # TorchRec's quant EBC on the int4 bytes: the 4-bit baseline


# --------------------------------------------------------------------------- build (subprocess)


def dlrm_config(rows: int):
    from embq.models.dlrm import DLRMConfig

    return DLRMConfig(dense_in_features=N_DENSE, sparse_feature_names=FEATURES,
                      num_embeddings=[rows] * N_TABLES, embedding_dim=DIM,
                      dense_arch=DENSE_ARCH, over_arch=OVER_ARCH)  # fmt: skip


def trained_like_table(rows: int, seed: int) -> np.ndarray:
    """float32 [rows, DIM]: rows ~N(0, s^2), s log-normal around 0.05 (trained tables have
    rows of very different norms, which is what row-wise quantization has to cope with)."""
    rng = np.random.default_rng(seed)
    out = np.empty((rows, DIM), dtype=np.float32)
    for start in range(0, rows, GEN_CHUNK):
        n = min(GEN_CHUNK, rows - start)
        scale = np.exp(rng.normal(np.log(0.05), 0.5, size=(n, 1))).astype(np.float32)
        out[start : start + n] = rng.standard_normal((n, DIM), dtype=np.float32) * scale
    return out


def build(workdir: Path, rows: int, formats: list[str]) -> None:
    """Write WORKDIR/<format>.embq for each format not built yet (tables regenerated by seed)."""
    import torch

    from embq.artifact.writer import write_model_artifact as write_artifact
    from embq.embedding.encode import encode_tables as quantize_tables
    from embq.models.dlrm import build_dlrm
    from embq.models.tables import TableInfo, dense_state_dict

    todo = [f for f in formats if not (workdir / f"{f}.embq").exists()]
    if not todo:
        return
    config = dlrm_config(rows)
    # The dense towers do not depend on the table sizes: take them from a one-row-table DLRM.
    towers = build_dlrm(dlrm_config(1), seed=0)
    dense = dense_state_dict(towers)
    t0 = time.perf_counter()
    tables = [trained_like_table(rows, seed=i) for i in range(N_TABLES)]
    infos = [TableInfo(name=f"t_{f}", rows=rows, dim=DIM, feature_names=[f], pooling="SUM",
                       weight=torch.from_numpy(t)) for f, t in zip(FEATURES, tables)]  # fmt: skip
    print(f"  tables generated in {time.perf_counter() - t0:.1f}s", flush=True)
    for fmt in todo:
        t0 = time.perf_counter()
        quantized = quantize_tables(infos, fmt, sample_rows=SAMPLE_ROWS, seed=0)
        write_artifact(workdir / f"{fmt}.embq", quantized, config, dense)
        del quantized
        print(f"  {fmt}: artifact written in {time.perf_counter() - t0:.1f}s", flush=True)


# --------------------------------------------------------------------------- inputs


def draw_ids(rng: np.random.Generator, rows: int, n: int, kind: str) -> np.ndarray:
    """n ids in [0, rows): uniform, or Zipf(1.05) over popularity ranks scattered over the table
    by a multiplicative hash (hot rows are not neighbours)."""
    if kind == "uniform":
        return rng.integers(0, rows, size=n, dtype=np.int64)
    ranks = np.arange(1, rows + 1, dtype=np.float64)
    cdf = np.cumsum(ranks**-1.05)
    rank = np.searchsorted(cdf, rng.random(n) * cdf[-1])
    return (rank * 2_654_435_761 + 12_345) % rows


class Batch:
    """One batch of B rows, in the layouts each model takes.

    dense float32 [B, 13]; values int64 [26 * B * pooling] key-major (feature 0's bags, then
    feature 1's, ...); offsets int64 [26 * B + 1]; kjt the same ids as a KeyedJaggedTensor.
    """

    def __init__(
        self, rng: np.random.Generator, rows: int, batch: int, pooling: int, ids: str
    ) -> None:
        import torch
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        self.size = batch
        self.dense = torch.from_numpy(rng.standard_normal((batch, N_DENSE), dtype=np.float32))
        self.values = torch.from_numpy(np.concatenate([draw_ids(rng, rows, batch * pooling, ids)
                                                       for _ in FEATURES]))  # fmt: skip
        lengths = torch.full((N_TABLES * batch,), pooling, dtype=torch.int64)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
        self.kjt = KeyedJaggedTensor(keys=FEATURES, values=self.values, lengths=lengths)
        # KJTs compute offsets and per-key lengths lazily and cache them: do it now, so that no
        # model pays for it inside a timing
        self.kjt.offsets(), self.kjt.length_per_key(), self.kjt.offset_per_key()


# --------------------------------------------------------------------------- measuring


MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25  # <sys/mman.h>; MADV_COLLAPSE: Linux 6.1
HUGE_PAGE = 2 << 20


def table_tensors(module: Any) -> list:
    """The tensors holding a model's embedding rows in anonymous memory: TorchRec / torch
    EmbeddingBag weights and fbgemm TBE weights, TorchRec's quant EBC's included (memory-mapped
    artifact rows are file pages and are left out)."""
    import torch

    out = []
    for m in module.modules():
        # TorchRec's quant EBC keeps its TBEs in a plain list, not as submodules
        for sub in (m, *getattr(m, "_emb_modules", [])):
            if isinstance(sub, torch.nn.EmbeddingBag):
                out.append(sub.weight)
            elif type(sub).__name__ == "IntNBitTableBatchedEmbeddingBagsCodegen":
                out.append(sub.weights_host)
    return out


def advise_huge_pages(tensors: list) -> int:
    """Back the tensors' memory with 2 MiB pages now (madvise MADV_HUGEPAGE, then MADV_COLLAPSE)
    and return the bytes advised; 0 where the kernel refuses (older than 6.1, THP off)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    done = 0
    for t in tensors:
        start = t.data_ptr()
        first = -(-start // HUGE_PAGE) * HUGE_PAGE  # the whole huge pages inside the tensor
        last = (start + t.numel() * t.element_size()) // HUGE_PAGE * HUGE_PAGE
        if last > first and libc.madvise(first, last - first, MADV_HUGEPAGE) == 0:
            if libc.madvise(first, last - first, MADV_COLLAPSE) == 0:
                done += last - first
    return done


def rss_bytes() -> int:
    """Resident set size of this process (bytes), from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so RSS deltas measure one model."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: deltas may include freed-but-kept heap
        pass


def time_calls(fn: Callable[[Any], Any], batches: list[Batch], seconds: float, min_calls: int,
               max_calls: int) -> np.ndarray:  # fmt: skip
    """Latencies (seconds) of fn(batch) over the batches in turn, after one warm-up call."""
    import torch

    with torch.inference_mode():
        fn(batches[0])
        out = []
        start = time.perf_counter()
        while len(out) < max_calls and (
            len(out) < min_calls or time.perf_counter() - start < seconds
        ):
            b = batches[len(out) % len(batches)]
            t = time.perf_counter()
            fn(b)
            out.append(time.perf_counter() - t)
    return np.asarray(out)


def summarise(rounds: list[np.ndarray], batch: int) -> dict[str, Any]:
    """Rows/s: each round's rate and their median; p50 / p99 over every call of every round."""
    rates = [batch * len(lat) / float(lat.sum()) for lat in rounds]
    lat = np.concatenate(rounds)
    return {"rows_per_s": float(np.median(rates)), "round_rows_per_s": rates,
            "p50_ms": float(np.percentile(lat, 50) * 1e3), "p99_ms": float(np.percentile(lat, 99) * 1e3)}  # fmt: skip


def paired_ratio(ours: dict[str, Any], base: dict[str, Any]) -> float:
    """Median over the rounds of ours' rate / base's rate within the same round."""
    return float(np.median(np.asarray(ours["round_rows_per_s"]) / np.asarray(base["round_rows_per_s"])))


def fp32_torchrec_model(fp32_artifact: Path, rows: int):
    """TorchRec's DLRM with float EmbeddingBagCollection tables, filled from the fp32 artifact
    (same values and dense towers as every other artifact)."""
    import torch

    from embq.artifact.reader import load_artifact
    from embq.models.dlrm import build_dlrm

    artifact = load_artifact(fp32_artifact, verify=False)
    model = build_dlrm(dlrm_config(rows), seed=0)
    with torch.no_grad():
        for name, bag in model.sparse_arch.embedding_bag_collection.embedding_bags.items():
            bag.weight.copy_(torch.from_numpy(artifact.table(name).decode()))
    missing, unexpected = model.load_state_dict(artifact.dense(), strict=False)
    if unexpected or not all(k.startswith("sparse_arch.") for k in missing):
        raise RuntimeError(f"dense tensors do not fit TorchRec's DLRM: {unexpected} {missing}")
    return model.eval()


class Served:
    """One model under test: its lookup-only and whole-prediction callables on a `Batch`."""

    def __init__(
        self, name: str, kernel: str, lookup: Callable, predict: Callable, table_bytes: int
    ) -> None:
        self.name, self.kernel, self.table_bytes = name, kernel, table_bytes
        self.lookup, self.predict = lookup, predict
        self.rss_mb = 0.0
        self.latencies: dict[tuple[str, int], list[np.ndarray]] = {}  # one array per round


def load_models(
    args: argparse.Namespace, workdir: Path, warmup: list[Batch]
) -> tuple[list[Served], dict]:
    """Load the fp32 TorchRec model and every artifact, one after the other, recording the RSS
    each adds (after loading and one warm-up pass over `warmup`). Returns (models, checks:
    each format's largest |probability - fp32| on the first warm-up batch)."""
    import torch

    from embq_serving.predictor import Predictor

    models: list[Served] = []

    def add(served: Served, before: int, module: Any) -> None:
        if args.huge_pages:
            advised = advise_huge_pages(table_tensors(module))
            print(f"  {served.name}: {advised / 2**20:,.0f} MiB of tables on huge pages", flush=True)
        with torch.inference_mode():
            for b in warmup:
                served.lookup(b)
                served.predict(b)
        served.rss_mb = (rss_bytes() - before) / 2**20
        models.append(served)
        print(f"  loaded {served.name}: +{served.rss_mb:,.0f} MiB resident", flush=True)

    release_memory()
    before = rss_bytes()
    model = fp32_torchrec_model(workdir / "fp32.embq", args.rows)
    ebc = model.sparse_arch.embedding_bag_collection
    add(Served("fp32-torchrec", "torchrec-ebc", lambda b: ebc(b.kjt).values(),
               lambda b: torch.sigmoid(model(b.dense, b.kjt)), args.rows * DIM * 4 * N_TABLES), before, model)  # fmt: skip
    probe = warmup[0]
    with torch.inference_mode():
        reference = torch.sigmoid(model(probe.dense, probe.kjt)).reshape(-1).numpy()
    checks: dict[str, Any] = {}

    def served_model(name: str, m: Any, table_bytes: int, before: int) -> None:
        """An embq inference model called as a user calls it: (dense, kjt), ids checked."""
        kernel = "+".join(sorted({t["kernel"] for t in m.metadata["tables"]}))
        add(Served(name, kernel, lambda b: m.core.embeddings(*m.sparse_inputs(b.kjt, b.size)),
                   lambda b: torch.sigmoid(m(b.dense, b.kjt)), table_bytes), before, m.core)  # fmt: skip
        with torch.inference_mode():
            checks[name] = float(np.abs(torch.sigmoid(m(probe.dense, probe.kjt)).numpy() - reference).max())

    if "int4" in args.formats:
        # TorchRec's own 4-bit deployment: its quant EBC (fbgemm TBE, TorchRec's defaults) on the
        # same int4 bytes, in a copy of the same DLRM (the float tables are not copied)
        from embq.artifact.reader import load_artifact
        from embq.runtime.bags import artifact_tables
        from embq.runtime.quant_ebc import build_torchrec_qebc

        release_memory()
        before = rss_bytes()
        qebc = build_torchrec_qebc(artifact_tables(load_artifact(workdir / "int4.embq", verify=False))).eval()
        qmodel = copy.deepcopy(model, memo={id(ebc): ebc})
        qmodel.sparse_arch.embedding_bag_collection = qebc
        qmodel.eval()
        add(Served(TORCHREC_INT4, "torchrec-quant-ebc", lambda b: qebc(b.kjt).values(),
                   lambda b: torch.sigmoid(qmodel(b.dense, b.kjt)), int(sum(
                       w.numel() * w.element_size() for w in table_tensors(qebc)))), before, qebc)  # fmt: skip
        with torch.inference_mode():
            got = torch.sigmoid(qmodel(probe.dense, probe.kjt)).reshape(-1).numpy()
        checks[TORCHREC_INT4] = float(np.abs(got - reference).max())
    for fmt in args.formats:
        release_memory()
        before = rss_bytes()
        predictor = Predictor(workdir / f"{fmt}.embq")
        served_model(fmt, predictor.model, predictor.metadata()["table_bytes"], before)
        # the serving path, the Predictor's own checks included, agrees with fp32 too
        checks[f"{fmt} Predictor.predict"] = float(np.abs(predictor.predict(probe.dense, probe.kjt) - reference).max())
        if fmt == "int4":  # what the Predictor's call adds at b512
            models.append(Served(PREDICT_ROW, models[-1].kernel, lambda b, p=predictor: p.predict(b.dense, b.kjt),
                                 lambda b, p=predictor: p.predict(b.dense, b.kjt), models[-1].table_bytes))  # fmt: skip
    if "int4" in args.formats and args.kernel_rows:
        # the same int4 bytes on the other kernel choices: what the default is compared with
        from embq.runtime.load import load_inference_model

        for choice in ("compact", "tbe"):
            release_memory()
            before = rss_bytes()
            variant = load_inference_model(workdir / "int4.embq", verify=False, kernel=choice)
            served_model(f"int4/{choice}", variant, variant.metadata["table_bytes"], before)
    return models, checks


def time_interleaved(
    models: list[Served], inputs: dict[int, list[Batch]], args: argparse.Namespace
) -> None:
    """Latencies of every model, stage and batch size, taken in rounds that visit the models in
    turn (rotating who goes first), so load from other processes on a shared machine falls on
    all of them alike rather than on whoever ran during a busy second."""
    rounds = args.rounds
    for batch, batches in inputs.items():
        for r in range(rounds):
            for k in range(len(models)):
                served = models[(k + r) % len(models)]
                extra = (
                    served.name == PREDICT_ROW
                )  # the Predictor's own call: b512, whole model only
                if extra and batch != 512:
                    continue
                for stage in ("model",) if extra else ("lookup", "model"):
                    fn = served.lookup if stage == "lookup" else served.predict
                    lat = time_calls(
                        fn, batches, seconds=args.seconds / rounds, min_calls=4, max_calls=5_000
                    )
                    served.latencies.setdefault((stage, batch), []).append(lat)
        print(f"  timed batch {batch}", flush=True)


def results_of(models: list[Served]) -> list[dict[str, Any]]:
    out = []
    for m in models:
        batches = {}
        for (stage, batch), lat in sorted(m.latencies.items(), key=lambda kv: kv[0][1]):
            batches.setdefault(batch, {})[stage] = summarise(lat, batch)
        out.append({"format": m.name, "kernel": m.kernel, "table_bytes": m.table_bytes,
                    "rss_mb": m.rss_mb, "batches": batches})  # fmt: skip
    return out


def run_models(args: argparse.Namespace, workdir: Path) -> tuple[list[dict], dict[str, Any]]:
    """Load every model, then time them all, interleaved, in this one process."""
    import torch

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(123)
    inputs = {b: [Batch(rng, args.rows, b, args.pooling, args.ids) for _ in range(args.distinct_batches)]
              for b in BATCHES}  # fmt: skip
    models, checks = load_models(args, workdir, inputs[64][:2])
    time_interleaved(models, inputs, args)
    return results_of(models), checks


# --------------------------------------------------------------------------- HTTP load test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_bodies(rows: int, batch: int, pooling: int, ids: str, n: int = 16) -> list[bytes]:
    """n distinct JSON /predict bodies of `batch` rows each."""
    rng = np.random.default_rng(7)
    bodies = []
    for _ in range(n):
        out = []
        for _ in range(batch):
            out.append({"dense": rng.standard_normal(N_DENSE).round(5).tolist(),
                        "sparse": {f: draw_ids(rng, rows, pooling, ids).tolist() for f in FEATURES}})  # fmt: skip
        bodies.append(json.dumps({"rows": out}).encode())
    return bodies


def http_load_test(artifact: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Start embq-serve on 127.0.0.1, hit /predict from several threads, stop it with SIGTERM."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "embq_serving.http", str(artifact), "--host", "127.0.0.1",
         "--port", str(port), "--threads", "1", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "serving")])},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"embq-serve did not start: {server.communicate(timeout=5)[1][-2000:]}"
                )
            try:
                if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        bodies = http_bodies(args.rows, args.http_batch, args.pooling, args.ids)
        lock = threading.Lock()
        issued = [0]
        latencies: list[float] = []
        errors: list[str] = []
        stop_at = time.monotonic() + args.http_seconds

        def client() -> None:
            with httpx.Client(base_url=url, timeout=30.0) as c:
                while True:
                    with lock:
                        if issued[0] >= args.http_requests or time.monotonic() > stop_at:
                            return
                        i = issued[0]
                        issued[0] += 1
                    t = time.perf_counter()
                    try:
                        r = c.post("/predict", content=bodies[i % len(bodies)],
                                   headers={"content-type": "application/json"})  # fmt: skip
                        ok = (
                            r.status_code == 200
                            and len(r.json()["probabilities"]) == args.http_batch
                        )
                        problem = None if ok else f"HTTP {r.status_code}: {r.text[:200]}"
                    except (httpx.HTTPError, ValueError, KeyError) as e:
                        problem = f"{type(e).__name__}: {e}"
                    with lock:
                        latencies.append(time.perf_counter() - t)
                        if problem:
                            errors.append(problem)

        threads = [threading.Thread(target=client) for _ in range(args.http_clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        try:
            _, err = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            _, err = server.communicate()
    lat = np.asarray(latencies)
    return {"requests": len(lat), "errors": len(errors), "first_errors": errors[:3],
            "rows_per_request": args.http_batch, "clients": args.http_clients,
            "requests_per_s": len(lat) / wall, "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3), "server_exit_code": server.returncode,
            "server_stderr_tail": err[-500:] if server.returncode else ""}  # fmt: skip


# --------------------------------------------------------------------------- report


def print_table(results: list[dict], http: dict, args: argparse.Namespace) -> None:
    fp32 = results[0]
    print(f"\nembq serving benchmark: {N_TABLES} tables x {args.rows:,} rows x {DIM} dims "
          f"(fp32 {fp32['table_bytes'] / 2**20:,.0f} MiB), MLPs dense {DENSE_ARCH} over {OVER_ARCH}, "
          f"{N_DENSE} dense inputs")  # fmt: skip
    print(
        f"ids {args.ids} over each table, {args.pooling} ids per bag ({N_TABLES * args.pooling} "
        f"lookups per row), huge pages {'on' if args.huge_pages else 'off'}, torch threads {args.threads} (OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}), {args.seconds:g}s per measurement in "
        f"{args.rounds} interleaved rounds; every model takes (dense, KeyedJaggedTensor), embq's "
        "with its id validation on; rows/s = median over the rounds, 'vs fp32' = median of the "
        "per-round ratios to fp32-torchrec; model = lookups + MLPs + interaction + sigmoid; "
        "p50/p99 are of the whole model, wall clock; RSS after loading and one warm-up\n"
    )
    head = (f"{'format':<19}{'kernel':<19}{'table MiB':>10}{'vs fp32':>8}{'RSS MiB':>9}{'batch':>7}"
            f"{'lookup rows/s':>15}{'vs fp32':>8}{'model rows/s':>14}{'vs fp32':>8}{'p50 ms':>9}{'p99 ms':>9}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in results:
        for k, (batch, m) in enumerate(r["batches"].items()):
            base = fp32["batches"][batch]
            first = k == 0
            print(f"{r['format'] if first else '':<19}{r['kernel'] if first else '':<19}"
                  + (f"{r['table_bytes'] / 2**20:>10,.1f}{r['table_bytes'] / fp32['table_bytes']:>8.3f}"
                     f"{r['rss_mb']:>9,.0f}" if first else " " * 27)
                  + f"{batch:>7}{m['lookup']['rows_per_s']:>15,.0f}"
                  f"{paired_ratio(m['lookup'], base['lookup']):>8.2f}"
                  f"{m['model']['rows_per_s']:>14,.0f}{paired_ratio(m['model'], base['model']):>8.2f}"
                  f"{m['model']['p50_ms']:>9.3f}{m['model']['p99_ms']:>9.3f}")  # fmt: skip
    if http is None:
        print("\nHTTP load test skipped (--no-http)")
        return
    print(f"\nHTTP (embq-serve, int4, loopback): {http['requests']} requests of {http['rows_per_request']} "
          f"rows from {http['clients']} clients: {http['requests_per_s']:.0f} req/s, p50 "
          f"{http['p50_ms']:.1f} ms, p99 {http['p99_ms']:.1f} ms, errors {http['errors']}, "
          f"server exit code {http['server_exit_code']}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="26 x 200,000 rows, shorter timings")
    parser.add_argument(
        "--rows", type=int, help="rows per table (default 1,000,000; 200,000 with --quick)"
    )
    parser.add_argument(
        "--formats",
        help=f"artifact formats to serve (default {','.join(DEFAULT_FORMATS)}, without fp32 unless "
        "--quick: its TBE copy would double the memory). The fp32 artifact is always built: it "
        "feeds the TorchRec model",
    )
    parser.add_argument("--pooling", type=int, default=20, help="ids per bag")
    parser.add_argument("--ids", choices=["uniform", "zipf"], default="uniform")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: two noisy vCPUs make 2-thread timings erratic)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        help="time per model, stage and batch size, over all rounds (default 2; 1 with --quick)",
    )
    parser.add_argument(
        "--distinct-batches", type=int, default=8, help="batches cycled per measurement"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per batch size")
    parser.add_argument(
        "--http-requests", type=int, help="requests in the load test (default 3000; 1500 --quick)"
    )
    parser.add_argument(
        "--http-seconds", type=float, default=120.0, help="time cap of the load test"
    )
    parser.add_argument("--http-clients", type=int, default=4)
    parser.add_argument("--http-batch", type=int, default=8, help="rows per HTTP request")
    parser.add_argument(
        "--workdir",
        default=str(REPO / "runs" / "bench_serving"),
        help="artifacts are built here once per table size and reused",
    )
    parser.add_argument(
        "--no-kernel-rows",
        dest="kernel_rows",
        action="store_false",
        help="skip the int4/compact and int4/tbe rows (the int4 artifact on the runtime's other "
        "kernel choices: ATen's n-bit op on the memory-mapped rows, fbgemm's TBE at its default "
        "16-byte row alignment)",
    )
    parser.add_argument(
        "--huge-pages",
        action="store_true",
        help="back every model's table memory (TorchRec's and the TBE's; not memory-mapped rows) "
        "with 2 MiB pages (madvise MADV_HUGEPAGE + MADV_COLLAPSE, Linux >= 6.1): what a host with "
        "transparent huge pages 'always' gives the float tables",
    )
    parser.add_argument("--no-http", dest="http", action="store_false",
                        help="skip the HTTP load test")  # fmt: skip
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.rows = args.rows or (200_000 if args.quick else 1_000_000)
    args.seconds = args.seconds or (1.0 if args.quick else 2.0)
    args.http_requests = args.http_requests or (1500 if args.quick else 3000)
    default = DEFAULT_FORMATS if args.quick else [f for f in DEFAULT_FORMATS if f != "fp32"]
    args.formats = [f for f in (args.formats or ",".join(default)).split(",") if f]
    if "int4" not in args.formats:
        args.formats.insert(0, "int4")  # the headline ratios and the HTTP test use it
    workdir = Path(args.workdir) / f"{N_TABLES}x{args.rows}x{DIM}"
    workdir.mkdir(parents=True, exist_ok=True)
    formats_to_build = sorted({"fp32", *args.formats})

    if args.build_only:
        build(workdir, args.rows, formats_to_build)
        return
    started = time.perf_counter()
    print(f"[1/3] building artifacts in {workdir} (cached between runs)", flush=True)
    # A separate process: its float tables and encoders must not inflate this one's RSS.
    subprocess.run([sys.executable, __file__, "--build-only", "--rows", str(args.rows),
                    "--formats", ",".join(formats_to_build), "--workdir", args.workdir], check=True)  # fmt: skip
    print("[2/3] timing lookups and predictions in this process", flush=True)
    results, checks = run_models(args, workdir)
    print("[3/3] HTTP load test" if args.http else "[3/3] HTTP load test skipped", flush=True)
    http = http_load_test(workdir / "int4.embq", args) if args.http else None
    by = {r["format"]: r for r in results}
    predict_call = by.pop(PREDICT_ROW)["batches"][512]["model"]
    results = [r for r in results if r["format"] != PREDICT_ROW]
    print_table(results, http, args)
    base, int4 = by["fp32-torchrec"], by["int4"]

    def ratio(name: str, key: str, against: str = "fp32-torchrec", batch: int = 512) -> float:
        """A model's lookup ("lookup") or whole-model ("model") throughput over another's (the
        median of per-round ratios), or its resident memory over fp32's ("rss")."""
        if key == "rss":
            return by[name]["rss_mb"] / base["rss_mb"]
        return paired_ratio(by[name]["batches"][batch][key], by[against]["batches"][batch][key])

    print(
        f"Predictor.predict (int4, input checks included) at batch 512: "
        f"{predict_call['rows_per_s']:,.0f} rows/s, p99 {predict_call['p99_ms']:.2f} ms "
        f"(the model called with (dense, kjt), validation on: "
        f"{int4['batches'][512]['model']['rows_per_s']:,.0f} rows/s)"
    )
    if TORCHREC_INT4 in by:
        print(f"int4 (embq, validation on) vs TorchRec's quant EBC on the same bytes at batch 512: "
              f"lookups {ratio('int4', 'lookup', TORCHREC_INT4):.2f}x, whole model "
              f"{ratio('int4', 'model', TORCHREC_INT4):.2f}x")  # fmt: skip
    summary = {
        "rows_per_table": args.rows, "tables": N_TABLES, "dim": DIM, "pooling": args.pooling,
        "ids": args.ids, "threads": args.threads, "huge_pages": args.huge_pages,
        "input_path": "dense tensor + KeyedJaggedTensor for every model; embq validates ids",
        "timing": f"median over {args.rounds} interleaved rounds (ratios: median of per-round "
                  "ratios), wall clock",
        "int4_vs_fp32_lookup_throughput_b512": round(ratio("int4", "lookup"), 3),
        "int4_vs_fp32_model_throughput_b512": round(ratio("int4", "model"), 3),
        **({"int4_vs_torchrec_int4_lookup_b512": round(ratio("int4", "lookup", TORCHREC_INT4), 3),
            "int4_vs_torchrec_int4_model_b512": round(ratio("int4", "model", TORCHREC_INT4), 3),
            "torchrec_int4_vs_fp32_lookup_b512": round(ratio(TORCHREC_INT4, "lookup"), 3),
            "torchrec_int4_vs_fp32_model_b512": round(ratio(TORCHREC_INT4, "model"), 3),
            "torchrec_int4_vs_fp32_rss": round(ratio(TORCHREC_INT4, "rss"), 4)}
           if TORCHREC_INT4 in by else {}),
        "int4_kernel": int4["kernel"],
        **{f"int4_{choice}_vs_fp32_{what}": round(ratio(f"int4/{choice}", key), 3)
           for choice in ("compact", "tbe") if f"int4/{choice}" in by
           for what, key in (("lookup_throughput_b512", "lookup"), ("rss", "rss"))},
        # ms per batch of 512 at the median rates: lookups, whole model, and the rest (MLPs,
        # interaction, sigmoid, input handling) = model - lookup
        "b512_ms_per_batch": {name: {
            "lookup": round(512e3 / by[name]["batches"][512]["lookup"]["rows_per_s"], 3),
            "model": round(512e3 / by[name]["batches"][512]["model"]["rows_per_s"], 3),
            "rest": round(512e3 / by[name]["batches"][512]["model"]["rows_per_s"]
                          - 512e3 / by[name]["batches"][512]["lookup"]["rows_per_s"], 3),
        } for name in ("fp32-torchrec", TORCHREC_INT4, "int4", "int4/compact", "int4/tbe") if name in by},
        "int4_vs_fp32_table_bytes": round(int4["table_bytes"] / base["table_bytes"], 4),
        "int4_vs_fp32_rss": round(int4["rss_mb"] / base["rss_mb"], 4),
        **({"http_requests": http["requests"], "http_errors": http["errors"],
            "http_p99_ms": round(http["p99_ms"], 2), "http_requests_per_s": round(http["requests_per_s"], 1),
            "http_server_exit_code": http["server_exit_code"]} if http else {"http": None}),
        "int4_predictor_b512_rows_per_s": round(predict_call["rows_per_s"]),
        "max_abs_prob_diff_vs_fp32": {k: round(v, 6) for k, v in checks.items()},
        "formats": {r["format"]: {
            "kernel": r["kernel"], "table_bytes": r["table_bytes"], "rss_mib": round(r["rss_mb"], 1),
            **{f"{stage}_rows_per_s_b{b}": round(r["batches"][b][stage]["rows_per_s"])
               for b in BATCHES for stage in ("lookup", "model")},
            **{f"{stage}_vs_fp32_b{b}": round(paired_ratio(r["batches"][b][stage], base["batches"][b][stage]), 3)
               for b in BATCHES for stage in ("lookup", "model")},
            **{f"p99_ms_b{b}": round(r["batches"][b]["model"]["p99_ms"], 3) for b in BATCHES},
        } for r in results},
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
