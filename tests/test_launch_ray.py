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

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.checkpoints import write_llama_with_demo_tokenizer
from tests.conftest import ROOT, meshserve
from tests.launchers import (OutputLines, complete, generate_requests, generated, kill_tree, local_completion,
                             processes_with, unused_port, wait_gone, write_config)

SERVING = re.compile(r"^meshserve: serving on (http://\S+)")

STATE_PROBE = """
import json, sys
from ray.util.state import list_actors, list_placement_groups
address = sys.argv[1]
actors = list_actors(address=address, filters=[("state", "=", "ALIVE")])
groups = list_placement_groups(address=address)
print(json.dumps({"actors": sorted(a.class_name for a in actors),
                  "groups": sorted(g.state for g in groups if g.state != "REMOVED")}))
"""


def _ray_command() -> list[str]:
    script = Path(sys.executable).parent / "ray"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())"]


def _require_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError as err:
        why = f"ray is not importable ({err}; pip install 'meshserve[ray]')"
        if os.environ.get("MESHSERVE_REQUIRE_LAUNCHERS") == "1":
            pytest.fail(f"{why}, and MESHSERVE_REQUIRE_LAUNCHERS=1 requires every launcher", pytrace=False)
        pytest.skip(f"{why}; set MESHSERVE_REQUIRE_LAUNCHERS=1 to fail instead")


@contextlib.contextmanager
def ray_root():
    """A new, empty temp root for Ray, removed afterwards. Its path is short (Ray puts unix sockets
    under it, whose paths must stay under 108 bytes), so pytest's deep tmp_path will not do."""
    base = tempfile.gettempdir()
    root = Path(tempfile.mkdtemp(prefix="msr-", dir=base if len(base) <= 24 else "/tmp"))
    (root / "ray").mkdir()  # Ray writes its address file here and does not create the folder
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def ray_env(root: Path, **extra) -> dict:
    """This process's variables without RAY_* (so no RAY_ADDRESS), Ray's temp folder under `root`,
    usage stats off and a fresh auth token (nothing read from or written to ~/.ray)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=str(root), TMPDIR=str(root), RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(32), **extra)
    return env


class RayCluster:
    """`ray start --head --block`: one node, 4 CPUs, no GPU, in `root`. Every port is chosen by the OS
    when it is bound, except the Ray client server's (Ray refuses 0 there): that one is picked free,
    and the start is retried when something took it meanwhile."""

    def __init__(self, root: Path, attempts: int = 3):
        self.root, self.env = root, ray_env(root)
        for attempt in range(1, attempts + 1):
            try:
                self._start()
                return
            except AssertionError:
                self.stop()
                if attempt == attempts:
                    raise

    def _start(self) -> None:
        client_port = unused_port()
        zero = [f"--{name}-port" for name in ("dashboard", "dashboard-agent-listen", "dashboard-agent-grpc",
                                             "runtime-env-agent", "metrics-export", "node-manager",
                                             "object-manager", "min-worker", "max-worker")]
        self.proc = subprocess.Popen(
            [*_ray_command(), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", "0",
             *[arg for flag in zero for arg in (flag, "0")], "--ray-client-server-port", str(client_port),
             "--num-cpus", "4", "--num-gpus", "0", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
             "--temp-dir", str(self.root / "ray"), "--disable-usage-stats"],
            cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        self.output = OutputLines(self.proc)
        self.dashboard = self.output.wait_for(r"RAY_API_SERVER_ADDRESS='(http://[^']+)'", 120).group(1)
        self.output.wait_for("will now block", 120)
        self.address = (self.root / "ray" / "ray_current_cluster").read_text().strip()
        deadline = time.monotonic() + 60
        while not self._listens(client_port):  # else `ray start` stops the cluster and exits
            assert self.proc.poll() is None and time.monotonic() < deadline, \
                f"the Ray client server did not listen on {client_port}:\n{self.output.text()}"
            time.sleep(0.2)

    def _listens(self, port: int) -> bool:
        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return False
        for p in tree:
            with contextlib.suppress(psutil.Error):
                if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in p.net_connections("tcp")):
                    return True
        return False

    def state(self) -> dict:
        probe = subprocess.run([sys.executable, "-c", STATE_PROBE, self.address], env=self.env, cwd=ROOT,
                               capture_output=True, text=True, timeout=60)
        assert probe.returncode == 0, probe.stderr
        return json.loads(probe.stdout.strip().splitlines()[-1])

    def wait_empty(self, timeout: float = 30.0) -> dict:
        """The cluster's live actors and placement groups once both are gone (or at the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            if (not state["actors"] and not state["groups"]) or time.monotonic() > deadline:
                return state
            time.sleep(1)

    def stop(self) -> None:
        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        self.proc.send_signal(signal.SIGTERM)  # `ray start --block` drains the node and stops its processes
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        _, alive = psutil.wait_procs(tree, timeout=30)
        for p in alive:
            p.kill()


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


def _meshserve(args: list, env: dict) -> tuple[subprocess.Popen, OutputLines]:
    proc = subprocess.Popen([sys.executable, "-m", "meshserve", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, OutputLines(proc)


@contextlib.contextmanager
def _cleanup(proc: subprocess.Popen, root: Path | None = None):
    """Whatever the test's outcome, nothing it started outlives it."""
    try:
        yield
    finally:
        if proc.poll() is None:
            kill_tree(proc)
        for p in processes_with(str(root)) if root is not None else ():
            with contextlib.suppress(psutil.Error):
                p.kill()


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

def _private_env(root: Path) -> dict:
    """No RAY_ADDRESS, no GPU visible (whatever the machine has), CPU ranks."""
    return ray_env(root, MESHSERVE_DEVICE="cpu", CUDA_VISIBLE_DEVICES="")


def _rank_process(tree: list[psutil.Process], engine: Path, rank: int) -> psutil.Process:
    """The process of rank `rank`: the one that maps its rank file."""
    found = []
    for p in tree:
        with contextlib.suppress(psutil.Error):
            if any(Path(m.path) == engine.resolve() / f"rank{rank}.safetensors" for m in p.memory_maps()):
                found.append(p)
    assert len(found) == 1, found
    return found[0]


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
