"""Who am I in the mesh: rank, world size, local rank and the rendezvous address.

Each launcher leaves its own variables; `discover()` reads them. The local spawner sets the torchrun
names (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so it and torchrun share one path.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "local", "torchrun", ...
    local_world_size: int = 1  # ranks on this node

    @property
    def init_method(self) -> str:
        return f"tcp://{self.master_addr}:{self.master_port}"


def under_launcher(env=os.environ) -> bool:
    """True when some launcher already started this process as one rank of several."""
    return "RANK" in env and "WORLD_SIZE" in env


def discover(env=os.environ) -> RankEnv:
    if under_launcher(env):
        return RankEnv(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                       local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
                       master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=int(env.get("MASTER_PORT", "29500")),
                       launcher=env.get("MESHSERVE_LAUNCHER", "torchrun"),
                       local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])))
    return RankEnv(0, 1, 0, "127.0.0.1", free_port(), "single")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
