"""Several "nodes" on one machine, for multi-node tests: one Linux network namespace per node, each with
its own interface (`eth0`, one end of a veth pair whose other end is on a bridge in the machine's own
namespace), address in a private /24, and host name (every command run on a node gets a UTS namespace
of its own carrying the node's name).

The bridge is attached to no real interface and the nodes have no default route, so nothing leaves
the machine. The machine itself has the /24's first address on the bridge (so an mpirun or slurmctld
started here reaches the nodes) and the nodes' names in /etc/hosts; each node sees its own hosts file
(/etc/netns/NAMESPACE/hosts, which `ip netns exec` mounts over /etc/hosts) where, by default, its own
name resolves to 127.0.1.1 as on a default Debian/Ubuntu install, and the other nodes' names to their
addresses. Names are unique per run; everything is removed afterwards, on failure too.
"""
from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import random
import secrets
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

HOSTS = Path("/etc/hosts")
NETNS_ETC = Path("/etc/netns")


@dataclass(frozen=True)
class Node:
    name: str        # host name (in /etc/hosts, and the node's own `hostname`)
    netns: str       # network namespace
    address: str     # eth0's address inside the namespace

    def command(self, *cmd, keep_sys: bool = False) -> list[str]:
        """`cmd` run on this node: in its namespace, under its own host name, seeing the node's hosts
        file. `ip netns exec` mounts a sysfs of the namespace over /sys, hiding /sys/fs/cgroup;
        keep_sys=True enters the namespace with nsenter instead and mounts the hosts file itself, for
        daemons that need the machine's cgroups (slurmd)."""
        if keep_sys:
            return ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--uts", "--mount", "--", "sh", "-c",
                    'mount --bind "$1" /etc/hosts && hostname "$0" && shift && exec "$@"', self.name,
                    str(NETNS_ETC / self.netns / "hosts"), *map(str, cmd)]
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--", "sh", "-c",
                'hostname "$0" && exec "$@"', self.name, *map(str, cmd)]


def _run(*cmd: str) -> None:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = subprocess.run(["ip", "-4", "-o", "route", "show", "table", "all"], capture_output=True, text=True,
                         timeout=30).stdout
    out += subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, timeout=30).stdout
    nets = []
    for word in out.split():
        with contextlib.suppress(ValueError):
            if "/" in word or word.count(".") == 3:
                nets.append(ipaddress.ip_network(word, strict=False))
    return nets


def free_subnet() -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that no route or address of this machine overlaps."""
    used = _used_networks()
    for _ in range(200):
        net = ipaddress.ip_network(f"10.{random.randrange(100, 255)}.{random.randrange(0, 256)}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise RuntimeError("no free private /24 found")


class NetnsCluster:
    """`count` namespace nodes on one bridge; use as a context manager (or call close())."""

    def __init__(self, count: int, own_name_on_loopback: bool = True):
        token = secrets.token_hex(3)
        self.tag = f"ms{token}"           # 8 characters: interface names stay under 15
        self.subnet = free_subnet()
        hosts = list(self.subnet.hosts())
        self.bridge = f"{self.tag}br"
        self.gateway = str(hosts[0])      # the machine's own address on the bridge
        self.nodes = [Node(f"{self.tag}-node{i}", f"{self.tag}n{i}", str(hosts[i + 1])) for i in range(count)]
        self.own_name_on_loopback = own_name_on_loopback
        self._marker = f"# meshserve test nodes {self.tag}"
        self._made: list[tuple] = []
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    @property
    def prefix(self) -> str:
        return str(self.subnet)

    def _create(self) -> None:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        self._made.append(("bridge",))
        _run("ip", "addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for i, node in enumerate(self.nodes):
            _run("ip", "netns", "add", node.netns)
            self._made.append(("netns", node.netns))
            outside = f"{self.tag}v{i}"
            _run("ip", "link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", node.netns)
            self._made.append(("veth", outside))
            _run("ip", "link", "set", outside, "master", self.bridge)
            _run("ip", "link", "set", outside, "up")
            _run("ip", "-n", node.netns, "addr", "add", f"{node.address}/{self.subnet.prefixlen}", "dev", "eth0")
            _run("ip", "-n", node.netns, "link", "set", "eth0", "up")
            _run("ip", "-n", node.netns, "link", "set", "lo", "up")
            self._write_node_hosts(node)
        self._add_machine_hosts()

    def _write_node_hosts(self, node: Node) -> None:
        if not NETNS_ETC.exists():
            NETNS_ETC.mkdir()
            self._made.append(("etc", NETNS_ETC))
        folder = NETNS_ETC / node.netns
        folder.mkdir()
        self._made.append(("etc", folder))
        lines = ["127.0.0.1\tlocalhost"]
        for other in self.nodes:
            if other is node and self.own_name_on_loopback:
                lines.append(f"127.0.1.1\t{other.name}")
            else:
                lines.append(f"{other.address}\t{other.name}")
        (folder / "hosts").write_text("\n".join(lines) + "\n")

    def _add_machine_hosts(self) -> None:
        lines = [f"{n.address}\t{n.name}\t{self._marker}" for n in self.nodes]
        self._made.append(("hosts",))
        with HOSTS.open("r+") as f:  # in place (/etc/hosts may be a mount point), locked against other runs
            fcntl.flock(f, fcntl.LOCK_EX)
            text = f.read()
            f.write(("" if text.endswith("\n") or not text else "\n") + "\n".join(lines) + "\n")

    def _remove_machine_hosts(self) -> None:
        with HOSTS.open("r+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            lines = f.read().splitlines(keepends=True)
            kept = [line for line in lines if self._marker not in line]
            if len(kept) != len(lines):
                f.seek(0)
                f.write("".join(kept))
                f.truncate()

    def node_processes(self, node: Node) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", node.netns], capture_output=True, text=True, timeout=30)
        return [int(p) for p in out.stdout.split()]

    def close(self) -> None:
        """Kill whatever still runs in the nodes, then remove namespaces, bridge and host names."""
        errors = []
        for kind, *args in reversed(self._made):
            try:
                if kind == "netns":
                    for pid in self.node_processes(Node("", args[0], "")):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, 9)
                    _run("ip", "netns", "del", args[0])
                elif kind == "veth":  # removes both ends at once (a namespace's own go only later)
                    _run("ip", "link", "del", args[0])
                elif kind == "bridge":
                    _run("ip", "link", "del", self.bridge)
                elif kind == "etc":
                    if args[0] != NETNS_ETC:
                        for f in args[0].iterdir():
                            f.unlink()
                    with contextlib.suppress(OSError):  # /etc/netns: only when no other run uses it
                        args[0].rmdir()
                elif kind == "hosts":
                    self._remove_machine_hosts()
            except Exception as err:  # keep removing the rest
                errors.append(f"{kind} {args}: {err}")
        self._made.clear()
        if errors:
            raise RuntimeError("could not remove every test node: " + "; ".join(errors))

    def __enter__(self) -> NetnsCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def rsh_agent(self, path: Path) -> Path:
        """A script for Open MPI's plm_rsh_agent: runs the command line on the node named by its first
        argument (in that node's namespace, under its host name)."""
        cases = "\n".join(f"  {shlex.quote(n.name)}) ns={shlex.quote(n.netns)} ;;" for n in self.nodes)
        path.write_text(f"""#!/bin/bash
# plm_rsh_agent for namespace nodes: $1 is the node, the rest the command line to run there.
node=$1
shift
case $node in
{cases}
  *) echo "unknown node: $node" >&2; exit 1 ;;
esac
exec ip netns exec "$ns" unshare --uts -- sh -c 'hostname "$0" && exec bash -c "$1"' "$node" "$*"
""")
        path.chmod(0o755)
        return path
