"""Shared-memory TP collectives: the same sums and gathers as gloo, bit-identical on every rank,
over many back-to-back operations of mixed sizes (larger ones through gloo), with real processes."""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from meshserve.workers.runtime import shm_comm
from meshserve.workers.runtime.tp_comm import GroupComm

pytestmark = pytest.mark.skipif(not shm_comm.usable(), reason="shared-memory collectives need Linux on x86-64")

SIZE, SLOT = 3, 4096


def _rank(rank: int, tmp: str, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=SIZE)
    path = f"{tmp}/shm"
    group = GroupComm(dist.group.WORLD, SIZE)
    if rank == 0:
        comm = shm_comm.ShmComm(path, 0, SIZE, SLOT, group, timeout_s=60, create=True)
    dist.barrier()
    if rank:
        comm = shm_comm.ShmComm(path, rank, SIZE, SLOT, group, timeout_s=60)
    dist.barrier()
    out = []
    for i in range(300):
        g = torch.Generator().manual_seed(i * 10 + rank)
        n = [1, 7, 576, 1024, 2000][i % 5]  # 1024 and 2000 float32 exceed the 4 KiB slot: gloo
        x = torch.randn(n, generator=g)
        if i % 3 == 2:
            out.append(torch.cat(comm.all_gather(x)))
        else:
            y = x.clone()
            comm.all_reduce(y)
            out.append(y)
    results[rank] = torch.cat(out)
    dist.destroy_process_group()


def test_shm_collectives_match_and_agree(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(str(tmp_path), results), nprocs=SIZE, join=True)
    first = results[0]
    for r in range(1, SIZE):
        assert torch.equal(results[r], first), f"rank {r} got different bits from rank 0"
    want = []
    for i in range(300):
        xs = [torch.randn([1, 7, 576, 1024, 2000][i % 5], generator=torch.Generator().manual_seed(i * 10 + r))
              for r in range(SIZE)]
        want.append(torch.cat(xs) if i % 3 == 2 else xs[0] + xs[1] + xs[2])
    assert torch.allclose(first, torch.cat(want), atol=1e-5)
