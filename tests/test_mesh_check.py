"""`meshserve check` and the mesh's behaviour when the network between nodes breaks, on two
network-namespace nodes (tests/netns.py; root only), with a tp=2 x pp=2 dummy engine (one TP group
per node). Under mpirun with default settings the check passes. The faults are made on purpose, each
on the second node: a wrong GLOO_SOCKET_IFNAME, a firewall (nft) dropping the first node's new
connections, a link that is down; the check must name the host and the address that failed. These
ranks are started by hand on each node with torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, ...),
because the same faults would also cut MPI's own traffic. Then a node's link goes down while `serve`
streams: the request ends with an error, /health turns 503 within the step timeout and every rank
exits. One plain check on this machine alone runs without namespaces."""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import threading
import time

import httpx
import pytest

from tests.checkpoints import write_llama_with_demo_tokenizer
from tests.conftest import ROOT, meshserve
from tests.launchers import OutputLines, kill_tree, launch_env, meshserve_command, require_tools, unavailable
from tests.netns import NetnsCluster
from tests.test_multinode import assert_nothing_left, mpirun_across

TIMEOUT = 3       # --timeout of the failing checks: each step's deadline
STEP_TIMEOUT = 5  # serve's --step-timeout in the node-loss test
IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "MESHSERVE_MASTER_ADDR", "MESHSERVE_MASTER_PORT")


@pytest.fixture(scope="module")
def nodes():
    if os.geteuid() != 0:
        unavailable("multi-node tests make network namespaces and edit /etc/hosts: run as root")
    require_tools("ip", "unshare", "mpirun", "nft", modules=("mpi4py",))
    try:
        cluster = NetnsCluster(2)
    except RuntimeError as err:
        unavailable(f"cannot make network-namespace nodes here: {err}")
    with cluster:
        yield cluster


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A dummy tp=2 x pp=2 engine with a tokenizer: random weights made at load, no rank files."""
    root = tmp_path_factory.mktemp("mesh-check")
    hf = write_llama_with_demo_tokenizer(root / "hf")
    out = root / "engine"
    meshserve("build", "--model", hf, "--load-format", "dummy", "--tp", 2, "--pp", 2, "--dtype", "float32",
              "--max-seq-len", 512, "--max-batch-size", 4, "--max-num-tokens", 64, "--kv-block-size", 16,
              "--out", out, "--quiet")
    return out


def clean_env(**extra) -> dict:
    """The launched ranks' environment without any interface or rendezvous setting, plus `extra`."""
    env = launch_env()
    for var in IFNAME_VARS:
        env.pop(var, None)
    return {**env, **extra}


def by_hand(nodes: NetnsCluster, *args, node1_env: dict | None = None, timeout: float = 60) -> list[tuple[int, str]]:
    """`meshserve ARGS` as 4 ranks, 2 per node, started on each node with torchrun's variables (the
    rendezvous: the first node's name, which is loopback there); (exit code, output) per rank."""
    port = random.randrange(20000, 32000)  # the first node's namespace has nothing listening
    procs = []
    for rank in range(4):
        node = nodes.nodes[rank // 2]
        env = clean_env(RANK=str(rank), WORLD_SIZE="4", LOCAL_RANK=str(rank % 2), LOCAL_WORLD_SIZE="2",
                        MASTER_ADDR=nodes.nodes[0].name, MASTER_PORT=str(port),
                        **((node1_env or {}) if rank >= 2 else {}))
        procs.append(subprocess.Popen(node.command(meshserve_command(), *map(str, args)), cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            results.append((proc.returncode, out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill_tree(proc)
    return results


def names(nodes: NetnsCluster):
    (a, b) = nodes.nodes
    return a.name, a.address, b.name, b.address


def test_check_passes_across_two_nodes_under_mpirun_with_defaults(nodes, engine, tmp_path):
    started = time.monotonic()
    proc = subprocess.run(mpirun_across(nodes, tmp_path, "check", "--engine", engine), cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    host0, addr0, host1, addr1 = names(nodes)
    rows = [line.split() for line in proc.stdout.splitlines() if re.match(r"\d+\s", line)]
    assert [(r[0], r[1], r[3], r[4], r[5], r[6]) for r in rows] == [
        ("0", host0, addr0, "eth0", "eth0", "(auto)"), ("1", host0, addr0, "eth0", "eth0", "(auto)"),
        ("2", host1, addr1, "eth0", "eth0", "(auto)"), ("3", host1, addr1, "eth0", "eth0", "(auto)")], proc.stdout
    assert all(r[-3:] == ["ok", "ok", "ok"] for r in rows), proc.stdout
    assert "meshserve check: ok, the mesh forms (4 ranks)" in proc.stdout
    assert time.monotonic() - started < 60
    assert_nothing_left(nodes)


def test_check_names_a_wrong_interface_on_one_node(nodes, engine):
    host0, addr0, host1, addr1 = names(nodes)
    started = time.monotonic()
    results = by_hand(nodes, "check", "--engine", engine, "--timeout", TIMEOUT,
                      node1_env={"GLOO_SOCKET_IFNAME": "nosuchif"})
    assert time.monotonic() - started < 40
    code, out = results[0]
    assert code != 0, out
    assert f"ranks 2, 3 on {host1}: GLOO_SOCKET_IFNAME=nosuchif names no interface of this host" in out, out
    assert f"fix: set GLOO_SOCKET_IFNAME=eth0 on {host1} (the interface that reaches rank 0, {addr1})" in out, out
    assert host0 not in out.split("problem(s):")[1], out  # the first node is not blamed
    assert all(c == 0 for c, _ in results[1:]), results  # rank 0 alone reports and fails


def test_check_names_the_node_whose_firewall_drops_connections(nodes, engine):
    host0, addr0, host1, addr1 = names(nodes)
    node1 = nodes.nodes[1]
    rules = ["add table inet meshtest",
             "add chain inet meshtest input { type filter hook input priority 0 ; policy accept ; }",
             f"add rule inet meshtest input ip saddr {addr0} ct state new drop"]
    for rule in rules:
        subprocess.run(["ip", "netns", "exec", node1.netns, "nft", *rule.split()], check=True, timeout=30)
    try:
        started = time.monotonic()
        results = by_hand(nodes, "check", "--engine", engine, "--timeout", TIMEOUT)
        elapsed = time.monotonic() - started
    finally:
        subprocess.run(["ip", "netns", "exec", node1.netns, "nft", "delete", "table", "inet", "meshtest"], timeout=30)
    code, out = results[0]
    assert code != 0 and elapsed < 40, out
    for src, dst in ((0, 2), (0, 3), (1, 2), (1, 3)):
        assert re.search(rf"rank {src} on {host0} \({re.escape(addr0)}\) cannot connect to rank {dst} on {host1} at "
                         rf"{re.escape(addr1)}:\d+ \(gloo\): timed out after {TIMEOUT}\.0s", out), out
    assert f"fix: a firewall on {host1} or between {host0} and {host1} drops TCP from {addr0} to {addr1}" in out
    assert "cannot connect to rank 0" not in out and "cannot connect to rank 1 " not in out, out  # node1 -> node0 works


def test_check_names_the_node_whose_link_is_down(nodes, engine):
    host0, addr0, host1, addr1 = names(nodes)
    outside = f"{nodes.tag}v1"  # the bridge's end of the second node's cable
    subprocess.run(["ip", "link", "set", outside, "down"], check=True, timeout=30)
    try:
        started = time.monotonic()
        results = by_hand(nodes, "check", "--engine", engine, "--timeout", TIMEOUT)
        elapsed = time.monotonic() - started
    finally:
        subprocess.run(["ip", "link", "set", outside, "up"], check=True, timeout=30)
    assert all(code != 0 for code, _ in (results[0], results[2], results[3])) and elapsed < 40, results
    for code, out in results[2:]:
        assert re.search(rf"{host1} cannot reach the rendezvous at {host0}:\d+ \({re.escape(addr0)}\) from "
                         rf"{re.escape(addr1)} \(eth0, no link\)", out), out
        assert f"fix: {host1} has no working route to {host0}: bring its link up" in out, out
    assert re.search(r"rank\(s\) 2, 3 did not reach the rendezvous", results[0][1]), results[0][1]


def test_check_on_one_machine_with_local_ranks(engine):
    proc = meshserve("check", "--engine", engine, timeout=120)
    rows = [line.split() for line in proc.stdout.splitlines() if re.match(r"\d+\s", line)]
    assert [r[0] for r in rows] == ["0", "1", "2", "3"] and all(r[-3:] == ["ok", "ok", "ok"] for r in rows)
    assert "on 1 node(s)" in proc.stdout and "the mesh forms" in proc.stdout


def test_check_refuses_bad_input_in_one_line(tmp_path):
    for args, words in ((["check"], "no engine given"), (["check", "--engine", tmp_path, "--timeout", "0"],
                                                         "--timeout=0 is not allowed")):
        proc = meshserve(*args, check=False, timeout=60)
        assert proc.returncode != 0 and proc.stderr.startswith("meshserve: error:") and words in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
