"""TP all-reduce for GPUs that reach each other's memory (NVLink or PCIe peer access).

A decode step makes two all-reduces per layer of a few KB to a few MB; NCCL's latency at those
sizes (tens of microseconds) would be most of the step. Here messages up to `p2p_max_bytes` go
through torch symmetric memory instead: one-shot (every rank copies its part into its buffer, then
reads every peer's buffer and sums) up to `one_shot_max_bytes`, two-shot (each rank sums one slice,
then all gather the slices) above; larger messages, and any the buffer cannot take, use NCCL. Each
path can be captured in a CUDA graph. NVLink multicast is never used (TORCH_SYMM_MEM_DISABLE_MULTICAST
is set before the buffer is made).

On by default where every GPU of the group reaches the others; MESHSERVE_P2P_ALLREDUCE=0 leaves every
size to NCCL.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

# From `meshserve bench allreduce --tp 2` on 2 x H200 (NVLink), captured in graphs: one-shot is fastest up
# to 1 MiB, two-shot up to 4 MiB (19 us against NCCL's 31 at 2 MiB), NCCL above.
ONE_SHOT_MAX_BYTES = 1 << 20
P2P_MAX_BYTES = 4 << 20


class P2PAllReduce:
    """all_reduce/all_gather of one TP group; all_reduce returns the sum (a new tensor on the P2P
    paths, `t` reduced in place on the NCCL path)."""

    def __init__(self, fallback, device: torch.device, dtype: torch.dtype,
                 one_shot_max_bytes: int = ONE_SHOT_MAX_BYTES, p2p_max_bytes: int = P2P_MAX_BYTES):
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        import torch.distributed._symmetric_memory as symm_mem
        self.fallback, self.size = fallback, fallback.size
        self.group_name = fallback.group.group_name
        self.one_shot_max, self.p2p_max = one_shot_max_bytes, p2p_max_bytes
        self.buffer = symm_mem.empty(p2p_max_bytes // dtype.itemsize, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, fallback.group)

    def path_for(self, t: torch.Tensor) -> str:
        if t.dtype != self.buffer.dtype or not t.is_contiguous():
            return "nccl"
        return path_for_bytes(t.numel() * t.element_size(), self.size, self.one_shot_max, self.p2p_max)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self.reduce(t, self.path_for(t))

    def reduce(self, t: torch.Tensor, path: str) -> torch.Tensor:
        """all_reduce by the path named ("nccl", "one_shot", "two_shot"; the P2P ones need a
        contiguous `t` of the buffer's dtype that fits it)."""
        if path == "nccl":
            return self.fallback.all_reduce(t)
        flat = t.view(-1)
        staged = self.buffer[: flat.numel()]
        if path == "one_shot":
            out = torch.empty_like(flat)
            torch.ops.symm_mem.one_shot_all_reduce_copy_out(staged, flat, "sum", self.group_name, out)
        else:
            staged.copy_(flat)
            out = torch.empty_like(flat)
            torch.ops.symm_mem.two_shot_all_reduce_out(staged, "sum", self.group_name, out)
        return out.view_as(t)

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        return self.fallback.all_gather(t)


def path_for_bytes(nbytes: int, size: int, one_shot_max: int, p2p_max: int) -> str:
    if nbytes > p2p_max:
        return "nccl"
    # two-shot gives each rank one slice of the message, in 16-byte units
    if nbytes <= one_shot_max or nbytes % (16 * size):
        return "one_shot"
    return "two_shot"


def p2p_allreduce(fallback, device: torch.device, dtype: torch.dtype):
    """A P2PAllReduce over `fallback`'s group when every rank of it can use one, else None. Every
    rank of the group must call this (the buffer is made collectively)."""
    ok = _usable(device, fallback.size)
    votes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(fallback.size)]
    dist.all_gather(votes, torch.tensor([int(ok)], dtype=torch.int64, device=device), group=fallback.group)
    if not all(int(v) for v in votes):
        return None
    return P2PAllReduce(fallback, device, dtype)


def _usable(device: torch.device, size: int) -> bool:
    if os.environ.get("MESHSERVE_P2P_ALLREDUCE", "1") == "0" or device.type != "cuda":
        return False
    count = torch.cuda.device_count()
    if count < size:
        return False  # the group spans nodes: peer memory cannot reach
    if not all(torch.cuda.can_device_access_peer(device.index, other) for other in range(count)
               if other != device.index):
        return False
    try:
        from torch.distributed import _symmetric_memory  # noqa: F401  (registers torch.ops.symm_mem)
        return hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out")
    except (ImportError, AttributeError, RuntimeError):
        return False
