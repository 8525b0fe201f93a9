"""Address and interface selection for ranks on several nodes (workers/runtime/net_addr.py): the
machine's interfaces, name resolution and routes are given as fakes, so every case runs anywhere;
the rendezvous store's listener is checked for real on loopback."""
from __future__ import annotations

import threading
from datetime import timedelta

import psutil
import pytest

import meshserve.workers.runtime.net_addr as net_addr
from meshserve.workers.runtime.net_addr import NetChoice
from tests.launchers import unused_port

# A node of a default Debian/Ubuntu install: its own name on 127.0.1.1, a real interface eth0 and a
# second one (a container bridge) that comes first in the kernel's order.
ADDRS = {"127.0.0.1": "lo", "172.17.0.1": "docker0", "10.1.0.5": "eth0"}
NAMES = {"node5": ["127.0.1.1"], "node1": ["10.1.0.1"], "10.1.0.1": ["10.1.0.1"], "10.1.0.5": ["10.1.0.5"],
         "127.0.0.1": ["127.0.0.1"]}


@pytest.fixture
def node(monkeypatch):
    """This process as "node5"; routes: 10.1.0.0/16 through eth0, the default route through docker0."""
    for var in ("MESHSERVE_MASTER_ADDR", *net_addr.IFNAME_VARS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(net_addr, "local_addresses", lambda: dict(ADDRS))
    monkeypatch.setattr(net_addr, "resolve", lambda host: list(NAMES.get(host, [])))
    monkeypatch.setattr(net_addr.socket, "gethostname", lambda: "node5")
    routes = {"10.1.": "10.1.0.5", "127.": "127.0.0.1"}
    monkeypatch.setattr(net_addr, "route_source",
                        lambda dest: next((src for pre, src in routes.items() if dest.startswith(pre)), "172.17.0.1"))
    return routes


def test_a_rank_on_another_node_uses_the_interface_that_reaches_rank_0(node):
    assert net_addr.choose_interface("node1") == NetChoice("10.1.0.5", "eth0")
    assert net_addr.choose_interface("10.1.0.1") == NetChoice("10.1.0.5", "eth0")


def test_rank_0s_node_uses_the_interface_owning_the_rendezvous_address(node):
    assert net_addr.choose_interface("10.1.0.5") == NetChoice("10.1.0.5", "eth0")


def test_a_host_name_on_loopback_is_never_advertised(node, monkeypatch):
    """Rank 0's own name resolves to 127.0.1.1 on its node (Slurm gives every rank that name): its
    ranks take the default route's interface, not lo."""
    assert net_addr.choose_interface("node5") == NetChoice("172.17.0.1", "docker0")
    monkeypatch.setattr(net_addr, "route_source", lambda dest: None)  # no default route
    assert net_addr.choose_interface("node5") == NetChoice("172.17.0.1", "docker0")  # first non-loopback
    monkeypatch.setattr(net_addr, "local_addresses", lambda: {"127.0.0.1": "lo", "10.1.0.5": "eth0"})
    assert net_addr.choose_interface("node5") == NetChoice("10.1.0.5", "eth0")


def test_a_loopback_route_falls_back_to_the_node_address(node):
    node["10.1."] = "127.0.0.1"
    assert net_addr.choose_interface("node1") == NetChoice("172.17.0.1", "docker0")


def test_gloo_and_nccl_get_the_chosen_interface_unless_set(node):
    env = {}
    assert net_addr.use_interface("node1", spans_nodes=True, env=env) == NetChoice("10.1.0.5", "eth0")
    assert env == {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0"}
    env = {"NCCL_SOCKET_IFNAME": "ib0"}
    net_addr.use_interface("node1", spans_nodes=True, env=env)
    assert env == {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "ib0"}
    env = {}
    assert net_addr.use_interface("node1", spans_nodes=False, env=env) is None and env == {}  # one node: loopback


def test_an_ipv6_rendezvous_sets_no_interface(node):
    env = {}
    assert net_addr.use_interface("fd00::1", spans_nodes=True, env=env) is None and env == {}


def test_rendezvous_address_rules(node, monkeypatch):
    assert net_addr.rendezvous_address(spans_nodes=True) == "172.17.0.1"  # name on loopback: default route
    assert net_addr.rendezvous_address(spans_nodes=False) == "127.0.1.1"  # one node: the name's address
    NAMES["node5"] = ["10.1.0.5"]
    try:
        assert net_addr.rendezvous_address(spans_nodes=True) == "10.1.0.5"  # the name's, when it is real
    finally:
        NAMES["node5"] = ["127.0.1.1"]
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth0")
    assert net_addr.rendezvous_address(spans_nodes=True) == "10.1.0.5"
    monkeypatch.setenv("MESHSERVE_MASTER_ADDR", "head.example")
    assert net_addr.rendezvous_address(spans_nodes=True) == "head.example"


def test_nccl_exclusion_syntax_names_no_interface(node, monkeypatch):
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "^docker,lo")
    assert net_addr.named_interface_address() is None


def test_where_the_rendezvous_store_listens(node):
    assert net_addr.store_listen_address("10.1.0.5", spans_nodes=True) == "10.1.0.5"
    assert net_addr.store_listen_address("127.0.0.1", spans_nodes=False) == "127.0.0.1"
    # the name is loopback here but a real address elsewhere: every interface
    assert net_addr.store_listen_address("node5", spans_nodes=True) is None
    assert net_addr.store_listen_address("node1", spans_nodes=True) is None  # not this machine's


def test_real_lookups():
    assert net_addr.resolve("127.0.0.1") == ["127.0.0.1"]
    assert net_addr.resolve("no-such-host.invalid") == []
    assert net_addr.route_source("127.0.0.1") == "127.0.0.1"
    assert net_addr.interface_of("127.0.0.1") is not None
    assert net_addr.is_loopback("127.0.1.1") and not net_addr.is_loopback("10.0.0.1")


def test_the_rendezvous_store_listens_on_the_chosen_address_only():
    port = unused_port()
    store = net_addr.rendezvous_store("127.0.0.1", port, 2, True, timedelta(seconds=30), spans_nodes=False)
    listening = [c.laddr for c in psutil.Process().net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert [a.ip for a in listening] == ["127.0.0.1"]
    got = []
    peer = threading.Thread(target=lambda: got.append(
        net_addr.rendezvous_store("127.0.0.1", port, 2, False, timedelta(seconds=30), False).get("k")))
    store.set("k", "v")
    peer.start()
    peer.join(30)
    assert got == [b"v"]


def test_the_mesh_reads_host_and_port_of_its_rendezvous():
    from meshserve.workers.runtime.mesh import split_init_method
    assert split_init_method("tcp://10.1.0.1:29500") == ("10.1.0.1", 29500)
    assert split_init_method("tcp://node1:41000") == ("node1", 41000)
    assert split_init_method("tcp://[fd00::2]:29500") == ("fd00::2", 29500)
    with pytest.raises(ValueError):
        split_init_method("env://")
