"""Stopping `meshserve serve` (a real tp=1 x pp=2 engine): SIGTERM drains (new requests get 503,
/health and /ready answer 503, requests in progress finish until --drain-timeout, the rest end with an
error event and `data: [DONE]`, exit 0, no traceback); SIGKILL of the supervisor takes every rank with
it at once, freeing the port."""
from __future__ import annotations

import json
import signal
import socket
import threading
import time
from urllib.parse import urlparse

import httpx
import psutil
import pytest

from tests.serving import Server, build_small_engine

DRAIN = 3.0


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return build_small_engine(tmp_path_factory.mktemp("shutdown"), pp=2, max_seq_len=4096)


class Stream:
    """A streamed completion read on a thread: its `data:` payloads."""

    def __init__(self, url: str, max_tokens: int):
        self.events: list[str] = []
        self.status: int | None = None
        self.first = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, max_tokens), daemon=True)
        self._thread.start()

    def _run(self, url: str, max_tokens: int) -> None:
        with httpx.stream("POST", url + "/v1/completions", timeout=120,
                          json={"model": "m", "prompt": "keep going", "max_tokens": max_tokens, "ignore_eos": True,
                                "temperature": 0, "stream": True}) as resp:
            self.status = resp.status_code
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line[len("data: "):])
                    self.first.set()
        self.first.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream did not end"

    def finish_reasons(self) -> list[str]:
        return [c["finish_reason"] for e in self.events if e != "[DONE]" and "choices" in json.loads(e)
                for c in json.loads(e)["choices"] if c.get("finish_reason")]


def test_sigterm_drains_then_ends_what_is_left(engine):
    server = Server("--engine", engine, "--model-name", "m", "--drain-timeout", DRAIN)
    try:
        everything = server.descendants()
        long = Stream(server.url, 4000)   # tens of seconds on CPU: cannot finish within the drain
        assert long.first.wait(60)
        short = Stream(server.url, 8)
        assert short.first.wait(60)
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # while draining: /health and /ready answer 503, a new request gets 503
        deadline = time.monotonic() + 10
        while httpx.get(server.url + "/health", timeout=5).status_code == 200:
            assert time.monotonic() < deadline, "/health stayed 200 after SIGTERM"
            time.sleep(0.05)
        health = httpx.get(server.url + "/health", timeout=5)
        ready = httpx.get(server.url + "/ready", timeout=5)
        refused = httpx.post(server.url + "/v1/completions", timeout=10,
                             json={"model": "m", "prompt": "hi", "max_tokens": 2})
        long.join(DRAIN + 30)
        ended = time.monotonic()
        short.join(10)
        code = server.wait(60)
    finally:
        if server.proc.poll() is None:
            server.kill()
    assert (health.status_code, health.json()) == (503, {"status": "draining"})
    assert ready.status_code == 503
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"], refused.text
    # the short request finished normally; the long one was ended at the deadline with an error, then [DONE]
    assert short.finish_reasons() == ["length"] and short.events[-1] == "[DONE]", short.events[-3:]
    assert long.events[-1] == "[DONE]", long.events[-3:]
    assert "drain timeout (3s)" in json.loads(long.events[-2])["error"]["message"], long.events[-2]
    assert "length" not in long.finish_reasons()
    assert DRAIN - 1 < ended - signalled < DRAIN + 10
    assert code == 0, server.output
    assert "Traceback" not in server.output, server.output
    assert "ended 1 request(s) still in progress" in server.output, server.output
    _, alive = psutil.wait_procs(everything, timeout=30)
    assert not alive, f"left behind: {alive}"


def test_sigkill_of_the_supervisor_takes_every_rank(engine):
    server = Server("--engine", engine, "--model-name", "m")
    ranks = server.descendants()
    port = urlparse(server.url).port
    try:
        assert len([p for p in ranks if "--multiprocessing-fork" in p.cmdline()]) == 2
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        killed = time.monotonic()
        _, alive = psutil.wait_procs(ranks, timeout=10)
        gone = time.monotonic()
    finally:
        for p in ranks:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    assert not alive, f"outlived their supervisor: {alive}"
    assert gone - killed < 5
    with socket.socket() as s:  # nothing listens on the port any more
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_ready_and_health_follow_the_server_state():
    """/ready: 503 until the server accepts connections, 200 while it takes requests, 503 while
    stopping or once the engine is gone; /health (liveness) is 503 only while stopping or failed."""
    from fastapi.testclient import TestClient

    from meshserve.orchestrator.api_server import build_app
    from meshserve.orchestrator.metrics import ServerMetrics

    class Engine:
        tokenizer, max_seq_len, alive = None, 64, True

        def is_alive(self):
            return self.alive

    engine = Engine()
    app = build_app(engine, "m", ServerMetrics())
    with TestClient(app) as http:
        def states():
            return http.get("/health").status_code, http.get("/ready").status_code
        assert states() == (200, 503)  # not serving yet
        app.state.serving = True
        assert states() == (200, 200)
        app.state.api.draining = True
        assert states() == (503, 503)
        assert http.get("/ready").json() == {"status": "draining"}
        refused = http.post("/v1/completions", json={"model": "m", "prompt": [1, 2], "max_tokens": 1})
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        app.state.api.draining, engine.alive = False, False
        assert states() == (503, 503)


def test_ctrl_c_while_the_ranks_load_is_an_interrupt_not_a_clean_exit(engine):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while the ranks still load:
    the server never served, so it exits 130 saying "interrupted", with no traceback and no rank left."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT
    proc = subprocess.Popen([sys.executable, "-m", "meshserve", "serve", "--engine", str(engine), "--port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "MESHSERVE_DEVICE": "cpu"})
    ranks: list = []
    try:
        deadline = time.monotonic() + 60
        while len(ranks) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            ranks = [p for p in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert len(ranks) == 2, out
    assert proc.returncode == 130, out
    assert "meshserve: interrupted" in out and "serving on" not in out, out
    assert "Traceback" not in out, out
    _, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive, f"left behind: {alive}"
