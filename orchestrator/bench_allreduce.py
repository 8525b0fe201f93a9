"""`meshserve bench allreduce --tp N`: the TP all-reduce's latency by message size on N local GPUs,
for every path (NCCL, one-shot and two-shot over peer memory), launched eagerly and replayed from
a CUDA graph, measured in one run; each result is checked against NCCL's. Writes the bench JSON
(`mode`: "allreduce", one row per size) and prints it."""
from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

SIZES = [8 << 10, 16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20]
PATHS = ("nccl", "one_shot", "two_shot")
CALLS_PER_GRAPH = 20


def run_allreduce_bench(tp: int, dtype: str, out: str | None, command: str, commit: str) -> str:
    import torch

    from meshserve.errors import UserError
    from meshserve.launch.local_spawn import run_ranks
    if tp < 2:
        raise UserError(f"--tp={tp}: an all-reduce needs a group of at least 2 GPUs")
    if not torch.cuda.is_available() or torch.cuda.device_count() < tp:
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise UserError(f"bench allreduce --tp {tp} needs {tp} CUDA GPUs on this machine, found {found}")
    if out is None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        out = f"benchmarks/results/allreduce-{dtype}-tp{tp}-{stamp}.json"
    run_ranks(tp, _rank, tp, dtype, str(out), command, commit, tp=tp)
    return out


def _rank(env, tp: int, dtype_name: str, out: str, command: str, commit: str) -> None:
    import torch
    import torch.distributed as dist

    from meshserve.errors import UserError
    from meshserve.workers.runtime.mesh import MeshAddress, close_mesh, init_mesh
    from meshserve.workers.runtime.p2p_allreduce import (ONE_SHOT_MAX_BYTES, P2P_MAX_BYTES, P2PAllReduce,
                                                          path_for_bytes)
    from meshserve.workers.runtime.tp_comm import GroupComm
    dtype = getattr(torch, dtype_name)
    mesh = init_mesh(MeshAddress(env.rank, env.world_size, env.local_rank, env.local_world_size, env.init_method),
                     tp, 1)
    try:
        if mesh.device.type != "cuda":
            raise UserError("bench allreduce runs on GPUs only")
        comm = P2PAllReduce(GroupComm(mesh.tp_group, tp), mesh.device, dtype, p2p_max_bytes=max(SIZES))
        rows = []
        for size in SIZES:
            x = torch.randn(size // dtype.itemsize, device=mesh.device).to(dtype) * (env.rank + 1)
            row = {"bytes": size, "chosen": path_for_bytes(size, tp, ONE_SHOT_MAX_BYTES, P2P_MAX_BYTES)}
            expect = comm.reduce(x.clone(), "nccl")
            for path in PATHS:
                got = comm.reduce(x.clone(), path)
                row[f"{path}_max_abs_diff"] = float((got.float() - expect.float()).abs().max())
            for path in PATHS:  # the NCCL path sums in place: timed on a tensor of its own
                scratch = x.clone()
                row[f"{path}_eager_us"] = _eager_us(lambda: comm.reduce(scratch, path), mesh)
                row[f"{path}_graph_us"] = _graph_us(lambda: comm.reduce(scratch, path), mesh)
            rows.append(row)
        dist.barrier(group=mesh.tp_group)
        if env.rank == 0:
            report = {"mode": "allreduce", "commit": commit, "command": command,
                      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "device": torch.cuda.get_device_name(mesh.device), "gpus": tp, "tp": tp, "pp": 1,
                      "dtype": dtype_name, "shape": None, "output_tokens_per_s": None,  # no model
                      "calls_per_graph": CALLS_PER_GRAPH, "rows": rows}
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(report, indent=2) + "\n")
            print(json.dumps(report, indent=2), flush=True)
            print(f"meshserve: bench results written to {out}", flush=True)
    finally:
        close_mesh(mesh)


def _eager_us(call, mesh, reps: int = 200) -> float:
    import torch
    import torch.distributed as dist
    for _ in range(10):
        call()
    torch.cuda.synchronize(mesh.device)
    dist.barrier(group=mesh.tp_group)
    start = time.perf_counter()
    for _ in range(reps):
        call()
    torch.cuda.synchronize(mesh.device)
    return (time.perf_counter() - start) / reps * 1e6


def _graph_us(call, mesh, replays: int = 20) -> float:
    import torch
    import torch.distributed as dist
    call()
    torch.cuda.synchronize(mesh.device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS_PER_GRAPH):
            call()
    graph.replay()
    torch.cuda.synchronize(mesh.device)
    dist.barrier(group=mesh.tp_group)
    start = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize(mesh.device)
    return (time.perf_counter() - start) / (replays * CALLS_PER_GRAPH) * 1e6
