"""Several nodes for real on one machine: two network-namespace nodes (tests/netns.py), each of whose
host name resolves to 127.0.1.1 on itself as on a default Debian/Ubuntu install, and mpirun across
them (Open MPI's rsh agent enters the node's namespace) with default settings: no interface variable,
no rendezvous address. A tp=2 x pp=2 engine, one TP group per node, generates exactly what a local
run of the same engine does; `serve` answers over HTTP on rank 0's node; a placement whose TP group
would span the nodes is refused before any weights load. Then Slurm with one slurmd per node:
`sbatch --nodes=2 launch/slurm/serve.sbatch`, and Ray with its head on one node and a worker on the
other. Root only (namespaces, /etc/hosts)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import psutil
import pytest

from tests.checkpoints import write_llama_with_demo_tokenizer
from tests.conftest import ROOT, meshserve
from tests.launchers import (OutputLines, complete, differing_files, generate_requests, generated, launch_env,
                             local_completion, meshserve_command, require_tools, unavailable, write_config)
from tests.netns import HOSTS as HOSTS_FILE
from tests.netns import NETNS_ETC, NetnsCluster
from tests.netns_slurm import NetnsSlurm
from tests.serving import Server
from tests.test_launch_ray import _ray_command, _require_ray, ray_env, ray_root
from tests.test_launch_slurm import wait_for_job, wait_for_url

LIMITS = ["--dtype", "float32", "--max-seq-len", 256, "--max-batch-size", 8, "--max-num-tokens", 48,
          "--kv-block-size", 8]  # as in write_config
RANKS_PER_NODE = 2


def two_nodes(*tools: str):
    """Two namespace nodes, removed afterwards (also when a test fails); `tools`: more commands the
    tests need. A generator for module fixtures to `yield from`."""
    if os.geteuid() != 0:
        unavailable("multi-node tests make network namespaces and edit /etc/hosts: run as root")
    require_tools("ip", "unshare", "mpirun", *tools, modules=("mpi4py",))
    try:
        cluster = NetnsCluster(2)
    except RuntimeError as err:
        unavailable(f"cannot make network-namespace nodes here: {err}")
    with cluster:
        yield cluster


@pytest.fixture(scope="module")
def nodes():
    yield from two_nodes()


@pytest.fixture(scope="module")
def hf_dir(nodes, tmp_path_factory):
    return write_llama_with_demo_tokenizer(tmp_path_factory.mktemp("multinode-hf") / "hf")


@pytest.fixture(scope="module")
def engine(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("multinode-engine") / "tp2pp2"
    meshserve("build", "--model", hf_dir, "--tp", 2, "--pp", 2, *LIMITS, "--out", out, "--quiet")
    return out


@pytest.fixture(scope="module")
def reference(engine, tmp_path_factory):
    return local_completion(engine, tmp_path_factory.mktemp("multinode-reference"))


def test_nodes_resolve_their_own_name_to_loopback_and_leave_nothing_behind(nodes):
    """The fixture itself: on each node its own name is 127.0.1.1 (the default Debian/Ubuntu hosts
    line), the other's is its address; a second set of nodes made and removed leaves no trace."""
    first, second = nodes.nodes
    for node, other in ((first, second), (second, first)):
        seen = subprocess.run(node.command("getent", "ahostsv4", node.name, other.name), capture_output=True,
                              text=True, timeout=30).stdout.split()
        assert seen[0] == "127.0.1.1" and other.address in seen
        assert subprocess.run(node.command("hostname"), capture_output=True, text=True).stdout.strip() == node.name
    with NetnsCluster(2) as extra:
        assert extra.subnet != nodes.subnet and extra.tag in HOSTS_FILE.read_text()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    spaces = subprocess.run(["ip", "netns"], capture_output=True, text=True).stdout
    assert extra.tag not in links + spaces + HOSTS_FILE.read_text()
    assert not any((NETNS_ETC / n.netns).exists() for n in extra.nodes)


def mpirun_across(nodes: NetnsCluster, tmp, *args, map_by: str = "slot") -> list[str]:
    """`mpirun -np 4` over the nodes (2 slots each), meshserve's own settings left at their defaults."""
    hosts = tmp / "hostfile"
    hosts.write_text("".join(f"{n.name} slots={RANKS_PER_NODE}\n" for n in nodes.nodes))
    agent = nodes.rsh_agent(tmp / "rsh-agent")
    return ["mpirun", "--allow-run-as-root", "-np", str(RANKS_PER_NODE * len(nodes.nodes)), "--hostfile", str(hosts),
            "--map-by", map_by, "--mca", "plm_rsh_agent", str(agent), "--mca", "plm_rsh_no_tree_spawn", "1",
            "--mca", "btl_tcp_if_include", nodes.prefix, "--mca", "oob_tcp_if_include", nodes.prefix,
            "-x", "PATH", "-x", "MESHSERVE_DEVICE", "-x", "HOME", meshserve_command(), *map(str, args)]


def left_on(nodes: NetnsCluster) -> list[list[str]]:
    """Command lines of the processes still running on the nodes (a node's slurmd aside)."""
    left = []
    for node in nodes.nodes:
        for pid in nodes.node_processes(node):
            try:
                proc = psutil.Process(pid)
                if proc.name() != "slurmd":
                    left.append(proc.cmdline())
            except psutil.NoSuchProcess:
                pass
    return left


def assert_nothing_left(nodes: NetnsCluster, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while left_on(nodes) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left_on(nodes) == []


def test_mpirun_generate_across_two_nodes_matches_a_local_run(nodes, engine, reference, tmp_path):
    env = launch_env()
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "MESHSERVE_MASTER_ADDR", "MESHSERVE_MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(mpirun_across(nodes, tmp_path, "generate", "--engine", engine, "--input",
                                        generate_requests(tmp_path), "--output", tmp_path / "out.jsonl", "--quiet"),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert generated(tmp_path / "out.jsonl") == reference
    assert_nothing_left(nodes)


CLIENT = """
import json, sys
from tests.launchers import complete
print(json.dumps(complete(sys.argv[1])))
"""


def test_mpirun_serve_across_two_nodes_answers_on_rank0s_node(nodes, engine, reference, tmp_path):
    """HTTP binds 127.0.0.1 by default: on rank 0's node, which is the first of the hostfile."""
    config = write_config(tmp_path / "tp2pp2.yaml", engine_dir=engine, tp=2, pp=2)
    server = Server(command=mpirun_across(nodes, tmp_path, "serve", config), env=launch_env())
    try:
        first, second = nodes.nodes
        ask = subprocess.run(first.command(sys.executable, "-c", CLIENT, server.url), cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert ask.returncode == 0, ask.stderr + server.output
        assert json.loads(ask.stdout) == reference
        port = server.url.rsplit(":", 1)[1]
        probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=5)"
        elsewhere = subprocess.run(second.command(sys.executable, "-c", probe), capture_output=True, text=True,
                                   timeout=60)
        assert elsewhere.returncode != 0 and "ConnectionRefused" in elsewhere.stderr  # not on the other node
        server.stop(timeout=60)
    finally:
        if server.proc.poll() is None:
            server.kill()
    assert_nothing_left(nodes)


def test_a_tp_group_across_nodes_is_refused_before_loading(nodes, engine, tmp_path):
    """--map-by node puts ranks 0 and 1 (one TP group) on different nodes: every rank refuses, with the
    rule, before the mesh forms and any weights load (the rank files here are not safetensors, so a load
    would fail otherwise)."""
    weightless = tmp_path / "engine"
    shutil.copytree(engine, weightless)
    for rank_file in weightless.glob("rank*.safetensors"):
        rank_file.write_bytes(b"not a safetensors file")
    proc = subprocess.run(mpirun_across(nodes, tmp_path, "generate", "--engine", weightless, "--input",
                                        generate_requests(tmp_path), "--output", tmp_path / "out.jsonl", "--quiet",
                                        map_by="node"),
                          cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("meshserve: error:")]
    assert errors and all("ranks 0-1 (one TP group) run on different nodes" in e for e in errors), proc.stderr
    assert "Traceback" not in proc.stderr and "safetensors" not in proc.stdout + proc.stderr
    assert not (tmp_path / "out.jsonl").exists()
    assert_nothing_left(nodes)


@pytest.fixture(scope="module")
def slurm(nodes, tmp_path_factory):
    """slurmctld here, one slurmd per namespace node."""
    require_tools("sbatch", "srun", "squeue", "scancel", "sinfo", "scontrol", "slurmctld", "slurmd", "munged",
                  "nsenter")
    # a short root: slurmd and munge put unix sockets under it, whose paths must stay below 108 bytes
    root = Path(tempfile.mkdtemp(prefix="mss-", dir="/tmp"))
    cluster = NetnsSlurm(root, nodes)
    try:
        try:
            cluster.start()
        except Exception as err:
            logs = cluster.logs()
            cluster.stop()
            raise RuntimeError(f"could not start Slurm over the namespace nodes: {err}\n{logs}") from None
        yield cluster
        cluster.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_sbatch_serve_across_two_nodes_builds_and_matches_a_local_run(slurm, nodes, hf_dir, engine, reference,
                                                                      tmp_path):
    """`sbatch --nodes=2 launch/slurm/serve.sbatch`: the rendezvous is the first node's name, which is
    127.0.1.1 on that node and its real address on the other. The job's 4 tasks, 2 per node, build the
    engine together first (byte-equal to a local build), then serve it."""
    built = tmp_path / "engines" / "tp2pp2"
    config = write_config(tmp_path / "tp2pp2.yaml", source=hf_dir, engine_dir=built, tp=2, pp=2)
    log = tmp_path / "serve-job.log"
    knobs = ["--nodes=2", f"--ntasks-per-node={RANKS_PER_NODE}", "--gpus-per-node=0", "--cpus-per-task=1",
             "--time=00:10:00"]
    job = slurm.run("sbatch", "--parsable", *knobs, f"--output={log}", f"--chdir={ROOT}",
                    str(ROOT / "launch" / "slurm" / "serve.sbatch"), str(config),
                    env=launch_env()).stdout.strip().split(";")[0]
    try:
        url = wait_for_url(slurm, job, log, timeout=240)
        assert urlparse(url).hostname == nodes.nodes[0].name
        assert complete(url) == reference
        assert differing_files(engine, built) == []
        slurm.run("scancel", job)
        wait_for_job(slurm, job, timeout=60)
    finally:
        slurm.run("scancel", job, check=False)
    text = log.read_text(errors="replace")
    assert "building engine" in text and "Finished server process" in text, text
    assert_nothing_left(nodes)



def test_ray_across_two_nodes_matches_a_local_run(nodes, engine, reference, tmp_path):
    """`ray start --head` on the first node, `ray start --address` on the second, 2 CPUs each, so the 4
    ranks (one CPU each) take both nodes, one pipeline stage per node; `meshserve generate --launcher
    ray` runs on the first node."""
    _require_ray()
    with ray_root() as root:
        env = ray_env(root, MESHSERVE_DEVICE="cpu")
        head, worker = nodes.nodes
        started = []
        try:
            for i, (node, role) in enumerate(((head, ["--head", "--port", "6379", "--include-dashboard", "false"]),
                                              (worker, ["--address", f"{head.address}:6379"]))):
                temp = root / str(i)  # short: Ray's socket paths under it must stay below 108 bytes
                (temp / "ray").mkdir(parents=True)
                node_env = dict(env, RAY_TMPDIR=str(temp), TMPDIR=str(temp))
                proc = subprocess.Popen(
                    node.command(*_ray_command(), "start", "--block", "--node-ip-address", node.address,
                                 "--num-cpus", RANKS_PER_NODE, "--num-gpus", 0, "--temp-dir", temp / "ray",
                                 "--disable-usage-stats", *role),
                    cwd=ROOT, env=node_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                started.append(proc)
                OutputLines(proc).wait_for("will now block", 120)
            run = subprocess.run(head.command(sys.executable, "-m", "meshserve", "generate", "--engine", engine,
                                              "--input", generate_requests(tmp_path), "--output",
                                              tmp_path / "out.jsonl", "--quiet", "--launcher", "ray",
                                              "--ray-address", f"{head.address}:6379", "--gpus-per-rank", 0),
                                 cwd=ROOT, env=dict(env, RAY_TMPDIR=str(root / "0"), TMPDIR=str(root / "0")),
                                 capture_output=True, text=True, timeout=240)
            assert run.returncode == 0, run.stdout + run.stderr
            assert generated(tmp_path / "out.jsonl") == reference
        finally:
            for proc in reversed(started):  # `ray start --block` stops its node's processes on SIGTERM
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
    assert_nothing_left(nodes)
