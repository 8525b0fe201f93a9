"""Who am I in the mesh: rank, world size, local rank and the rendezvous address.

Each launcher leaves its own variables; `discover()` reads them, in this order:
  1. meshserve's own (MESHSERVE_RANK, MESHSERVE_WORLD_SIZE, ...): the local spawner and Ray actors;
  2. torchrun (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT);
  3. Slurm tasks started by srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the job's first node);
  4. MPI (Open MPI's OMPI_COMM_WORLD_*, MPICH/PMI's PMI_RANK/PMI_SIZE): rank 0 picks a free port and
     broadcasts its address with mpi4py. When both Slurm and MPI variables are set and disagree
     (mpirun inside an allocation starts its daemons with srun), MPI's are the ranks.
MESHSERVE_MASTER_ADDR / MESHSERVE_MASTER_PORT override the rendezvous address under any launcher.
Without MESHSERVE_MASTER_ADDR, rank 0 chooses its address as `workers.runtime.net_addr` says.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

DEFAULT_SLURM_PORT_BASE = 29500


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "single", "local", "torchrun", "slurm", "mpi", "ray"
    local_world_size: int = 1  # ranks on this node

    @property
    def init_method(self) -> str:
        return f"tcp://{self.master_addr}:{self.master_port}"

    def as_env(self) -> dict[str, str]:
        """The variables that make `discover()` in a child process return this RankEnv."""
        return {"MESHSERVE_RANK": str(self.rank), "MESHSERVE_WORLD_SIZE": str(self.world_size),
                "MESHSERVE_LOCAL_RANK": str(self.local_rank),
                "MESHSERVE_LOCAL_WORLD_SIZE": str(self.local_world_size),
                "MESHSERVE_MASTER_ADDR": self.master_addr, "MESHSERVE_MASTER_PORT": str(self.master_port),
                "MESHSERVE_LAUNCHER": self.launcher}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def this_host_address(spans_nodes: bool = True) -> str:
    """An address the other ranks can reach this one at (see `workers.runtime.net_addr.rendezvous_address`)."""
    from meshserve.workers.runtime.net_addr import rendezvous_address
    return rendezvous_address(spans_nodes)


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list ("n[01-03,07],gpu5") as host names."""
    hosts = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"(.*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(n).zfill(len(lo))}{suffix}")
    return hosts


def _int(env, *names, default=None):
    for name in names:
        if env.get(name) not in (None, ""):
            return int(env[name])
    return default


def launched_env(env=None) -> RankEnv | None:
    """The RankEnv a launcher gave this process, or None when no launcher started it."""
    env = os.environ if env is None else env
    addr_override = env.get("MESHSERVE_MASTER_ADDR")
    port_override = _int(env, "MESHSERVE_MASTER_PORT")
    if "MESHSERVE_RANK" in env:
        return RankEnv(int(env["MESHSERVE_RANK"]), int(env["MESHSERVE_WORLD_SIZE"]),
                       int(env.get("MESHSERVE_LOCAL_RANK", env["MESHSERVE_RANK"])),
                       env.get("MESHSERVE_MASTER_ADDR", "127.0.0.1"), int(env["MESHSERVE_MASTER_PORT"]),
                       env.get("MESHSERVE_LAUNCHER", "local"),
                       _int(env, "MESHSERVE_LOCAL_WORLD_SIZE", default=int(env["MESHSERVE_WORLD_SIZE"])))
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return RankEnv(int(env["RANK"]), world, _int(env, "LOCAL_RANK", default=int(env["RANK"])),
                       addr_override or env.get("MASTER_ADDR", "127.0.0.1"),
                       port_override or _int(env, "MASTER_PORT", default=29500), "torchrun",
                       _int(env, "LOCAL_WORLD_SIZE", default=world))
    slurm = _slurm_env(env, addr_override, port_override)
    mpi_rank = _int(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
    if mpi_rank is not None:
        world = _int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", default=1)
        if slurm is not None and (slurm.rank, slurm.world_size) == (mpi_rank, world):
            return slurm  # srun started the MPI ranks itself: no MPI call needed
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PALS_LOCAL_RANKID", default=0)
        local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", default=world)
        addr, port = _mpi_rendezvous(mpi_rank, addr_override, port_override, local_world != world, local)
        return RankEnv(mpi_rank, world, local, addr, port, "mpi", local_world)
    return slurm


def _slurm_env(env, addr_override: str | None, port_override: int | None) -> RankEnv | None:
    """The RankEnv of a task started by srun (not the batch script itself, which has no step id)."""
    if "SLURM_PROCID" not in env or env.get("SLURM_STEP_ID", "batch") in ("batch", "4294967294", "extern"):
        return None
    world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", default=1)
    nodes = expand_nodelist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "localhost"))
    job = _int(env, "SLURM_JOB_ID", default=0)
    per_node = _tasks_per_node(env)
    node = _int(env, "SLURM_NODEID", default=0)
    local_world = per_node[node] if node < len(per_node) else world
    return RankEnv(int(env["SLURM_PROCID"]), world, _int(env, "SLURM_LOCALID", default=0),
                   addr_override or nodes[0], port_override or DEFAULT_SLURM_PORT_BASE + job % 10000,
                   "slurm", local_world)


def _tasks_per_node(env) -> list[int]:
    """SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE ("2(x3),1") expanded per node."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    out = []
    for part in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if m:
            out += [int(m[1])] * int(m[2] or 1)
    return out


_MPI_RENDEZVOUS: tuple[str, int] | None = None
_MPI_NODE_LEADS: list[int] | None = None  # per MPI rank: the first rank of its node
_ADDR_BYTES = 256


def node_leads(env: RankEnv) -> list[int] | None:
    """Per rank of `env`'s job, the first rank of the node it runs on, when the launcher told every
    rank (MPI: gathered at the rendezvous); None when only this rank's own placement is known."""
    if env.launcher == "mpi" and _MPI_NODE_LEADS is not None and len(_MPI_NODE_LEADS) == env.world_size:
        return list(_MPI_NODE_LEADS)
    return None


def _mpi_rendezvous(rank: int, addr: str | None, port: int | None, spans_nodes: bool,
                    local_rank: int = 0) -> tuple[str, int]:
    """Rank 0 chooses the address and a free port; mpi4py broadcasts it to every rank (once per
    process: every later call returns the same answer without another collective). Every rank's
    node (the first rank on it) is gathered at the same time, for the placement checks."""
    global _MPI_RENDEZVOUS
    if _MPI_RENDEZVOUS is not None:
        return _MPI_RENDEZVOUS
    try:
        from mpi4py import MPI
    except ImportError:
        from meshserve.errors import UserError
        raise UserError("started under MPI but mpi4py is missing: pip install 'meshserve[mpi]' "
                        "(or set MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE yourself)") from None
    import numpy as np
    buf = np.zeros(_ADDR_BYTES + 2, dtype=np.uint8)  # host name (zero-padded), then the port
    if rank == 0:
        host = addr or this_host_address(spans_nodes)
        raw = host.encode()
        if len(raw) > _ADDR_BYTES:
            raise ValueError(f"rendezvous host name longer than {_ADDR_BYTES} bytes: {host}")
        buf[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        if not port:
            from meshserve.workers.runtime.net_addr import store_listen_address
            port = free_port(store_listen_address(host, spans_nodes) or "")
        buf[-2:] = divmod(port, 256)
    MPI.COMM_WORLD.Bcast(buf, root=0)
    leads = np.zeros(MPI.COMM_WORLD.Get_size(), dtype=np.int64)
    MPI.COMM_WORLD.Allgather(np.array([rank - local_rank], dtype=np.int64), leads)
    global _MPI_NODE_LEADS
    _MPI_NODE_LEADS = [int(v) for v in leads]
    host = bytes(buf[:_ADDR_BYTES]).rstrip(b"\0").decode()
    _MPI_RENDEZVOUS = (host, int(buf[-2]) * 256 + int(buf[-1]))
    return _MPI_RENDEZVOUS


def discover(env=None) -> RankEnv:
    found = launched_env(env)
    return found if found is not None else RankEnv(0, 1, 0, "127.0.0.1", free_port(), "single")
