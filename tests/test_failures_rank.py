"""A rank that dies mid-run (SIGKILL) stops the whole command, which exits non-zero naming that rank
and leaves no process behind: `meshserve generate` and `meshserve serve` on a real tp=2 x pp=2 engine."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from tests.checkpoints import write_llama_with_demo_tokenizer
from tests.conftest import ROOT, meshserve, write_jsonl
from tests.serving import Server

WORLD = 4


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("failing_rank")
    hf = write_llama_with_demo_tokenizer(root / "hf")
    out = root / "engine"
    meshserve("build", "--model", hf, "--tp", 2, "--pp", 2, "--dtype", "float32", "--out", out,
              "--max-seq-len", 512, "--max-batch-size", 8, "--kv-block-size", 16, "--quiet")
    return out


def rank_processes(pid: int) -> list[psutil.Process]:
    """The rank processes that `pid` started, in rank order (they start one after another)."""
    procs = [p for p in psutil.Process(pid).children() if "--multiprocessing-fork" in p.cmdline()]
    assert len(procs) == WORLD, [p.cmdline() for p in procs]
    return sorted(procs, key=lambda p: (p.create_time(), p.pid))


class Output:
    """Everything a pipe yields, read by a thread (progress bars end their lines with \\r)."""

    def __init__(self, pipe):
        self.data = b""
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe) -> None:
        while chunk := os.read(pipe.fileno(), 1 << 16):
            with self._changed:
                self.data += chunk
                self._changed.notify_all()

    def wait_for(self, text: str, timeout: float) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: text.encode() in self.data, timeout):
                raise AssertionError(f"{text!r} did not show within {timeout:.0f}s:\n{self.text}")

    @property
    def text(self) -> str:
        return self.data.decode(errors="replace")

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def assert_no_process_left(procs: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, f"left behind: {alive}"


def test_generate_stops_and_names_a_killed_rank(engine, tmp_path):
    killed = 1
    requests = write_jsonl(tmp_path / "in.jsonl", [  # far more work than happens before the kill
        {"prompt_token_ids": [5 + i, 6, 7], "max_tokens": 500, "ignore_eos": True, "temperature": 0}
        for i in range(32)])
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "meshserve", "generate", "--engine", engine,
                             "--input", requests, "--output", out], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "MESHSERVE_DEVICE": "cpu"})
    err = Output(proc.stderr)
    try:
        err.wait_for("generating", 300)  # every rank is up and the requests are in
        everything = psutil.Process(proc.pid).children(recursive=True)
        rank_processes(proc.pid)[killed].send_signal(signal.SIGKILL)
        code = proc.wait(120)
        err.join(30)
    finally:
        if proc.poll() is None:
            for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
                p.kill()
            proc.wait(30)
    assert code != 0, err.text
    assert f"meshserve: error: rank {killed} of {WORLD} exited with code -9" in err.text, err.text
    assert_no_process_left(everything)
    assert not out.exists() and not list(tmp_path.glob("out.jsonl*"))


def test_serve_stops_and_names_a_killed_rank(engine):
    killed = 3
    server = Server("--engine", engine, "--model-name", "m")
    try:
        everything = server.descendants()
        victim = rank_processes(server.proc.pid)[killed]
        health: list[int] = []
        events: list = []
        with httpx.stream("POST", server.url + "/v1/completions", timeout=120,
                          json={"model": "m", "prompt": "keep going", "max_tokens": 480, "ignore_eos": True,
                                "temperature": 0, "stream": True}) as resp:
            assert resp.status_code == 200
            try:
                for line in resp.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    events.append(line[len("data: "):])
                    if len(events) == 3:  # every rank is stepping this request
                        victim.send_signal(signal.SIGKILL)
            except httpx.HTTPError:
                pass  # the server went away mid-stream
        # /health, while the server still answers: 503 once the engine is gone, never 200 after that
        deadline = time.monotonic() + 120
        while server.proc.poll() is None and time.monotonic() < deadline:
            try:
                health.append(httpx.get(server.url + "/health", timeout=10).status_code)
            except httpx.HTTPError:
                break
            time.sleep(0.05)  # polling pace
        code = server.wait(120)
    finally:
        if server.proc.poll() is None:
            server.kill()
    assert code != 0, server.output
    assert f"meshserve: error: rank {killed} of {WORLD} exited with code -9" in server.output, server.output
    assert_no_process_left(everything)
    assert len(events) >= 3, events
    finished = [json.loads(e)["choices"][0]["finish_reason"] for e in events[3:]
                if e != "[DONE]" and "choices" in json.loads(e)]
    assert "length" not in finished, "the request finished although a rank was dead"
    if events[-1] == "[DONE]":  # the server had time to end the stream: with the engine's error
        assert "engine failed" in json.loads(events[-2])["error"]["message"], events[-2]
    assert set(health) <= {200, 503}, health
    if 503 in health:
        assert 200 not in health[health.index(503):], health
