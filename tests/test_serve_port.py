"""A taken HTTP port ends `meshserve serve` at once (exit code 2, a line that names the address and
--port), before any rank starts: not once the engine has loaded, minutes later on a big model."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import psutil
import pytest

from meshserve.errors import UserError
from tests.conftest import ROOT
from tests.serving import build_small_engine


@pytest.fixture
def taken_port():
    """A port another process (here: this test) listens on."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield busy.getsockname()[1]


def test_the_check_names_the_address_and_the_fix(taken_port):
    from meshserve.orchestrator.listen_check import check_listen_address
    with pytest.raises(UserError) as caught:
        check_listen_address("127.0.0.1", taken_port)
    said = str(caught.value)
    assert said.startswith(f"cannot listen on 127.0.0.1:{taken_port} (another process is listening there)"), said
    assert "--port" in said, said
    with pytest.raises(UserError, match=r"^cannot listen on 203\.0\.113\.1:8000 \(Cannot assign requested "
                                         r"address\); pick another --port \(0 picks a free one\) or --host"):
        check_listen_address("203.0.113.1", 8000)  # an address of no interface here (TEST-NET-3)


def test_a_free_port_passes_and_stays_free():
    from meshserve.orchestrator.listen_check import check_listen_address
    check_listen_address("127.0.0.1", 0)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    check_listen_address("127.0.0.1", port)
    with socket.socket() as server:  # the check let it go: the server binds it as uvicorn would
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()


def test_serve_on_a_taken_port_fails_before_any_rank_starts(tmp_path, taken_port):
    engine = build_small_engine(tmp_path, tp=2)
    for rank in (0, 1):  # a rank that started would fail on these with an error of its own
        (engine / f"rank{rank}.safetensors").write_bytes(b"not a rank file")
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "meshserve", "serve", "--engine", str(engine), "--port",
                             str(taken_port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "MESHSERVE_DEVICE": "cpu"})
    children: set = set()
    try:
        while proc.poll() is None and time.monotonic() - started < 120:
            try:
                children.update(p.pid for p in psutil.Process(proc.pid).children())
            except psutil.NoSuchProcess:
                break
            time.sleep(0.01)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == 2, out
    assert f"meshserve: error: cannot listen on 127.0.0.1:{taken_port} (another process is listening there); " \
           "pick another --port" in out, out
    assert "rank" not in out and "Traceback" not in out, out
    assert not children, f"ranks were started: {children}"
