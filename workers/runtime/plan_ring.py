"""Step plans from rank 0 to the ranks on its own node through a shared-memory ring, instead of three
gloo messages per rank per step (each a TCP round of system calls and wake-ups).

Rank 0 writes each encoded plan (rank_protocol's bytes) into the next of SLOTS slots, then publishes
its number and rings a futex doorbell; a reader waits on the doorbell until the plan it wants is
published, copies it out and records that it has taken it. Rank 0 reuses a slot only once every
reader has taken the plan in it. A plan larger than a slot is marked "by gloo" in its slot and sent
the usual way. Ranks on other nodes always get plans over gloo.

Single-writer counters and program-order stores make this correct on x86-64's total store order;
elsewhere, or without a usable /dev/shm (the file is allocated up front, so a full /dev/shm is a
clean fallback, not a SIGBUS later), every rank uses gloo. MESHSERVE_SHM_PLANS=0 turns it off.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import socket
import time
import uuid
import zlib

import torch
import torch.distributed as dist

from meshserve.workers.runtime import shm_comm

SLOTS = 4
SLOT_BYTES = 1 << 20
_LINE = 64                 # one cache line per counter
_BY_GLOO = -1
_WAIT = shm_comm._Timespec(0, 100_000_000)   # a waiting reader re-checks every 100 ms


class PlanRing:
    def __init__(self, path: str, readers: list[int], me: int | None, create: bool = False):
        """readers: the global ranks that read, in order; me: this rank's index among them (None on
        rank 0, the writer)."""
        self.readers, self.me = readers, me
        self.data_at = _LINE * (1 + len(readers))
        total = self.data_at + SLOTS * SLOT_BYTES
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
        try:
            if create:
                os.posix_fallocate(fd, 0, total)  # fails now, not with SIGBUS later, when /dev/shm is full
            self._map = mmap.mmap(fd, total)
        finally:
            os.close(fd)
        self._published = ctypes.c_int64.from_buffer(self._map, 0)
        self._bell = ctypes.c_int32.from_buffer(self._map, 8)
        self._bell_addr = ctypes.addressof(self._bell)
        self._taken = [ctypes.c_int64.from_buffer(self._map, _LINE * (1 + i)) for i in range(len(readers))]
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self.seq = 0   # the writer: plans published; a reader: plans taken

    def _slot(self, seq: int) -> int:
        return self.data_at + (seq % SLOTS) * SLOT_BYTES

    # ---- rank 0 ------------------------------------------------------------------------------------
    def publish(self, data: torch.Tensor) -> bool:
        """Put one encoded plan (uint8) in the ring; False if it is too large (the slot then tells
        the readers to take it from gloo)."""
        self.seq += 1
        while min(t.value for t in self._taken) < self.seq - SLOTS:  # a reader is SLOTS plans behind
            time.sleep(0.0002)
        at = self._slot(self.seq)
        fits = data.numel() + 8 <= SLOT_BYTES
        self._bytes[at:at + 8].view(torch.int64)[0] = data.numel() if fits else _BY_GLOO
        if fits:
            self._bytes[at + 8:at + 8 + data.numel()].copy_(data)
        self._published.value = self.seq
        self._bell.value = (self._bell.value + 1) & 0x7FFFFFFF
        shm_comm._libc.syscall(shm_comm._SYS_FUTEX, ctypes.c_void_p(self._bell_addr), shm_comm._FUTEX_WAKE,
                               0x7FFFFFFF, None, None, 0)
        return fits

    # ---- the other ranks of the node ---------------------------------------------------------------
    def take(self) -> torch.Tensor | None:
        """The next plan's bytes (a copy), or None when it comes by gloo."""
        want = self.seq + 1
        while True:
            bell = self._bell.value
            if self._published.value >= want:
                break
            shm_comm._libc.syscall(shm_comm._SYS_FUTEX, ctypes.c_void_p(self._bell_addr), shm_comm._FUTEX_WAIT,
                                   bell, ctypes.byref(_WAIT), None, 0)
        at = self._slot(want)
        size = int(self._bytes[at:at + 8].view(torch.int64)[0])
        data = None if size == _BY_GLOO else self._bytes[at + 8:at + 8 + size].clone()
        self.seq = want
        self._taken[self.me].value = want
        return data


def open_plan_ring(mesh) -> PlanRing | None:
    """The ring of this rank (rank 0 writes, the ranks on its node read), or None for ranks that get
    plans over gloo. Every rank must call this (it exchanges host names and the file's name)."""
    group = mesh.control_group
    able = (mesh.world_size > 1 and os.environ.get("MESHSERVE_SHM_PLANS", "1") != "0" and shm_comm.usable()
            and os.path.isdir("/dev/shm"))
    host = zlib.crc32(socket.gethostname().encode()) if able else -1
    hosts = [torch.zeros(1, dtype=torch.int64) for _ in range(mesh.world_size)]
    dist.all_gather(hosts, torch.tensor([host], dtype=torch.int64), group=group)
    hosts = [int(h) for h in hosts]
    readers = [r for r in range(1, mesh.world_size) if hosts[0] >= 0 and hosts[r] == hosts[0]]
    if not readers:
        return None
    name = torch.frombuffer(bytearray(uuid.uuid4().hex.encode()), dtype=torch.uint8)
    dist.broadcast(name, 0, group=group)
    path = os.path.join("/dev/shm", f"meshserve-plans-{bytes(name.tolist()).decode()}")
    ring = None
    if mesh.rank == 0:
        try:
            ring = PlanRing(path, readers, None, create=True)
        except OSError:
            ring = None
    dist.barrier(group=group)
    if mesh.rank in readers:
        try:  # a rank in another container may share the host name but not /dev/shm
            ring = PlanRing(path, readers, readers.index(mesh.rank))
        except OSError:
            ring = None
    opened = [torch.zeros(1, dtype=torch.int64) for _ in range(mesh.world_size)]
    dist.all_gather(opened, torch.tensor([int(ring is not None)], dtype=torch.int64), group=group)
    if mesh.rank == 0 and ring is not None:
        os.unlink(path)  # every rank that could has it mapped
    if not all(int(opened[r]) for r in [0, *readers]):
        return None
    return ring
