"""What one rank knows about its own network and device before the mesh forms: host, interfaces and
their link state, the address gloo (and on GPU, NCCL) will advertise to the other ranks, the interface
variables in force, device and versions. Plain JSON-able values: they travel through the rendezvous
store to rank 0, which prints them (workers/runtime/mesh_report.py).

The advertised address follows what the libraries do, not what we wish they did: gloo takes the
first address of the first interface in GLOO_SOCKET_IFNAME, else the host name's address (the
`127.0.1.1 HOSTNAME` line of a default Debian/Ubuntu install makes that loopback), else loopback.
NCCL takes the first interface matching NCCL_SOCKET_IFNAME (prefixes; `^` excludes, `=` is exact),
else the first that is neither loopback nor docker, InfiniBand first.
"""
from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass, field

from meshserve.workers.runtime.net_addr import is_loopback, resolve, route_source


@dataclass
class Finding:
    """One thing that keeps the mesh from forming: where, what, and the setting that fixes it."""
    rank: int
    host: str
    problem: str
    fix: str


@dataclass
class RankFacts:
    rank: int
    host: str
    interfaces: dict[str, dict]          # name -> {"state": "up" | "no link" | "down", "addresses": [...]}
    reach_from: str | None               # the local address the kernel reaches rank 0 from
    ifname_vars: dict[str, str]          # GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME in force ("" unset)
    ifname_auto: list[str]               # those of them meshserve set (the interface that reaches rank 0)
    endpoints: dict[str, str]            # "gloo" (and "nccl" on GPU) -> the address that library advertises
    device: str
    versions: str = ""                   # GPU: driver, CUDA and NCCL versions
    probe_ports: dict[str, int] = field(default_factory=dict)  # endpoint -> port of this rank's probe listener
    findings: list[dict] = field(default_factory=list)         # Finding records found on this rank alone

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(data: dict) -> "RankFacts":
        return RankFacts(**data)

    def interface_of(self, address: str | None) -> str | None:
        for name, info in self.interfaces.items():
            if address in info["addresses"]:
                return name
        return None

    def usable_interfaces(self) -> str:
        """'eth0 10.0.0.3, ib0 10.1.0.3': the interfaces with a link and an address (loopback last)."""
        found = [(is_loopback(info["addresses"][0]), f"{name} {info['addresses'][0]}")
                 for name, info in self.interfaces.items() if info["state"] == "up" and info["addresses"]]
        return ", ".join(text for _, text in sorted(found, key=lambda f: f[0])) or "none"


def interfaces() -> dict[str, dict]:
    """Every interface of this machine with its link state and IPv4 addresses (IPv6 after them)."""
    import psutil
    stats = psutil.net_if_stats()
    out: dict[str, dict] = {}
    for name, addrs in psutil.net_if_addrs().items():
        st = stats.get(name)
        # psutil's isup is false for an interface that is up but has no carrier ("NO-CARRIER")
        flags = set(getattr(st, "flags", "").split(","))
        state = "up" if st is None or st.isup else "no link" if "up" in flags else "down"
        v4 = [a.address for a in addrs if a.family == socket.AF_INET]
        v6 = [a.address.split("%")[0] for a in addrs if a.family == socket.AF_INET6]
        if v4 or v6:  # an interface without an address carries nothing of the mesh
            out[name] = {"state": state, "addresses": v4 + v6}
    return out


def gloo_address(ifs: dict[str, dict], env=None) -> tuple[str | None, str | None]:
    """(the address gloo will advertise, None) or (None, why gloo cannot start here)."""
    env = os.environ if env is None else env
    names = [n for n in env.get("GLOO_SOCKET_IFNAME", "").split(",") if n]
    if names:
        info = ifs.get(names[0])
        if info is None:
            return None, f"GLOO_SOCKET_IFNAME={names[0]} names no interface of this host"
        if not info["addresses"]:
            return None, f"GLOO_SOCKET_IFNAME={names[0]}: that interface has no address"
        return info["addresses"][0], None
    own = {a for info in ifs.values() for a in info["addresses"]}
    for address in resolve(socket.gethostname()):
        if address in own or is_loopback(address):
            return address, None
    return "127.0.0.1", None


def _nccl_matches(name: str, spec: str) -> bool:
    exclude, spec = spec.startswith("^"), spec.lstrip("^")
    exact, spec = spec.startswith("="), spec.lstrip("=")
    hit = any(name == p if exact else name.startswith(p) for p in spec.split(",") if p)
    return hit != exclude


def nccl_address(ifs: dict[str, dict], env=None) -> tuple[str | None, str | None]:
    """(the address NCCL's socket bootstrap will use, None) or (None, why NCCL finds no interface)."""
    env = os.environ if env is None else env
    spec = env.get("NCCL_SOCKET_IFNAME", "")
    names = sorted(ifs, key=lambda n: not n.startswith("ib"))
    if spec:
        picked = [n for n in names if _nccl_matches(n, spec) and ifs[n]["addresses"]]
        if not picked:
            return None, f"NCCL_SOCKET_IFNAME={spec} matches no interface of this host that has an address"
    else:
        picked = [n for n in names if not n.startswith(("lo", "docker")) and ifs[n]["addresses"]] or \
            [n for n in names if ifs[n]["addresses"]]
    return (ifs[picked[0]]["addresses"][0], None) if picked else (None, "no interface has an address")


def gpu_versions() -> str:
    """'driver 580.65, CUDA 13.0, NCCL 2.28.9' (what can be read without starting anything)."""
    import torch
    parts = []
    try:
        with open("/proc/driver/nvidia/version") as f:
            words = f.readline().split()
        parts.append("driver " + next(w for w in words if w[:1].isdigit() and "." in w))
    except (OSError, StopIteration):
        pass
    if torch.version.cuda:
        parts.append(f"CUDA {torch.version.cuda}")
    try:
        parts.append("NCCL " + ".".join(map(str, torch.cuda.nccl.version())))
    except Exception:  # noqa: BLE001 - a build without NCCL
        pass
    return ", ".join(parts)


def gather_facts(rank: int, master_addr: str, device, auto_vars: list[str]) -> RankFacts:
    """This rank's facts, the interface variables being already set as the mesh will use them
    (net_addr.use_interface); `auto_vars`: those that meshserve set."""
    ifs = interfaces()
    host = socket.gethostname()
    targets = resolve(master_addr)
    reach = route_source(targets[0]) if targets else None
    if targets and targets[0] in {a for i in ifs.values() for a in i["addresses"]}:
        reach = targets[0]
    facts = RankFacts(rank, host, ifs, reach, {v: os.environ.get(v, "") for v in ("GLOO_SOCKET_IFNAME",
                                                                               "NCCL_SOCKET_IFNAME")},
                      list(auto_vars), {}, str(device))
    kinds = [("gloo", gloo_address)] + ([("nccl", nccl_address)] if device.type == "cuda" else [])
    for kind, find in kinds:
        address, why = find(ifs)
        if address is not None:
            facts.endpoints[kind] = address
        else:
            facts.findings.append(asdict(Finding(rank, host, why, _interface_fix(facts, kind))))
    if device.type == "cuda":
        facts.versions = gpu_versions()
    via = facts.interface_of(reach)
    if via is not None and ifs[via]["state"] != "up":
        facts.findings.append(asdict(Finding(
            rank, host, f"{via} ({reach}), the interface this host reaches rank 0 through, is {ifs[via]['state']}",
            f"bring {via} up on {host} (its cable, switch port or `ip link set {via} up`), or set "
            f"MESHSERVE_MASTER_ADDR to an address of rank 0's node on another network {host} is on")))
    return facts


def _interface_fix(facts: RankFacts, kind: str) -> str:
    var = "GLOO_SOCKET_IFNAME" if kind == "gloo" else "NCCL_SOCKET_IFNAME"
    via = facts.interface_of(facts.reach_from)
    if via is not None:
        return (f"set {var}={via} on {facts.host} (the interface that reaches rank 0, {facts.reach_from}), or "
                f"unset it and meshserve picks that one; interfaces there: {facts.usable_interfaces()}")
    return f"set {var} on {facts.host} to one of its interfaces: {facts.usable_interfaces()}"
