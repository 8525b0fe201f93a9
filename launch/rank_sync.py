"""A few collectives among the processes a launcher started, for work done before (or without) the
rank mesh, such as a parallel engine build: share rank 0's value, gather one integer per process,
agree that a step succeeded everywhere.

MPI ranks use mpi4py (already initialized by the rendezvous); others use a torch.distributed
TCPStore that rank 0 hosts at the rendezvous host, port MESHSERVE_MASTER_PORT + 1, so the mesh's own
store on the rendezvous port never sees these keys. Only fixed-schema integers cross processes.
"""
from __future__ import annotations

from datetime import timedelta

from meshserve.errors import UserError
from meshserve.launch.rank_env import RankEnv

SYNC_PORT_OFFSET = 1
# A build step may take long; a peer that dies is stopped by its launcher, not by this timeout.
SYNC_TIMEOUT = timedelta(hours=6)


class RankGroup:
    """The launched processes, rank 0 first (this base class: a process alone). Use as a context
    manager; every call is collective."""

    def __init__(self, rank: int, size: int, local_size: int):
        self.rank, self.size, self.local_size = rank, size, local_size

    @property
    def is_lead(self) -> bool:
        return self.rank == 0

    def broadcast(self, value: int) -> int:
        """Rank 0's value, on every rank."""
        return value

    def gather(self, value: int) -> list[int]:
        """Every rank's value, on every rank."""
        return [value]

    def agreed(self, what: str, step):
        """Run step() on every rank and return its result once every rank has succeeded.

        If any rank failed, every rank raises: a rank that failed re-raises its own error (so each
        prints it: under srun --kill-on-bad-exit or mpirun the first rank to exit may stop the others
        before they print); the others raise a quiet UserError, and rank 0 names the ranks that failed.
        Every rank has finished step() before any of them raises."""
        error = None
        try:
            result = step()
        except Exception as err:  # noqa: BLE001 - reported below, on the rank that had it
            error, result = err, None
        failed = [r for r, bad in enumerate(self.gather(int(error is not None))) if bad]
        if not failed:
            return result
        if error is not None:  # its own error, printed by this rank (the first to exit may stop the rest)
            error.every_rank = True
            raise error
        raise UserError(f"rank(s) {', '.join(map(str, failed))} of {self.size} failed {what} "
                        "(their errors are above)", every_rank=True, quiet=not self.is_lead)

    def close(self, wait: bool = True) -> None:
        """Leave the group; `wait`: until every rank has left (else, on an error path, at once)."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(wait=exc_type is None)


class _MpiGroup(RankGroup):
    def __init__(self, env: RankEnv):
        super().__init__(env.rank, env.world_size, env.local_world_size)
        from mpi4py import MPI
        self._comm = MPI.COMM_WORLD

    def broadcast(self, value: int) -> int:
        import numpy as np
        buf = np.array([value if self.is_lead else 0], dtype=np.int64)
        self._comm.Bcast(buf, root=0)
        return int(buf[0])

    def gather(self, value: int) -> list[int]:
        import numpy as np
        out = np.zeros(self.size, dtype=np.int64)
        self._comm.Allgather(np.array([value], dtype=np.int64), out)
        return [int(v) for v in out]


class _StoreGroup(RankGroup):
    def __init__(self, env: RankEnv):
        super().__init__(env.rank, env.world_size, env.local_world_size)
        from meshserve.workers.runtime.net_addr import rendezvous_store
        port = env.master_port + SYNC_PORT_OFFSET
        try:
            self._store = rendezvous_store(env.master_addr, port, env.world_size, self.is_lead, SYNC_TIMEOUT,
                                           env.local_world_size != env.world_size)
        except (RuntimeError, OSError) as err:
            raise UserError(f"cannot reach the rank store at {env.master_addr}:{port} "
                            f"({str(err).splitlines()[0]}); set MESHSERVE_MASTER_ADDR to an address of "
                            "rank 0's node and MESHSERVE_MASTER_PORT to a port free there (and the next one)"
                            ) from None
        self._step = 0

    def _key(self, rank: int) -> str:
        return f"meshserve/{self._step}/{rank}"

    def broadcast(self, value: int) -> int:
        self._step += 1
        if self.is_lead:
            self._store.set(self._key(0), str(value))
        return int(self._store.get(self._key(0)))

    def gather(self, value: int) -> list[int]:
        self._step += 1
        self._store.set(self._key(self.rank), str(value))
        return [int(self._store.get(self._key(r))) for r in range(self.size)]

    def close(self, wait: bool = True) -> None:
        """Rank 0 keeps the store up until every rank is done with it (unless an error ends the group:
        then the first error stays the one reported)."""
        store, self._store = self._store, None
        if store is None:
            return
        try:
            store.set(f"meshserve/closed/{self.rank}", "1")
            if self.is_lead and wait:
                store.wait([f"meshserve/closed/{r}" for r in range(self.size)])
        except Exception:
            if wait:
                raise


def open_rank_group(env: RankEnv) -> RankGroup:
    """The group of the processes that launched `env`'s process (a one-rank group when alone)."""
    if env.world_size == 1:
        return RankGroup(0, 1, 1)
    if env.launcher == "mpi":
        return _MpiGroup(env)
    return _StoreGroup(env)

