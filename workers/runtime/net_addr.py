"""Which address and network interface a rank uses, so that ranks on several nodes reach one another.

One rule serves every launcher:

- rank 0's rendezvous address (`rendezvous_address`): MESHSERVE_MASTER_ADDR when set, else the address
  of GLOO_SOCKET_IFNAME's interface when set, else the host name's address; when the ranks span
  several nodes and that address is loopback (the Debian/Ubuntu `127.0.1.1 HOSTNAME` line) or not
  this machine's, the source address of this node's default route, else its first non-loopback IPv4
  address.
- every rank, when the ranks span nodes (`choose_interface`): the local address it reaches rank 0
  from (the one that owns rank 0's address on rank 0's node; otherwise the source address the kernel
  picks for a UDP "connection" to rank 0, which sends nothing), and the interface that owns it.
  `use_interface` sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME to that interface unless they are set,
  so gloo and NCCL advertise an address the other nodes can reach instead of the host name's.
- rank 0's rendezvous store listens on that address only (`rendezvous_store`), not on every
  interface, unless rank 0's own host resolves the rendezvous name to loopback while other nodes
  resolve it elsewhere: then it must listen on every interface.

On one node nothing is set: the ranks talk over loopback as before.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
# Any address outside private ranges: a UDP connect() to it only asks the kernel for the default route.
_DEFAULT_ROUTE_PROBE = "192.88.99.1"


@dataclass(frozen=True)
class NetChoice:
    address: str     # this rank's address, as the other nodes see it
    interface: str   # the interface that owns it


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def resolve(host: str) -> list[str]:
    """The IPv4 addresses of `host` (an address or a name), in resolver order; [] when unknown."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    return list(dict.fromkeys(info[4][0] for info in infos))


def local_addresses() -> dict[str, str]:
    """Every IPv4 address of this machine's interfaces that are up, mapped to the interface name,
    in the kernel's interface order."""
    import psutil
    stats = psutil.net_if_stats()
    found: dict[str, str] = {}
    for name, addrs in psutil.net_if_addrs().items():
        if name in stats and not stats[name].isup:
            continue
        for a in addrs:
            if a.family == socket.AF_INET:
                found.setdefault(a.address, name)
    return found


def interface_of(address: str, addresses: dict[str, str] | None = None) -> str | None:
    """The interface that owns `address` (an address of this machine), else None."""
    return (local_addresses() if addresses is None else addresses).get(address)


def route_source(dest: str) -> str | None:
    """The local address the kernel would send from to reach `dest` (a UDP connect() sends nothing);
    None when there is no route."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((dest, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def named_interface_address(addresses: dict[str, str] | None = None) -> str | None:
    """The IPv4 address of the first interface named in GLOO_SOCKET_IFNAME (or NCCL_SOCKET_IFNAME)
    that has one (a name, not NCCL's ^exclude/=exact forms), else None."""
    addresses = local_addresses() if addresses is None else addresses
    for var in IFNAME_VARS:
        for name in filter(None, os.environ.get(var, "").split(",")):
            if name.startswith(("^", "=")):
                continue
            for addr, nic in addresses.items():
                if nic == name and not is_loopback(addr):
                    return addr
    return None


def node_address(addresses: dict[str, str] | None = None) -> str:
    """This node's address for the other nodes, knowing none of them: the host name's address when it
    is this machine's and not loopback, else the default route's source, else the first non-loopback
    IPv4 address of an interface that is up (127.0.0.1 when there is none)."""
    addresses = local_addresses() if addresses is None else addresses
    for addr in resolve(socket.gethostname()):
        if addr in addresses and not is_loopback(addr):
            return addr
    source = route_source(_DEFAULT_ROUTE_PROBE)
    if source and source in addresses and not is_loopback(source):
        return source
    return next((a for a in addresses if not is_loopback(a)), "127.0.0.1")


def rendezvous_address(spans_nodes: bool) -> str:
    """The address rank 0 gives the other ranks (under mpirun, where rank 0 chooses it)."""
    if os.environ.get("MESHSERVE_MASTER_ADDR"):
        return os.environ["MESHSERVE_MASTER_ADDR"]
    addresses = local_addresses()
    named = named_interface_address(addresses)
    if named:
        return named
    if spans_nodes:
        return node_address(addresses)
    found = resolve(socket.gethostname())
    return found[0] if found else "127.0.0.1"


def choose_interface(master_addr: str, addresses: dict[str, str] | None = None) -> NetChoice | None:
    """The address and interface this rank reaches rank 0 (at `master_addr`) from, for ranks that span
    nodes; None when `master_addr` has no IPv4 address or no interface owns the address found."""
    addresses = local_addresses() if addresses is None else addresses
    targets = resolve(master_addr)
    if not targets:  # no IPv4 address (an IPv6 rendezvous): left to gloo and NCCL
        return None
    own = [a for a in targets if a in addresses and not is_loopback(a)]
    if own:  # rank 0's node, the rendezvous address being one of its own
        address = own[0]
    elif all(is_loopback(a) for a in targets):
        # rank 0's node with its name on loopback (its ranks reach the store there, while the other
        # nodes resolve the name to a real address): the node's own address for the other nodes
        address = node_address(addresses)
    else:
        address = route_source(targets[0])
        if address is None or is_loopback(address):
            address = node_address(addresses)
    interface = interface_of(address, addresses)
    return NetChoice(address, interface) if interface else None


def use_interface(master_addr: str, spans_nodes: bool, env=None) -> NetChoice | None:
    """When the ranks span nodes, set GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME (those not set already)
    in `env` (os.environ) to the interface this rank reaches rank 0 from; returns the choice."""
    if not spans_nodes:
        return None
    env = os.environ if env is None else env
    choice = choose_interface(master_addr)
    if choice is not None:
        for var in IFNAME_VARS:
            if not env.get(var):
                env[var] = choice.interface
    return choice


def store_listen_address(master_addr: str, spans_nodes: bool) -> str | None:
    """The address rank 0's rendezvous store listens on: the rendezvous address when it is this
    machine's own (loopback too, when the ranks share one node); None: every interface."""
    addresses = local_addresses()
    targets = resolve(master_addr)
    if len(targets) != 1 or targets[0] not in addresses:
        return None
    if is_loopback(targets[0]) and spans_nodes:
        return None
    return targets[0]


def launcher_hosts_store() -> bool:
    """True under torchrun (torch elastic), whose agent already hosts the rendezvous store at
    MASTER_ADDR:MASTER_PORT: every rank, rank 0 too, is then its client."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def rendezvous_store(host: str, port: int, world_size: int, is_master: bool, timeout: timedelta,
                     spans_nodes: bool):
    """A torch.distributed TCPStore at host:port; rank 0's listens only on `store_listen_address` when
    there is one (TCPStore alone would listen on every interface)."""
    from torch.distributed import TCPStore
    listen_fd = None
    if is_master:
        listen = store_listen_address(host, spans_nodes)
        if listen is not None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((listen, port))
                sock.listen(1024)
            except OSError:
                sock.close()
                raise
            listen_fd = sock.detach()  # the store owns it from here on
    return TCPStore(host, port, world_size, is_master, timeout, wait_for_workers=False, multi_tenant=True,
                    **({"master_listen_fd": listen_fd} if listen_fd is not None else {}))
