"""The collectives of a TP group, as the model layers use them (all-reduce, all-gather):
torch.distributed on the group (NCCL on GPU, gloo on CPU); for GPUs with peer access (unless
MESHSERVE_P2P_ALLREDUCE=0), small all-reduces over peer memory (p2p_allreduce); for CPU ranks that share
a host, shared memory (shm_comm; MESHSERVE_SHM_COLLECTIVES=0 keeps gloo)."""
from __future__ import annotations

import os
import socket
import uuid
import zlib

import torch
import torch.distributed as dist

SHM_SLOT_BYTES = 4 << 20   # messages up to this size go through shared memory


class GroupComm:
    def __init__(self, group, size: int):
        self.group, self.size = group, size

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over the group (`t`, reduced in place)."""
        dist.all_reduce(t, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return parts


def tp_comm(mesh, dtype: torch.dtype, timeout_s: float = 600.0):
    """This rank's TP collectives (None when tp is 1); dtype: the activations'."""
    if mesh.tp == 1:
        return None
    group = GroupComm(mesh.tp_group, mesh.tp)
    if mesh.device.type == "cuda":
        from meshserve.workers.runtime.p2p_allreduce import p2p_allreduce
        return p2p_allreduce(group, mesh.device, dtype) or group
    if os.environ.get("MESHSERVE_SHM_COLLECTIVES", "1") == "0":
        return group
    from meshserve.workers.runtime import shm_comm
    leader = mesh.pp_stage * mesh.tp  # global rank of tp rank 0 of this stage
    able = shm_comm.usable() and os.path.isdir("/dev/shm")
    host = zlib.crc32(socket.gethostname().encode()) if able else -1
    hosts = group.all_gather(torch.tensor([host], dtype=torch.int64))  # every rank decides alike
    if any(int(h) != host or int(h) < 0 for h in hosts):
        return group
    name = torch.frombuffer(bytearray(uuid.uuid4().hex.encode()), dtype=torch.uint8)
    dist.broadcast(name, leader, group=mesh.tp_group)  # the leader's name wins
    path = os.path.join("/dev/shm", f"meshserve-{bytes(name.tolist()).decode()}")
    comm = None
    if mesh.tp_rank == 0:
        try:
            comm = shm_comm.ShmComm(path, 0, mesh.tp, SHM_SLOT_BYTES, group, timeout_s, create=True)
        except OSError:
            comm = None
    dist.barrier(group=mesh.tp_group)
    if mesh.tp_rank != 0:
        try:  # a peer in another container may share the host name but not /dev/shm
            comm = shm_comm.ShmComm(path, mesh.tp_rank, mesh.tp, SHM_SLOT_BYTES, group, timeout_s)
        except OSError:
            comm = None
    opened = group.all_gather(torch.tensor([int(comm is not None)], dtype=torch.int64))
    if mesh.tp_rank == 0 and comm is not None:
        os.unlink(path)  # every rank that could has it mapped; nothing is left behind, whatever happens later
    return comm if all(int(o) for o in opened) else group
