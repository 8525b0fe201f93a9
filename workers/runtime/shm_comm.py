"""All-reduce and all-gather among the CPU ranks of one TP group on one host, through a shared-memory
file instead of gloo's TCP round trips (which cost milliseconds each when ranks outnumber cores).

Each rank owns one slot per parity (two parities, used in turn) and one sequence flag. An operation
copies the rank's tensor into its slot, publishes the operation's number in its flag (waking peers
asleep on it with a futex, when one says it sleeps), waits until every peer's flag has reached that
number, then reads
the slots in rank order: every rank computes the same sum, bit for bit. A rank whose peers are not
there yet first yields its core a while (sched_yield: when ranks outnumber cores, the peer it waits
for is often the one waiting for a core), then sleeps. A rank can only come back
to a parity after every peer has published the next operation, that is, after each finished reading
the previous one; so no slot is overwritten while it is read. Yielding, then sleeping on a futex (not
spinning) leaves the cores to the ranks that have work. Messages larger than a slot go through gloo.

Single-writer flags and program-order stores make this correct on x86-64's total store order; other
architectures use gloo (see `usable`). A sleeper's "asleep" mark and the waker's flag store may pass
each other in the store buffers; the sleeper then misses its wake-up and naps for at most 1 ms.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import platform
import time

import torch

_FLAG_STRIDE = 64           # one cache line per rank's flag
_SYS_FUTEX = 202            # x86-64
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_libc = ctypes.CDLL(None, use_errno=True)
_YIELDS = 1000  # before sleeping: give the core to a peer that has work, and see its flag at once


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def usable() -> bool:
    return platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")


class ShmComm:
    def __init__(self, path: str, rank: int, size: int, slot_bytes: int, fallback, timeout_s: float = 600.0,
                 create: bool = False):
        """path: the shared file (rank 0 creates it); fallback: a GroupComm for larger messages."""
        self.rank, self.size, self.slot_bytes, self.fallback = rank, size, slot_bytes, fallback
        self.timeout_s = timeout_s
        header = size * _FLAG_STRIDE
        total = header + 2 * size * slot_bytes
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, total)
            self._map = mmap.mmap(fd, total)
        finally:
            os.close(fd)
        self._flags = [ctypes.c_int32.from_buffer(self._map, r * _FLAG_STRIDE) for r in range(size)]
        self._asleep = [ctypes.c_int32.from_buffer(self._map, r * _FLAG_STRIDE + 4) for r in range(size)]
        self._addr = [ctypes.addressof(f) for f in self._flags]
        data = torch.frombuffer(self._map, dtype=torch.uint8, offset=header, count=2 * size * slot_bytes)
        self._slots = data.view(2, size, slot_bytes)
        self._seq = 0
        self._nap = _Timespec(0, 1_000_000)

    def _publish_and_wait(self) -> int:
        self._seq += 1
        self._flags[self.rank].value = self._seq
        if any(a.value for a in self._asleep):
            _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(self._addr[self.rank]), _FUTEX_WAKE, 0x7FFFFFFF, None, None, 0)
        deadline = None
        for peer in range(self.size):
            for _ in range(_YIELDS):
                if self._flags[peer].value >= self._seq:
                    break
                os.sched_yield()
            while (seen := self._flags[peer].value) < self._seq:
                if deadline is None:
                    deadline = time.monotonic() + self.timeout_s
                elif time.monotonic() > deadline:
                    raise RuntimeError(f"TP peer {peer} of this rank's group did not reach collective {self._seq} "
                                       f"within {self.timeout_s:.0f} s")
                self._asleep[self.rank].value = 1
                _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(self._addr[peer]), _FUTEX_WAIT, seen,
                              ctypes.byref(self._nap), None, 0)
                self._asleep[self.rank].value = 0
        return self._seq & 1

    def _slot(self, parity: int, rank: int, t: torch.Tensor) -> torch.Tensor:
        return self._slots[parity, rank, : t.numel() * t.element_size()].view(t.dtype).view(t.shape)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over the group (`t`, reduced in place)."""
        if t.numel() * t.element_size() > self.slot_bytes:
            return self.fallback.all_reduce(t)
        parity = (self._seq + 1) & 1
        self._slot(parity, self.rank, t).copy_(t)
        self._publish_and_wait()
        t.copy_(self._slot(parity, 0, t))
        for r in range(1, self.size):
            t.add_(self._slot(parity, r, t))
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `t`, in rank order (copies)."""
        if t.numel() * t.element_size() > self.slot_bytes:
            return self.fallback.all_gather(t)
        parity = (self._seq + 1) & 1
        self._slot(parity, self.rank, t).copy_(t)
        self._publish_and_wait()
        return [self._slot(parity, r, t).clone() for r in range(self.size)]
