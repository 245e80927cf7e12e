#!/usr/bin/env python
"""Models larger than one machine: a sharded DCP checkpoint in, torchrun ranks, one artifact out.

Steps (outputs under --workdir, default runs/bench_scale; removed at the end unless --keep):

1. Checkpoints, written from gloo rank processes with torch.distributed.checkpoint:
   - ``dmp``: the DLRM wrapped in TorchRec's DistributedModelParallel (TABLE_WISE, 2 ranks, CPU),
     `dcp.save(dmp.state_dict())` (--quick: this is the big checkpoint, >= 2**30 bytes of fp32
     tables; full run: a small one, see below);
   - ``rowwise`` (full run only): tables row-sharded as ShardedTensors built directly, each rank
     making only its own rows (DMP would first build the whole model on every rank, which does
     not fit twice in this machine's RAM at >= 8 GiB). TorchRec offers ROW_WISE only on CUDA.
2. ``torchrun --nproc-per-node 2`` runs `embq quantize --checkpoint ... --config ... --plan ...`
   (through this script's --worker mode, which calls the same CLI and then records the rank's
   peak RSS, `ru_maxrss`, imports included, and wall time).
3. The same command on one process: `identical_to_single_process` compares every table file's
   bytes (and the whole manifest).
4. `outputs_match`: embq_serving's Predictor on the artifact (kernels "compact" and "tbe") vs a
   float64 reference: the looked-up rows decoded from the artifact, pooled, and the checkpoint's
   towers run in float64 (a DLRM whose tables hold just the rows the batch uses).

Prints a table, then one JSON line. Timings on a shared 2-core machine are noisy.

    python scripts/bench_scale.py --quick        # ~1.1 GB checkpoint written by DMP
    python scripts/bench_scale.py                # >= 8 GiB checkpoint, largest table 12M rows
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clean clone
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

DIM = 64
QUICK_ROWS = [1_500_000, 1_200_000, 900_000, 700_000]  # 4.3M x 64 x 4 B = 1.10e9 >= 2**30
FULL_ROWS = [12_000_000, 10_000_000, 8_000_000, 4_000_000]  # 34M x 256 B = 8.70e9 >= 8 GiB
SMALL_DMP_ROWS = [20_000, 15_000, 10_000, 5_000]
QUICK_PLAN = {"*": "int4", "t_c1": "int8", "t_c2": "cb4-shared"}  # a codebook on a 900k-row table
FULL_PLAN = {"*": "int4", "t_c1": "int8", "t_c3": "cb4-shared"}  # ... on the 4M-row one


def _config(rows: list[int]):
    from embq.models.dlrm import DLRMConfig

    return DLRMConfig(dense_in_features=13, sparse_feature_names=[f"c{i}" for i in range(len(rows))],
                      num_embeddings=list(rows), embedding_dim=DIM, dense_arch=[64, DIM],
                      over_arch=[64, 1])  # fmt: skip


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(argv: list[str]) -> int:
    """One rank (or the single process): the real CLI, then this process's peak RSS and time."""
    start = time.perf_counter()
    out = Path(argv[argv.index("--record") + 1])
    argv = argv[: argv.index("--record")]
    from embq.cli import main

    rc = main(argv)
    rank = os.environ.get("RANK", "0")
    Path(f"{out}.{rank}.json").write_text(json.dumps(
        {"rank": int(rank), "rc": rc, "seconds": time.perf_counter() - start,
         "peak_rss_mib": _rss_mib()}))  # fmt: skip
    return rc


def _run(cmd: list[str], what: str) -> float:
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{what} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return time.perf_counter() - start


def _quantize(ckpt: Path, config: Path, plan: str, out: Path, ranks: int,
              record: Path) -> tuple[float, list]:  # fmt: skip
    args = [str(Path(__file__).resolve()), "--worker", "quantize", "--checkpoint", str(ckpt),
            "--config", str(config), "--plan", plan, "--output", str(out), "--quiet",
            "--record", str(record)]  # fmt: skip
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(ranks), *args]  # fmt: skip
    else:
        cmd = [sys.executable, *args]
    seconds = _run(cmd, f"quantize on {ranks} rank(s)")
    recs = [json.loads(Path(f"{record}.{r}.json").read_text()) for r in range(ranks)]
    return seconds, recs


def _tables_identical(a: Path, b: Path) -> bool:
    from embq.artifact.reader import load_artifact

    ea, eb = load_artifact(a), load_artifact(b)
    if ea.table_names() != eb.table_names():
        return False
    same = all((a / ea.tables[n].file).read_bytes() == (b / eb.tables[n].file).read_bytes()
               for n in ea.table_names())  # fmt: skip
    return same and (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()


def _outputs_match(artifact: Path, ckpt: Path, config) -> tuple[bool, float]:
    """Predictor vs float64 dequantize-then-pool (tables cut down to the rows the batch uses)."""
    from dataclasses import replace

    import numpy as np
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from embq.artifact.reader import load_artifact
    from embq.checkpoint.metadata import read_index
    from embq.checkpoint.model import map_checkpoint, read_dense
    from embq.models.dlrm import build_dlrm
    from embq_serving.predictor import Predictor

    rng = np.random.default_rng(7)
    batch = 256
    dense = rng.normal(size=(batch, config.dense_in_features)).astype(np.float32)
    sparse = {f: [rng.integers(0, n, size=rng.integers(0, 5)).tolist() for _ in range(batch)]
              for f, n in zip(config.sparse_feature_names, config.num_embeddings)}  # fmt: skip
    art = load_artifact(artifact)
    state, remapped, used = {}, {}, []
    for f in config.sparse_feature_names:
        ids = sorted({i for row in sparse[f] for i in row}) or [0]
        where = {i: k for k, i in enumerate(ids)}
        table = art.table(config.table_name(f))
        rows = np.stack([table.decode(i, i + 1)[0] for i in ids]).astype(np.float64)
        state[f"sparse_arch.embedding_bag_collection.embedding_bags.{config.table_name(f)}.weight"] = (
            torch.from_numpy(rows))  # fmt: skip
        remapped[f] = [[where[i] for i in row] for row in sparse[f]]
        used.append(len(ids))
    index = read_index(ckpt)
    state.update(read_dense(index, map_checkpoint(index, config)))
    ref = build_dlrm(replace(config, num_embeddings=used)).double()
    ref.load_state_dict({k: v.double() for k, v in state.items()})
    names = config.sparse_feature_names
    lengths = torch.tensor([len(r) for f in names for r in remapped[f]])
    values = torch.tensor([i for f in names for r in remapped[f] for i in r], dtype=torch.int64)
    kjt = KeyedJaggedTensor.from_lengths_sync(names, values, lengths)
    with torch.no_grad():
        want = torch.sigmoid(ref(torch.from_numpy(dense).double(), kjt)).squeeze(-1).numpy()
    worst = 0.0
    for kernel in ("compact", "tbe"):
        got = Predictor(artifact, kernel=kernel).predict(dense, sparse)
        worst = max(worst, float(np.abs(got - want).max()))
    return worst <= 2e-5, worst


def _prepare_flag(workdir: Path):
    try:
        from embq.data.distributed_check import prepare_identical_across_ranks
    except ImportError:
        return None
    return bool(prepare_identical_across_ranks(workdir / "prepare"))


def main() -> None:
    if "--worker" in sys.argv:
        sys.exit(worker(sys.argv[sys.argv.index("--worker") + 1 :]))
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~1.1 GB checkpoint (else >= 8 GiB)")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bench_scale"))
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and artifacts")
    parser.add_argument("--plan", help="the plan (JSON or a format name); default: int4, one "
                        "int8 table and one cb4-shared table")
    args = parser.parse_args()
    from embq.checkpoint.metadata import read_index
    from tests.dcp_checkpoints import write_dmp_checkpoint, write_rowwise_checkpoint

    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    rows = QUICK_ROWS if args.quick else FULL_ROWS
    config = _config(rows)
    (work / "config.json").write_text(json.dumps(config.to_json()))
    t = time.perf_counter()
    dmp_config = config if args.quick else _config(SMALL_DMP_ROWS)
    kinds = write_dmp_checkpoint(dmp_config, work / "dmp", world=2, sharding="table_wise")
    dmp_seconds = time.perf_counter() - t
    dmp_ok = set(kinds.values()) == {"table_wise"} and (work / "dmp" / ".metadata").exists()
    if args.quick:
        ckpt, write_seconds = work / "dmp", dmp_seconds
    else:
        t = time.perf_counter()
        write_rowwise_checkpoint(config, work / "rowwise", {}, world=2)
        ckpt, write_seconds = work / "rowwise", time.perf_counter() - t
    index = read_index(ckpt)
    table_keys = [k for k in index.tensors if ".embedding_bags." in k]
    ckpt_bytes = sum(index.tensors[k].nbytes for k in table_keys)
    files = [p for p in ckpt.iterdir() if p.is_file()]

    plan = args.plan or json.dumps(QUICK_PLAN if args.quick else FULL_PLAN)
    cfg = work / "config.json"
    dist_s, ranks = _quantize(ckpt, cfg, plan, work / "dist.embq", 2, work / "rss-dist")
    one_s, single = _quantize(ckpt, cfg, plan, work / "one.embq", 1, work / "rss-one")
    identical = _tables_identical(work / "dist.embq", work / "one.embq")
    match, worst = _outputs_match(work / "dist.embq", ckpt, config)
    art_bytes = sum(p.stat().st_size for p in (work / "dist.embq").rglob("*") if p.is_file())
    prepare = _prepare_flag(work)

    print(f"{'figure':44s} value")
    lines = [
        ("checkpoint", f"{ckpt.name}: {len(files)} files, {sum(p.stat().st_size for p in files):,} B"),
        ("fp32 table bytes in checkpoint", f"{ckpt_bytes:,} (2**30 = {2**30:,})"),
        ("tables (rows)", ", ".join(f"{n:,}" for n in rows)),
        ("checkpoint written by", "DistributedModelParallel TABLE_WISE, 2 gloo ranks" if args.quick
         else "ShardedTensor row-wise, 2 gloo ranks (DMP: small one)"),
        ("write checkpoint (s)", f"{write_seconds:.1f}"),
        ("DMP checkpoint (s)", f"{dmp_seconds:.1f} ({sum(dmp_config.num_embeddings):,} rows)"),
        ("plan", plan),
        ("torchrun 2 ranks: wall (s)", f"{dist_s:.1f}"),
    ]  # fmt: skip
    for r in ranks:
        lines.append((f"  rank {r['rank']}: time (s) / peak RSS (MiB)",
                      f"{r['seconds']:.1f} / {r['peak_rss_mib']:.0f}"))  # fmt: skip
    lines += [
        ("1 process: wall (s) / peak RSS (MiB)", f"{one_s:.1f} / {single[0]['peak_rss_mib']:.0f}"),
        ("artifact bytes", f"{art_bytes:,}"),
        ("identical to single process", str(identical)),
        ("outputs match float64 (max |dp|)", f"{match} ({worst:.2e})"),
    ]
    for k, v in lines:
        print(f"{k:44s} {v}")
    print(json.dumps({
        "ranks": len(ranks), "checkpoint_bytes": ckpt_bytes,
        "torchrec_dmp_checkpoint": dmp_ok and args.quick,
        "torchrec_dmp_checkpoint_bytes": sum(index.tensors[k].nbytes for k in table_keys)
        if args.quick else None,
        "identical_to_single_process": identical,
        "peak_rss_mib_max_rank": round(max(r["peak_rss_mib"] for r in ranks), 1),
        "peak_rss_mib_per_rank": [round(r["peak_rss_mib"], 1) for r in ranks],
        "seconds_per_rank": [round(r["seconds"], 1) for r in ranks],
        "checkpoint_written_by": "DistributedModelParallel TABLE_WISE (2 gloo ranks)" if args.quick
        else "ShardedTensor row-wise (2 gloo ranks); the DMP checkpoint written is a small one",
        "plan": json.loads(plan) if plan.startswith("{") else plan,
        "largest_table_rows": max(rows), "outputs_match": match,
        "prepare_identical_across_ranks": prepare, "quick": args.quick,
    }))  # fmt: skip
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
