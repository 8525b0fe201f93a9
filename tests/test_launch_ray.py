"""The Ray launcher end to end, on CPU ranks and a tp=2 x pp=2 engine.

- An existing cluster: a real `ray start --head` on this machine; `meshserve serve --launcher ray
  --ray-address ADDR` and `ray job submit` answer exactly as a local run of the same engine does, then
  SIGTERM (or `ray job stop`) leaves no actor or placement group behind.
- The README's first example, a private local cluster (no --ray-address, RAY_ADDRESS unset): exit 0 on
  SIGTERM, 2 with the rank named when a rank's process dies, and no Ray process left either way.
- `--gpus-per-rank`: 0 serves on CPU; 1 without GPUs is a clear error at once on a private cluster,
  a "waiting" message on an existing one (which may grow), where SIGTERM then exits 130.

Every cluster lives in a short temp root of its own (RAY_TMPDIR/TMPDIR, with the `ray/` folder Ray
expects made up front), so nothing depends on, or is left in, the machine's /tmp/ray or ~/.ray. Ray
turns 127.0.0.1 into this machine's own address, so traffic goes to a local interface, never off the
machine. `ray start` clusters are stopped by signalling their `ray start --block` process (`ray stop`
would stop every Ray cluster on the machine).
"""
from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
import sys

import psutil
import pytest

from tests.checkpoints import write_llama_with_demo_tokenizer
from tests.conftest import ROOT, meshserve
from tests.launchers import (OutputLines, complete, generate_requests, generated, local_completion, processes_with,
                             wait_gone, write_config)
from tests.ray_cluster import RayCluster, ray_env, ray_root
from tests.ray_cluster import cleanup as _cleanup
from tests.ray_cluster import meshserve_process as _meshserve
from tests.ray_cluster import private_env as _private_env
from tests.ray_cluster import rank_process as _rank_process
from tests.ray_cluster import ray_command as _ray_command
from tests.ray_cluster import require_ray as _require_ray

SERVING = re.compile(r"^meshserve: serving on (http://[A-Za-z0-9_.\-\[\]:]+)")


@pytest.fixture(scope="module")
def ray_cluster():
    _require_ray()
    with ray_root() as root:
        cluster = RayCluster(root)
        try:
            yield cluster
        finally:
            cluster.stop()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    _require_ray()
    root = tmp_path_factory.mktemp("ray")
    hf = write_llama_with_demo_tokenizer(root / "hf")
    meshserve("build", "--model", hf, "--tp", 2, "--pp", 2, "--dtype", "float32", "--out", root / "engine",
              "--max-seq-len", 256, "--max-batch-size", 8, "--max-num-tokens", 48, "--kv-block-size", 8, "--quiet")
    return root / "engine"


@pytest.fixture(scope="module")
def reference(engine, tmp_path_factory):
    """The completion of a local run (no launcher, no Ray) on the same engine."""
    return local_completion(engine, tmp_path_factory.mktemp("ray-reference"))


# ---- an existing cluster ----------------------------------------------------------------------

def test_ray_generate_matches_a_local_run(ray_cluster, engine, reference, tmp_path):
    """`meshserve generate --launcher ray`: one actor per rank, rank 0 writes the local run's answer."""
    proc = subprocess.run([sys.executable, "-m", "meshserve", "generate", "--engine", str(engine), "--input",
                           str(generate_requests(tmp_path)), "--output", str(tmp_path / "out.jsonl"), "--quiet",
                           "--launcher", "ray", "--ray-address", ray_cluster.address, "--gpus-per-rank", "0"],
                          cwd=ROOT, env=dict(ray_cluster.env, MESHSERVE_DEVICE="cpu"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert generated(tmp_path / "out.jsonl") == reference
    assert ray_cluster.wait_empty() == {"actors": [], "groups": []}


def test_ray_launcher_serves_and_leaves_nothing(ray_cluster, engine, reference):
    proc, output = _meshserve(["serve", "--engine", engine, "--model-name", "m", "--launcher", "ray",
                               "--ray-address", ray_cluster.address, "--port", 0],
                              dict(ray_cluster.env, MESHSERVE_DEVICE="cpu"))
    with _cleanup(proc):
        url = output.wait_for(SERVING, timeout=180).group(1)
        assert complete(url) == reference
        assert ray_cluster.state() == {"actors": ["MessageBoard"] + ["RankActor"] * 4, "groups": ["CREATED"]}
        proc.send_signal(signal.SIGTERM)
        assert output.wait_exit(90) == 0, output.text()
    assert ray_cluster.wait_empty() == {"actors": [], "groups": []}, output.text()


def test_ray_job_submit(ray_cluster, engine, reference):
    job_id = f"meshserve-{secrets.token_hex(4)}"
    job = [*_ray_command(), "job"]
    submit = subprocess.Popen(
        [*job, "submit", "--address", ray_cluster.dashboard, "--submission-id", job_id,
         "--runtime-env-json", json.dumps({"env_vars": {"MESHSERVE_DEVICE": "cpu", "RAY_JOB_STOP_WAIT_TIME_S": "45"}}),
         "--",
         sys.executable, "-m", "meshserve", "serve", "--engine", str(engine), "--model-name", "m",
         "--launcher", "ray", "--port", "0"],
        cwd=ROOT, env=ray_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = OutputLines(submit)
    with _cleanup(submit):
        assert complete(output.wait_for(SERVING, timeout=180).group(1)) == reference
        subprocess.run([*job, "stop", "--address", ray_cluster.dashboard, job_id], env=ray_cluster.env, cwd=ROOT,
                       check=True, capture_output=True, timeout=120)
        output.wait_exit(60)
    status = subprocess.run([*job, "status", "--address", ray_cluster.dashboard, job_id], env=ray_cluster.env,
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "stopped" in (status.stdout + status.stderr).lower(), status.stdout + status.stderr
    assert "meshserve: error" not in output.text(), output.text()
    assert ray_cluster.wait_empty() == {"actors": [], "groups": []}, output.text()


def test_gpus_per_rank_1_without_gpus_waits_for_the_cluster_and_sigterm_exits_130(ray_cluster, engine):
    """An existing cluster may grow, so the launcher says at once what it waits for; SIGTERM before
    serving exits 130 and removes the placement groups."""
    proc, output = _meshserve(["serve", "--engine", engine, "--launcher", "ray", "--ray-address",
                               ray_cluster.address, "--gpus-per-rank", 1, "--port", 0],
                              dict(ray_cluster.env, MESHSERVE_DEVICE="cpu"))
    with _cleanup(proc):
        output.wait_for(r"no Ray node has room for a TP group of 2 rank\(s\) \(\{'CPU': 1.0, 'GPU': 1\} each\); "
                        r"waiting", timeout=120)
        proc.send_signal(signal.SIGTERM)
        assert output.wait_exit(90) == 130, output.text()
    assert "meshserve: interrupted" in output.text() and "serving on" not in output.text()
    assert ray_cluster.wait_empty() == {"actors": [], "groups": []}, output.text()


TWO_NODES = """
import json, sys
from ray.cluster_utils import Cluster
from meshserve.launch.ray_launcher import run_ranks_on_ray

def report(env):
    import os, ray
    from meshserve.launch.ray_launcher import announce
    announce("RANK " + json.dumps({"rank": env.rank, "local_rank": env.local_rank, "local_world": env.local_world_size,
                                   "node": ray.get_runtime_context().get_node_id(), "master": env.init_method,
                                   "device": os.environ.get("MESHSERVE_DEVICE")}))

temp = sys.argv[1]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, "temp_dir": temp,
                                                        "dashboard_agent_listen_port": 0})
try:
    for _ in range(2):
        cluster.add_node(num_cpus=2, temp_dir=temp)
    run_ranks_on_ray(4, 2, report, address=cluster.address)
finally:
    cluster.shutdown()
"""


def test_tp_groups_share_a_node_when_the_mesh_spans_two():
    """Two 2-CPU nodes cannot hold 4 ranks: one placement group per stage keeps each TP pair together."""
    _require_ray()
    with ray_root() as root:
        run = subprocess.run([sys.executable, "-c", TWO_NODES, str(root / "ray")], cwd=ROOT,
                             env=ray_env(root, MESHSERVE_DEVICE="cpu"), capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    ranks = sorted((json.loads(line[5:]) for line in run.stdout.splitlines() if line.startswith("RANK ")),
                   key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3], run.stdout + run.stderr
    assert ranks[0]["node"] == ranks[1]["node"] != ranks[2]["node"] == ranks[3]["node"]
    assert [(r["local_rank"], r["local_world"]) for r in ranks] == [(0, 2), (1, 2), (0, 2), (1, 2)]
    assert len({r["master"] for r in ranks}) == 1 and all(r["device"] == "cpu" for r in ranks)


# ---- a private local cluster, started for the run ------------------------------------------------

def test_private_local_cluster_serves_and_sigterm_exits_0(engine, reference, tmp_path):
    """`meshserve serve CONFIG --launcher ray` (--gpus-per-rank 0): the answer of a local run; SIGTERM to
    the meshserve process exits 0 and takes every rank and Ray daemon with it."""
    config = write_config(tmp_path / "tp2pp2.yaml", engine_dir=engine, tp=2, pp=2)
    with ray_root() as root:
        proc, output = _meshserve(["serve", config, "--launcher", "ray", "--gpus-per-rank", 0], _private_env(root))
        with _cleanup(proc, root):
            url = output.wait_for(SERVING, timeout=180).group(1)
            assert complete(url) == reference
            tree = psutil.Process(proc.pid).children(recursive=True)
            assert processes_with(str(root))  # the cluster's daemons run from this test's temp root
            proc.send_signal(signal.SIGTERM)
            assert output.wait_exit(90) == 0, output.text()
            _, alive = psutil.wait_procs(tree, timeout=30)
            assert alive == [] and wait_gone(str(root), 30) == [], output.text()


def test_private_local_cluster_names_a_failed_rank_and_exits_2(engine):
    """Rank 3's process dies: the launcher exits 2, names rank 3 and stops everything else."""
    with ray_root() as root:
        proc, output = _meshserve(["serve", "--engine", engine, "--model-name", "m", "--launcher", "ray",
                                   "--port", 0], _private_env(root))
        with _cleanup(proc, root):
            output.wait_for(SERVING, timeout=180)
            tree = psutil.Process(proc.pid).children(recursive=True)
            _rank_process(tree, engine, 3).kill()
            assert output.wait_exit(90) == 2, output.text()
            _, alive = psutil.wait_procs(tree, timeout=30)
            assert alive == [] and wait_gone(str(root), 30) == [], output.text()
    errors = [line for line in output.text().splitlines() if line.startswith("meshserve: error:")]
    assert len(errors) == 1 and errors[0].startswith("meshserve: error: rank 3 of 4 failed: its Ray actor died"), \
        output.text()


def test_private_local_cluster_without_gpus_refuses_gpus_per_rank_1_at_once(engine):
    """A cluster started for this run cannot grow: --gpus-per-rank 1 without GPUs is an error, not a
    wait for GPUs that never come."""
    with ray_root() as root:
        proc, output = _meshserve(["serve", "--engine", engine, "--launcher", "ray", "--gpus-per-rank", 1,
                                   "--port", 0], _private_env(root))
        with _cleanup(proc, root):
            assert output.wait_exit(120) == 2, output.text()  # far below the 300 s placement wait
            assert wait_gone(str(root), 30) == []
    errors = [line for line in output.text().splitlines() if line.startswith("meshserve: error:")]
    assert len(errors) == 1 and re.fullmatch(
        r"meshserve: error: the local Ray cluster started for this run has \d+ CPU\(s\) and 0 GPU\(s\), not "
        r"enough for 4 rank\(s\) of \{'CPU': 1.0, 'GPU': 1\}: use --gpus-per-rank 0 \(CPU ranks\), or "
        r"--ray-address of a cluster with room", errors[0]), output.text()
