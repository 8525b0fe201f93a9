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

import contextlib
import json
import random
import re
import subprocess
import time

import httpx
import pytest

from tests.checkpoints import TINY
from tests.conftest import ROOT, meshserve
from tests.launchers import kill_tree, launch_env, meshserve_command
from tests.netns import NetnsCluster
from tests.serving import Server
from tests.test_fault_stall import Poller
from tests.test_multinode import assert_nothing_left, left_on, mpirun_across, two_nodes

TIMEOUT = 3       # --timeout of the failing checks: each step's deadline
STEP_TIMEOUT = 5  # serve's --step-timeout in the node-loss test
IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "MESHSERVE_MASTER_ADDR", "MESHSERVE_MASTER_PORT")


@pytest.fixture(scope="module")
def nodes():
    yield from two_nodes("nft")


DUMMY = ["--load-format", "dummy", "--dtype", "float32", "--max-seq-len", 512, "--max-batch-size", 4,
         "--max-num-tokens", 64, "--kv-block-size", 16, "--quiet"]


def dummy_engine(root, *source, tp: int = 2, pp: int = 2):
    """A dummy engine: random weights made at load, no rank files (nothing to load from disk)."""
    out = root / f"engine-tp{tp}pp{pp}"
    meshserve("build", *source, "--tp", tp, "--pp", pp, *DUMMY, "--out", out)
    return out


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """tp=2 x pp=2, the debug-tiny shape, no tokenizer (prompts are token ids): starts fast."""
    return dummy_engine(tmp_path_factory.mktemp("mesh-check"), "--shape", "debug-tiny")


def tiny_model_files(path):
    """config.json of a tiny Llama and a word-level tokenizer of its vocabulary: all a dummy build
    reads (made in well under a second, where loading a real tokenizer takes several)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(TINY["vocab_size"] - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>") \
        .save_pretrained(path)
    LlamaConfig(**TINY).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def served_engine(tmp_path_factory):
    """tp=2 x pp=2 with a tokenizer, for serving."""
    root = tmp_path_factory.mktemp("mesh-serve")
    return dummy_engine(root, "--model", tiny_model_files(root / "model"))


def clean_env(**extra) -> dict:
    """The launched ranks' environment without any interface or rendezvous setting, plus `extra`."""
    env = launch_env()
    for var in IFNAME_VARS:
        env.pop(var, None)
    return {**env, **extra}


def by_hand(nodes: NetnsCluster, *args, node1_env: dict | None = None, env: dict | None = None,
            timeout: float = 60) -> list[tuple[int, str]]:
    """`meshserve ARGS` as 4 ranks, 2 per node, started on each node with torchrun's variables (the
    rendezvous: the first node's name, which is loopback there); (exit code, output) per rank."""
    port = random.randrange(20000, 32000)  # the first node's namespace has nothing listening
    procs = []
    for rank in range(4):
        node = nodes.nodes[rank // 2]
        rank_env = clean_env(RANK=str(rank), WORLD_SIZE="4", LOCAL_RANK=str(rank % 2), LOCAL_WORLD_SIZE="2",
                             MASTER_ADDR=nodes.nodes[0].name, MASTER_PORT=str(port), **(env or {}),
                             **((node1_env or {}) if rank >= 2 else {}))
        procs.append(subprocess.Popen(node.command(meshserve_command(), *map(str, args)), cwd=ROOT, env=rank_env,
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


@contextlib.contextmanager
def firewall_on(node, source: str):
    """An nft rule in `node`'s namespace that drops new connections from `source` (replies to the
    node's own connections still pass), removed afterwards."""
    rules = ["add table inet meshtest",
             "add chain inet meshtest input { type filter hook input priority 0 ; policy accept ; }",
             f"add rule inet meshtest input ip saddr {source} ct state new drop"]
    for rule in rules:
        subprocess.run(["ip", "netns", "exec", node.netns, "nft", *rule.split()], check=True, timeout=30)
    try:
        yield
    finally:
        subprocess.run(["ip", "netns", "exec", node.netns, "nft", "delete", "table", "inet", "meshtest"], timeout=30)


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
    with firewall_on(nodes.nodes[1], addr0):
        started = time.monotonic()
        results = by_hand(nodes, "check", "--engine", engine, "--timeout", TIMEOUT)
        elapsed = time.monotonic() - started
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


def test_generate_across_nodes_fails_at_start_up_in_seconds_naming_the_firewalled_node(nodes, engine, tmp_path):
    """The fast form of the check runs when `generate` (or `serve`) starts on ranks that span nodes."""
    host0, addr0, host1, addr1 = names(nodes)
    requests = tmp_path / "in.jsonl"
    requests.write_text(json.dumps({"prompt_token_ids": [1, 2, 3], "max_tokens": 4}) + "\n")
    with firewall_on(nodes.nodes[1], addr0):
        started = time.monotonic()
        results = by_hand(nodes, "generate", "--engine", engine, "--input", requests, "--output",
                          tmp_path / "out.jsonl", "--quiet", env={"MESHSERVE_CHECK_TIMEOUT": str(TIMEOUT)})
        elapsed = time.monotonic() - started
    code, out = results[0]
    assert all(c != 0 for c, _ in results) and elapsed < 40, results
    assert re.search(rf"rank 0 on {host0} \({re.escape(addr0)}\) cannot connect to rank 2 on {host1} at "
                     rf"{re.escape(addr1)}:\d+ \(gloo\): timed out", out), out
    assert "meshserve: error: the mesh cannot form" in out and "Traceback" not in out, out
    assert not (tmp_path / "out.jsonl").exists()


def test_a_node_lost_while_streaming_fails_the_request_and_ends_every_rank(nodes, served_engine, tmp_path):
    """Serve under mpirun across the nodes; the second node's link goes down after a few streamed
    tokens. The request ends with an error naming the silent ranks, /health turns 503 within the step
    timeout, and every rank on both nodes exits (the cut-off ones through their own watchdog) long
    before gloo's 600 s. mpirun itself waits for its daemon on the lost node: it ends once the link
    is back."""
    outside = f"{nodes.tag}v1"
    command = mpirun_across(nodes, tmp_path, "serve", "--engine", served_engine, "--host", "0.0.0.0", "--port", 0,
                            "--model-name", "m", "--step-timeout", STEP_TIMEOUT)
    server = Server(command=command, env=clean_env())
    try:
        stream_through_node_loss(nodes, server, outside)
    finally:
        subprocess.run(["ip", "link", "set", outside, "up"], timeout=30)
        try:
            code = server.proc.wait(60)  # mpirun ends once its daemon on that node answers again
        except subprocess.TimeoutExpired:
            code = None
        if server.proc.poll() is None:
            server.kill()
    assert code not in (None, 0), server.output
    assert_nothing_left(nodes)


def stream_through_node_loss(nodes: NetnsCluster, server: Server, outside: str) -> None:
    # mpirun may join rank 0's stdout and stderr on one line: the URL ends at the port
    url = re.match(r"http://[\w.-]+:\d+", server.url).group(0)
    down_at = None
    health = Poller(url, "/health")
    lines = []
    with httpx.stream("POST", url + "/v1/completions", timeout=120,
                      json={"model": "m", "prompt": "w1 w2 w3", "max_tokens": 250, "ignore_eos": True,
                            "stream": True}) as response:
        for line in response.iter_lines():
            lines.append((time.monotonic(), line))
            if down_at is None and sum(1 for _, text in lines if text.startswith("data: {")) == 5:
                subprocess.run(["ip", "link", "set", outside, "down"], check=True, timeout=30)
                down_at = time.monotonic()
    ended_at = time.monotonic()
    errors = [text for _, text in lines if text.startswith("data: {") and '"error"' in text]
    assert down_at is not None and len(errors) == 1, lines
    assert re.search(r"rank [23](, rank [23])? of 4 stopped answering", errors[0]), errors  # node1's only
    assert lines[-1][1] in ("", "data: [DONE]"), lines
    assert ended_at - down_at < STEP_TIMEOUT + 4, ended_at - down_at
    gone = ranks_gone(nodes, timeout=STEP_TIMEOUT + 15)
    statuses = health.seen
    health.stop()
    first_bad = next(t for t, status in statuses if status != 200)
    assert first_bad - (down_at - health._start) < STEP_TIMEOUT + 4, statuses
    assert gone - down_at < STEP_TIMEOUT + 15


def ranks_gone(nodes: NetnsCluster, timeout: float) -> float:
    """When no meshserve rank runs on any node any more (fails after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        left = [c for c in left_on(nodes) if any("meshserve" in part for part in c)]
        if not left:
            return time.monotonic()
        assert time.monotonic() < deadline, left
        time.sleep(0.2)


def test_check_on_one_machine_with_local_ranks(tmp_path):
    proc = meshserve("check", "--engine", dummy_engine(tmp_path, "--shape", "debug-tiny", tp=1, pp=2), timeout=120)
    rows = [line.split() for line in proc.stdout.splitlines() if re.match(r"\d+\s", line)]
    assert [r[0] for r in rows] == ["0", "1"] and all(r[-3:] == ["ok", "ok", "ok"] for r in rows), proc.stdout
    assert "on 1 node(s)" in proc.stdout and "the mesh forms" in proc.stdout


def test_check_refuses_bad_input_in_one_line(tmp_path):
    for args, words in ((["check"], "no engine given"), (["check", "--engine", tmp_path, "--timeout", "0"],
                                                         "--timeout=0 is not allowed")):
        proc = meshserve(*args, check=False, timeout=60)
        assert proc.returncode != 0 and proc.stderr.startswith("meshserve: error:") and words in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ---- the pieces, in this process (no namespaces) -------------------------------------------------

def test_a_probe_tells_refused_from_a_stranger_from_the_rank_expected():
    from meshserve.workers.runtime.mesh_check import ProbeListener, connect_error
    listener = ProbeListener("127.0.0.1", "run", 2)
    try:
        hello = b"meshserve-check run rank 0\n"
        assert connect_error("127.0.0.1", listener.port, 2, b"meshserve-check run rank 2\n", hello) is None
        kind, words = connect_error("127.0.0.1", listener.port, 2, b"meshserve-check run rank 3\n", hello)
        assert kind == "stranger" and "rank 2" in words  # another rank (or mesh) answered
    finally:
        listener.close()
    assert connect_error("127.0.0.1", listener.port, 2)[0] == "refused"


def test_gloo_and_nccl_addresses_follow_the_libraries_rules():
    from meshserve.workers.runtime.rank_facts import gloo_address, nccl_address
    ifs = {"lo": {"state": "up", "addresses": ["127.0.0.1"]}, "docker0": {"state": "up", "addresses": ["172.17.0.1"]},
           "eth0": {"state": "up", "addresses": ["10.0.0.5"]}, "ib0": {"state": "up", "addresses": ["10.9.0.5"]}}
    assert gloo_address(ifs, {"GLOO_SOCKET_IFNAME": "eth0"}) == ("10.0.0.5", None)
    assert gloo_address(ifs, {"GLOO_SOCKET_IFNAME": "nosuchif"})[0] is None
    assert nccl_address(ifs, {}) == ("10.9.0.5", None)                       # InfiniBand first
    assert nccl_address(ifs, {"NCCL_SOCKET_IFNAME": "eth"}) == ("10.0.0.5", None)  # a prefix
    assert nccl_address(ifs, {"NCCL_SOCKET_IFNAME": "^ib,lo,docker"}) == ("10.0.0.5", None)
    assert nccl_address(ifs, {"NCCL_SOCKET_IFNAME": "=eth"})[0] is None       # exact: no interface "eth"


def test_the_report_names_source_target_and_fix():
    from meshserve.workers.runtime.mesh_check import ProbeOutcome
    from meshserve.workers.runtime.mesh_report import render
    from meshserve.workers.runtime.rank_facts import RankFacts

    def facts(rank, host, address):
        return RankFacts(rank, host, {"eth0": {"state": "up", "addresses": [address]}}, address,
                         {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": ""}, ["GLOO_SOCKET_IFNAME"],
                         {"gloo": address}, "cpu", probe_ports={"gloo": 4000 + rank})

    outcome = ProbeOutcome(False, {0: facts(0, "a", "10.0.0.1"), 1: facts(1, "b", "10.0.0.2")}, [
        {"from": 0, "to": 1, "endpoint": "gloo", "address": "10.0.0.2", "port": 4001, "kind": "unreachable",
         "words": "no route to host"}])
    text = render(outcome, 2, 1, ("a", 29500), 5.0)
    assert "rank 0 on a (10.0.0.1) cannot connect to rank 1 on b at 10.0.0.2:4001 (gloo): no route to host" in text
    assert "fix: a has no route to 10.0.0.2: the link of a or b is down" in text
    assert re.search(r"^0\s+a\s+0,0\s+10\.0\.0\.1\s+eth0\s+eth0 \(auto\)\s+-\s+cpu\s+ok\s+1 failed$", text, re.M), text
