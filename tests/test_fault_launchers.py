"""A launcher killed outright (SIGKILL, no chance to stop its ranks) must not leave ranks behind that
go on serving and holding the port: each launched rank watches its parent and exits within about a
second of losing it, and ranks whose rank 0 is gone exit within --step-timeout; a stalled rank under
mpirun ends the job, named. Real mpirun (srun: tests/test_launch_slurm.py), a tp=1 x pp=2 engine on CPU."""
from __future__ import annotations

import signal
import socket
import time
from urllib.parse import urlparse

import psutil
import pytest

from tests.checkpoints import write_llama_with_demo_tokenizer
from tests.conftest import meshserve
from tests.launchers import launch_env, meshserve_command, require_tools
from tests.serving import Server

STEP_TIMEOUT = 3.0
MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("launcher-kill")
    hf = write_llama_with_demo_tokenizer(root / "hf")
    out = root / "engine"
    meshserve("build", "--model", hf, "--pp", 2, "--dtype", "float32", "--out", out, "--max-seq-len", 256,
              "--max-batch-size", 4, "--quiet")
    return out


def ranks_below(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True) if "serve" in p.cmdline()]


def assert_ranks_end(ranks: list[psutil.Process], port: int, killed_at: float) -> None:
    _, alive = psutil.wait_procs(ranks, timeout=STEP_TIMEOUT + 20)
    ended = time.monotonic()
    for p in alive:
        p.kill()
    assert not alive, f"ranks outlived their launcher: {alive}"
    assert ended - killed_at < STEP_TIMEOUT + 10
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the port is still served"


def test_sigkill_of_mpirun_ends_every_rank(engine):
    require_tools("mpirun", modules=("mpi4py",))
    server = Server(command=[*MPIRUN, "-np", 2, meshserve_command(), "serve", "--engine", engine, "--model-name", "m",
                             "--port", 0, "--step-timeout", STEP_TIMEOUT], env=launch_env())
    try:
        ranks = ranks_below(server.proc.pid)
        assert len(ranks) == 2, ranks
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        killed_at = time.monotonic()
        assert_ranks_end(ranks, urlparse(server.url).port, killed_at)
    finally:
        if server.proc.poll() is None:
            server.kill()


def test_stalled_rank_under_mpirun_ends_the_job_naming_it(engine):
    """SIGSTOP of rank 1 under mpirun: rank 0 gives up within --step-timeout, naming rank 1, and
    mpirun ends the job (the stopped rank included) with a non-zero status."""
    require_tools("mpirun", modules=("mpi4py",))
    import httpx
    server = Server(command=[*MPIRUN, "-np", 2, meshserve_command(), "serve", "--engine", engine, "--model-name", "m",
                             "--port", 0, "--step-timeout", STEP_TIMEOUT], env=launch_env())
    try:
        ranks = ranks_below(server.proc.pid)
        rank1 = [p for p in ranks if p.environ().get("OMPI_COMM_WORLD_RANK") == "1"]
        assert len(rank1) == 1, ranks
        rank1[0].send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        reply = httpx.post(server.url + "/v1/completions", timeout=60,
                           json={"model": "m", "prompt": "hello", "max_tokens": 8, "temperature": 0})
        code = server.wait(STEP_TIMEOUT + 40)
        ended = time.monotonic()
        _, alive = psutil.wait_procs(ranks, timeout=10)
    finally:
        if server.proc.poll() is None:
            server.kill()
    assert reply.status_code == 503 and "rank 1 of 2 stopped answering" in reply.json()["error"]["message"], reply.text
    assert code != 0, server.output
    assert "meshserve: error: rank 1 of 2 stopped answering" in server.output, server.output
    assert ended - stopped_at < STEP_TIMEOUT + 30
    assert not alive, alive
