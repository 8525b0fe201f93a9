"""torch.distributed bootstrap: the process group, the TP group of this rank and its PP neighbours.

Data-plane collectives run on the device backend (NCCL on GPU, gloo on CPU); the control plane (step
plans, sampled ids) always runs on a gloo group so it never waits behind device work.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

from meshserve.errors import UserError
from meshserve.workers.runtime.mesh_check import check_at_startup, reach_rendezvous
from meshserve.workers.runtime.net_addr import IFNAME_VARS, launcher_hosts_store, rendezvous_store, use_interface
from meshserve.workers.engine_layout import mesh_coords


@dataclass
class Mesh:
    rank: int
    world_size: int
    tp: int
    pp: int
    tp_rank: int
    pp_stage: int
    device: torch.device
    tp_group: object | None      # device-backend group of this rank's TP peers
    control_group: object | None  # gloo group over all ranks
    plan_ring: object | None = None  # plan_ring.PlanRing: step plans within rank 0's node

    @property
    def is_first_stage(self) -> bool:
        return self.pp_stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_stage == self.pp - 1

    def stage_rank(self, stage: int) -> int:
        """Global rank of this rank's TP peer in `stage`."""
        return stage * self.tp + self.tp_rank

    @property
    def sampler_rank(self) -> int:
        """Global rank that samples: tp rank 0 of the last stage."""
        return (self.pp - 1) * self.tp


@dataclass(frozen=True)
class MeshAddress:
    """Where this rank sits and how it reaches rank 0: plain values from whatever launched it."""
    rank: int
    world_size: int
    local_rank: int          # this rank's index on its node (picks its GPU)
    local_world_size: int    # ranks on this node
    init_method: str         # tcp://HOST:PORT of the rendezvous


def pick_device(addr: MeshAddress) -> torch.device:
    """One GPU per rank (local rank picks it) when this node has enough, else CPU; MESHSERVE_DEVICE
    (cpu|cuda) forces the choice."""
    want = os.environ.get("MESHSERVE_DEVICE", "auto")
    if want not in ("auto", "cpu", "cuda"):
        raise UserError(f"MESHSERVE_DEVICE={want!r} is not allowed: use auto, cpu or cuda")
    gpus = torch.cuda.device_count() if want != "cpu" and torch.cuda.is_available() else 0
    if want == "cuda" and gpus < addr.local_world_size:
        raise UserError(f"{addr.local_world_size} rank(s) on this node need as many GPUs, found {gpus}; "
                        "start fewer ranks per node or set MESHSERVE_DEVICE=cpu")
    if gpus and gpus >= addr.local_world_size:
        return torch.device("cuda", addr.local_rank)
    return torch.device("cpu")


def split_init_method(init_method: str) -> tuple[str, int]:
    """HOST and PORT of tcp://HOST:PORT (an IPv6 HOST in brackets)."""
    parsed = urlsplit(init_method)
    if parsed.scheme != "tcp" or not parsed.hostname or parsed.port is None:
        raise ValueError(f"not a tcp://HOST:PORT rendezvous address: {init_method}")
    return parsed.hostname, parsed.port


def init_mesh(addr: MeshAddress, tp: int, pp: int, timeout_s: float = 600.0) -> Mesh:
    env = addr
    if env.world_size != tp * pp:
        raise UserError(f"{env.world_size} process(es) were started but the engine is tp={tp} x pp={pp}: "
                        f"start exactly {tp * pp} ranks (e.g. mpirun -np {tp * pp})")
    device = pick_device(env)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        cores = os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // max(1, min(env.local_world_size, cores))))
    stage, tp_rank = mesh_coords(env.rank, tp)
    if env.world_size == 1:
        return Mesh(0, 1, tp, pp, 0, 0, device, None, None)
    host, port = split_init_method(env.init_method)
    spans_nodes = env.local_world_size != env.world_size
    preset = {v: os.environ.get(v) for v in IFNAME_VARS}
    use_interface(host, spans_nodes)  # GLOO/NCCL_SOCKET_IFNAME: the interface that reaches rank 0
    timeout = timedelta(seconds=timeout_s)
    hosting = env.rank == 0 and not launcher_hosts_store()
    if spans_nodes and not hosting:  # an unreachable rendezvous fails in seconds, not after timeout_s
        reach_rendezvous(env.rank, (host, port), device, timeout_s)
    store = rendezvous_store(host, port, env.world_size, hosting, timeout, spans_nodes)
    if spans_nodes:  # every rank reaches every peer, or the mesh fails now with a table of why
        check_at_startup(store, env.rank, env.world_size, tp, (host, port), device,
                         [v for v in IFNAME_VARS if os.environ.get(v) != preset[v]], timeout_s)
    dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout,
                            **({"device_id": device} if backend == "nccl" else {}))
    control = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    tp_group = None
    for s in range(pp):
        ranks = list(range(s * tp, (s + 1) * tp))
        group = dist.new_group(ranks) if tp > 1 else None
        if s == stage:
            tp_group = group
    mesh = Mesh(env.rank, env.world_size, tp, pp, tp_rank, stage, device, tp_group, control)
    from meshserve.workers.runtime.plan_ring import open_plan_ring
    mesh.plan_ring = open_plan_ring(mesh)
    return mesh


def close_mesh(mesh: Mesh) -> None:
    """Leave the process group, waiting at most MESHSERVE_CLOSE_TIMEOUT seconds (default 30): a
    teardown that hangs (a peer gone, a communicator still held) must not keep the rank alive."""
    if not (mesh.world_size > 1 and dist.is_initialized()):
        return
    import sys
    import threading

    from meshserve.workers.runtime.watchdog import seconds_from_env
    timeout_s = seconds_from_env("MESHSERVE_CLOSE_TIMEOUT", 30.0)
    errors: list[BaseException] = []

    def destroy() -> None:
        try:
            dist.destroy_process_group()
        except BaseException as exc:  # reported below, on the caller's thread
            errors.append(exc)

    leave = threading.Thread(target=destroy, name="meshserve-close-mesh", daemon=True)
    leave.start()
    leave.join(timeout_s)
    if leave.is_alive():
        print(f"meshserve: rank {mesh.rank}: leaving the process group did not finish in {timeout_s:g} s "
              "(MESHSERVE_CLOSE_TIMEOUT); exiting without it", file=sys.stderr, flush=True)
    elif errors:
        raise errors[0]
