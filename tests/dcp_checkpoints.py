"""Writing DLRM checkpoints the way users write them, for tests and scripts/bench_scale.py.

- `write_dmp_checkpoint`: a DLRM wrapped in TorchRec's DistributedModelParallel on CPU with gloo,
  `world` processes (torch.multiprocessing spawn), sharded as `sharding` says (TABLE_WISE,
  COLUMN_WISE, DATA_PARALLEL run on CPU; ROW_WISE is offered by TorchRec only when
  compute_device == "cuda"), saved with torch.distributed.checkpoint.
- `write_rowwise_checkpoint`: the same model's tables row-sharded as ShardedTensors built directly
  (`init_from_local_shards`, uneven row splits) over `world` gloo processes, saved with DCP: the
  layout a ROW_WISE DMP checkpoint has, without a GPU.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_now() -> None:
    """End a worker after its files are written and closed, skipping the process group's and the
    interpreter's teardown: gloo's teardown now and then aborts a process ("terminate called
    without an active exception", SIGABRT), which spawn reports as a failure of the whole run."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _init(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _dmp_worker(rank: int, world: int, port: int, config: dict, out: str, seed: int,
                sharding: str, result: str) -> None:  # fmt: skip
    import warnings

    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints

    from embq.models.dlrm import DLRMConfig, build_dlrm

    warnings.filterwarnings("ignore")
    _init(rank, world, port)
    cfg = DLRMConfig.from_json(config)
    model = build_dlrm(cfg, seed=seed)
    # column-wise: shards of half the width (TorchRec's default is 128 columns at least)
    cw = {"min_partition": cfg.embedding_dim // 2} if sharding == "column_wise" else {}
    constraints = {cfg.table_name(f): ParameterConstraints(sharding_types=[sharding], **cw)
                   for f in cfg.sparse_feature_names}  # fmt: skip
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device="cpu"), constraints=constraints
    )
    sharders = [EmbeddingBagCollectionSharder()]
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    torch.manual_seed(seed + 1 + rank)  # give every shard fresh values that differ per rank
    with torch.no_grad():
        for key, value in dmp.state_dict().items():
            if "embedding_bags" in key:
                local = value.local_shards() if hasattr(value, "local_shards") else []
                for shard in local:
                    shard.tensor.normal_(0, 0.05)
    dcp.save(dmp.state_dict(), checkpoint_id=out)
    if rank == 0:
        kinds = {str(k): str(v.sharding_type) for ps in plan.plan.values()
                 for k, v in ps.items()}  # fmt: skip
        Path(result).write_text(json.dumps(kinds))
    dist.barrier()
    _exit_now()


def write_dmp_checkpoint(config, out: str | os.PathLike, *, world: int = 2, seed: int = 0,
                         sharding: str = "table_wise") -> dict:  # fmt: skip
    """Spawn `world` gloo processes, shard the DLRM with DMP and `dcp.save` it to `out`.

    Returns {table: sharding type used}."""
    import torch.multiprocessing as mp

    result = str(Path(out).parent / f".{Path(out).name}.plan.json")
    mp.spawn(_dmp_worker, args=(world, free_port(), config.to_json(), str(out), seed, sharding,
                                result), nprocs=world, join=True)  # fmt: skip
    kinds = json.loads(Path(result).read_text())
    os.unlink(result)
    return kinds


def _rowwise_worker(rank: int, world: int, port: int, config: dict, out: str, seed: int,
                    splits: dict) -> None:  # fmt: skip
    import warnings
    from dataclasses import replace

    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

    from embq.models.dlrm import DLRMConfig, build_dlrm

    warnings.filterwarnings("ignore")
    _init(rank, world, port)
    cfg = DLRMConfig.from_json(config)
    # towers from a model with one-row tables (same seed on every rank: replicated, saved once);
    # each rank makes only its own rows of every table, so no rank ever holds a whole model
    small = build_dlrm(replace(cfg, num_embeddings=[1] * len(cfg.num_embeddings)), seed=seed)
    state = {k: v for k, v in small.state_dict().items() if not k.startswith("sparse_arch.")}
    for i, feature in enumerate(cfg.sparse_feature_names):
        name, rows = cfg.table_name(feature), cfg.num_embeddings[i]
        bounds = splits.get(name, [rows * r // world for r in range(world + 1)])
        lo, hi = bounds[rank], bounds[rank + 1]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i * 1009 + rank)
        local = torch.empty(hi - lo, cfg.embedding_dim).normal_(0, 0.05, generator=gen)
        meta = ShardMetadata([lo, 0], [hi - lo, cfg.embedding_dim], f"rank:{rank}/cpu")
        key = f"sparse_arch.embedding_bag_collection.embedding_bags.{name}.weight"
        state[key] = init_from_local_shards([Shard(local, meta)], [rows, cfg.embedding_dim])
    dcp.save(state, checkpoint_id=out)
    dist.barrier()
    _exit_now()


def write_rowwise_checkpoint(config, out: str | os.PathLike, splits: dict[str, list[int]], *,
                             seed: int = 0, world: int = 2) -> None:  # fmt: skip
    """Row-shard every table as a ShardedTensor over `world` gloo processes (table t split at
    `splits[t]` = [0, b1, ..., rows] if given, else evenly), with N(0, 0.05) values made by the
    rank that owns them, and `dcp.save` the DLRM to `out`."""
    import torch.multiprocessing as mp

    mp.spawn(_rowwise_worker, args=(world, free_port(), config.to_json(), str(out), seed, splits),
             nprocs=world, join=True)  # fmt: skip


def dcp_state_dict(path: str | os.PathLike, config) -> dict:
    """The checkpoint's full DLRM state dict via `dcp.load` into plain tensors (one process):
    the reference embq's reader must match bit for bit."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    from embq.models.dlrm import build_dlrm

    warnings.filterwarnings("ignore")
    keys = list(FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    prefix = next(k[: k.index("sparse_arch.")] for k in keys if "sparse_arch." in k)
    target = {prefix + k: v.clone() for k, v in build_dlrm(config).state_dict().items()}
    dcp.load(target, checkpoint_id=str(path), no_dist=True)
    return {k[len(prefix):]: v for k, v in target.items()}
