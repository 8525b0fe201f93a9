"""The Ray launcher end to end: a real `ray start --head` cluster on this machine, a tp=2 x pp=2 engine
served by one actor per rank, a completion through the official openai client, then SIGTERM (and
`ray job stop`) and nothing left in the cluster.

Ray turns 127.0.0.1 into this machine's own address, so traffic goes to a local interface, never
off the machine. The cluster uses a fresh auth token and temp folder of its own and is stopped by
signalling its `ray start --block` process (`ray stop` would stop every Ray cluster on the machine).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai
import psutil
import pytest

from launch.rank_env import free_port
from tests.checkpoints import write_llama_with_demo_tokenizer
from tests.conftest import ROOT, meshserve

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


class _Output:
    """Lines of a subprocess's merged output, read on a thread; `wait_for` a pattern."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines, self._cond = proc, [], threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def text(self) -> str:
        with self._cond:
            return "".join(self.lines)

    def wait_for(self, pattern: re.Pattern, timeout: float) -> re.Match:
        deadline, seen = time.time() + timeout, 0
        with self._cond:
            while time.time() < deadline:
                for line in self.lines[seen:]:
                    m = pattern.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                if self.proc.poll() is not None and seen == len(self.lines):
                    break
                self._cond.wait(0.5)
        raise AssertionError(f"no line matching {pattern.pattern!r} (exit {self.proc.poll()}):\n" + self.text())


class RayCluster:
    def __init__(self):
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.temp_dir = tempfile.mkdtemp(prefix="msray-")  # short: Ray puts unix sockets under it
        self.env = _fresh_ray_env()
        self.proc = subprocess.Popen(
            [*_ray_command(), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
             "--num-cpus", "4", "--num-gpus", "0", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(self.dashboard_port), "--temp-dir", self.temp_dir, "--disable-usage-stats"],
            cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        self.output = _Output(self.proc)
        self.output.wait_for(re.compile("will now block"), timeout=120)

    def state(self) -> dict:
        probe = subprocess.run([sys.executable, "-c", STATE_PROBE, self.address], env=self.env, cwd=ROOT,
                               capture_output=True, text=True, timeout=60)
        assert probe.returncode == 0, probe.stderr
        return json.loads(probe.stdout.strip().splitlines()[-1])

    def wait_empty(self, timeout: float = 30.0) -> dict:
        """The cluster's live actors and placement groups once both are gone (or at the timeout)."""
        deadline = time.time() + timeout
        while True:
            state = self.state()
            if (not state["actors"] and not state["groups"]) or time.time() > deadline:
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
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _require_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError as err:
        why = f"ray is not importable ({err}; pip install 'meshserve[ray]')"
        if os.environ.get("MESHSERVE_REQUIRE_LAUNCHERS") == "1":
            pytest.fail(f"{why}, and MESHSERVE_REQUIRE_LAUNCHERS=1 requires every launcher", pytrace=False)
        pytest.skip(f"{why}; set MESHSERVE_REQUIRE_LAUNCHERS=1 to fail instead")


def _fresh_ray_env(**extra) -> dict:
    """This process's variables without RAY_*, with usage stats off and a fresh auth token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), **extra)
    return env


@pytest.fixture(scope="module")
def ray_cluster():
    _require_ray()
    cluster = RayCluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def engine(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    hf = write_llama_with_demo_tokenizer(root / "hf")
    meshserve("build", "--model", hf, "--tp", 2, "--pp", 2, "--dtype", "float32", "--out", root / "engine",
              "--max-seq-len", 256, "--max-batch-size", 4, "--max-num-tokens", 64, "--kv-block-size", 8, "--quiet")
    return root / "engine"


def _complete(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["m"]
    out = client.completions.create(model="m", prompt="the quick brown fox", max_tokens=6, temperature=0)
    assert out.choices[0].text and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 6


def test_ray_launcher_serves_and_leaves_nothing(ray_cluster, engine):
    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "serve", "--engine", str(engine), "--model-name", "m",
         "--launcher", "ray", "--ray-address", ray_cluster.address, "--port", "0"],
        cwd=ROOT, env=dict(ray_cluster.env, MESHSERVE_DEVICE="cpu"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    output = _Output(driver)
    try:
        url = output.wait_for(SERVING, timeout=180).group(1)
        _complete(url)
        assert ray_cluster.state() == {"actors": ["MessageBoard"] + ["RankActor"] * 4, "groups": ["CREATED"]}
        driver.send_signal(signal.SIGTERM)
        code = driver.wait(90)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert code == 0, output.text()
    assert ray_cluster.wait_empty() == {"actors": [], "groups": []}, output.text()


def test_ray_job_submit(ray_cluster, engine):
    job_id = f"meshserve-{secrets.token_hex(4)}"
    job = [*_ray_command(), "job"]
    submit = subprocess.Popen(
        [*job, "submit", "--address", ray_cluster.dashboard, "--submission-id", job_id,
         "--runtime-env-json", json.dumps({"env_vars": {"MESHSERVE_DEVICE": "cpu", "RAY_JOB_STOP_WAIT_TIME_S": "45"}}),
         "--",
         sys.executable, "-m", "orchestrator.cli", "serve", "--engine", str(engine), "--model-name", "m",
         "--launcher", "ray", "--port", "0"],
        cwd=ROOT, env=ray_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = _Output(submit)
    try:
        _complete(output.wait_for(SERVING, timeout=180).group(1))
        subprocess.run([*job, "stop", "--address", ray_cluster.dashboard, job_id], env=ray_cluster.env, cwd=ROOT,
                       check=True, capture_output=True, timeout=120)
        submit.wait(60)
    finally:
        if submit.poll() is None:
            submit.kill()
            submit.wait()
    status = subprocess.run([*job, "status", "--address", ray_cluster.dashboard, job_id], env=ray_cluster.env,
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "stopped" in (status.stdout + status.stderr).lower(), status.stdout + status.stderr
    assert "meshserve: error" not in output.text(), output.text()
    assert ray_cluster.wait_empty() == {"actors": [], "groups": []}, output.text()


TWO_NODES = """
import json, shutil, sys, tempfile
from ray.cluster_utils import Cluster
from launch.ray_launcher import run_ranks_on_ray

def report(env):
    import os, ray
    from launch.ray_launcher import announce
    announce("RANK " + json.dumps({"rank": env.rank, "local_rank": env.local_rank, "local_world": env.local_world_size,
                                   "node": ray.get_runtime_context().get_node_id(), "master": env.init_method,
                                   "device": os.environ.get("MESHSERVE_DEVICE")}))

temp = tempfile.mkdtemp(prefix="msray-")
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, "temp_dir": temp})
for _ in range(2):
    cluster.add_node(num_cpus=2, temp_dir=temp)
try:
    run_ranks_on_ray(4, 2, report, address=cluster.address)
finally:
    cluster.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
"""


def test_tp_groups_share_a_node_when_the_mesh_spans_two():
    """Two 2-CPU nodes cannot hold 4 ranks: one placement group per stage keeps each TP pair together."""
    _require_ray()
    run = subprocess.run([sys.executable, "-c", TWO_NODES], cwd=ROOT, env=_fresh_ray_env(MESHSERVE_DEVICE="cpu"),
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    ranks = sorted((json.loads(line[5:]) for line in run.stdout.splitlines() if line.startswith("RANK ")),
                   key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3], run.stdout + run.stderr
    assert ranks[0]["node"] == ranks[1]["node"] != ranks[2]["node"] == ranks[3]["node"]
    assert [(r["local_rank"], r["local_world"]) for r in ranks] == [(0, 2), (1, 2), (0, 2), (1, 2)]
    assert len({r["master"] for r in ranks}) == 1 and all(r["device"] == "cpu" for r in ranks)
