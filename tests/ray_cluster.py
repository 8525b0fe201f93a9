"""Ray clusters for tests, each in a short temp root of its own (RAY_TMPDIR/TMPDIR, with the `ray/`
folder Ray expects made up front), so nothing depends on, or is left in, the machine's /tmp/ray or
~/.ray: a `ray start --head` cluster (RayCluster), the environment for a private local cluster that
`meshserve --launcher ray` starts itself (private_env), a meshserve process whose output is read on
a thread, the cleanup that leaves nothing of a test running, and how to find a rank's process."""
from __future__ import annotations

import contextlib
import importlib
import json
import os
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

from tests.conftest import ROOT
from tests.launchers import OutputLines, kill_tree, processes_with, unused_port

STATE_PROBE = """
import json, sys
from ray.util.state import list_actors, list_placement_groups
address = sys.argv[1]
actors = list_actors(address=address, filters=[("state", "=", "ALIVE")])
groups = list_placement_groups(address=address)
print(json.dumps({"actors": sorted(a.class_name for a in actors),
                  "groups": sorted(g.state for g in groups if g.state != "REMOVED")}))
"""


def ray_command() -> list[str]:
    script = Path(sys.executable).parent / "ray"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())"]


def require_ray() -> None:
    """Skip (or, with MESHSERVE_REQUIRE_LAUNCHERS=1, fail) when Ray is not installed."""
    try:
        importlib.import_module("ray")
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
            [*ray_command(), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", "0",
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


def private_env(root: Path) -> dict:
    """No RAY_ADDRESS, no GPU visible (whatever the machine has), CPU ranks."""
    return ray_env(root, MESHSERVE_DEVICE="cpu", CUDA_VISIBLE_DEVICES="")


def rank_process(tree: list[psutil.Process], engine: Path, rank: int) -> psutil.Process:
    """The process of rank `rank`: the one that maps its rank file."""
    found = []
    for p in tree:
        with contextlib.suppress(psutil.Error):
            if any(Path(m.path) == engine.resolve() / f"rank{rank}.safetensors" for m in p.memory_maps()):
                found.append(p)
    assert len(found) == 1, found
    return found[0]


def meshserve_process(args: list, env: dict) -> tuple[subprocess.Popen, OutputLines]:
    """`python -m meshserve *args` with `env` (its whole environment), its merged output read on a thread."""
    proc = subprocess.Popen([sys.executable, "-m", "meshserve", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, OutputLines(proc)


@contextlib.contextmanager
def cleanup(proc: subprocess.Popen, root: Path | None = None):
    """Whatever the test's outcome, nothing it started outlives it (`root`: a ray_root whose
    processes go too)."""
    try:
        yield
    finally:
        if proc.poll() is None:
            kill_tree(proc)
        for p in processes_with(str(root)) if root is not None else ():
            with contextlib.suppress(psutil.Error):
                p.kill()
