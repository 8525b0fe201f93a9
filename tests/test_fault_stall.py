"""A rank that stops (SIGSTOP) without dying: the server notices within the step timeout instead of
waiting on gloo for minutes, fails the open request with an error that names the rank, turns /health
and /ready to 503 and exits non-zero naming it, leaving no process behind; a stopped rank 0 makes the
other ranks exit within the same timeout. A real tp=1 x pp=2 engine, `--step-timeout 3`."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import psutil
import pytest

from tests.checkpoints import write_llama_with_demo_tokenizer
from tests.conftest import meshserve
from tests.serving import Server

STEP_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("stall")
    hf = write_llama_with_demo_tokenizer(root / "hf")
    out = root / "engine"
    meshserve("build", "--model", hf, "--pp", 2, "--dtype", "float32", "--out", out, "--max-seq-len", 512,
              "--max-batch-size", 4, "--kv-block-size", 16, "--quiet")
    return out


def ranks_of(server: Server) -> list[psutil.Process]:
    procs = [p for p in psutil.Process(server.proc.pid).children() if "--multiprocessing-fork" in p.cmdline()]
    assert len(procs) == 2, [p.cmdline() for p in procs]
    return sorted(procs, key=lambda p: (p.create_time(), p.pid))


class Poller:
    """GET `path` every 0.1 s on a thread: (seconds since start, status or None when refused)."""

    def __init__(self, url: str, path: str):
        self.seen: list[tuple[float, int | None]] = []
        self._stop = threading.Event()
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._run, args=(url + path,), daemon=True)
        self._thread.start()

    def _run(self, url: str) -> None:
        while not self._stop.is_set():
            try:
                status = httpx.get(url, timeout=2).status_code
            except httpx.HTTPError:
                status = None
            self.seen.append((time.monotonic() - self._start, status))
            self._stop.wait(0.1)

    def stop(self) -> list[int | None]:
        self._stop.set()
        self._thread.join(10)
        return [s for _, s in self.seen]


def assert_turns_unavailable(statuses: list[int | None]) -> None:
    """200 first, then 503 (or no answer once the server is gone), never 200 again."""
    assert statuses and statuses[0] == 200, statuses
    first_bad = next(i for i, s in enumerate(statuses) if s != 200)
    assert 200 not in statuses[first_bad:], statuses


def test_stalled_rank_fails_requests_and_is_named(engine):
    server = Server("--engine", engine, "--model-name", "m", "--step-timeout", STEP_TIMEOUT)
    try:
        everything = server.descendants()
        victim = ranks_of(server)[1]
        assert httpx.get(server.url + "/ready", timeout=10).status_code == 200
        health, ready = Poller(server.url, "/health"), Poller(server.url, "/ready")
        events, stopped_at, error_at = [], None, None
        with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                          json={"model": "m", "prompt": "keep going", "max_tokens": 480, "ignore_eos": True,
                                "temperature": 0, "stream": True}) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[len("data: "):])
                if len(events) == 3:
                    victim.send_signal(signal.SIGSTOP)
                    stopped_at = time.monotonic()
                if error_at is None and '"error"' in events[-1]:
                    error_at = time.monotonic()
        code = server.wait(60)
        exited_at = time.monotonic()
        health_seen, ready_seen = health.stop(), ready.stop()
    finally:
        if server.proc.poll() is None:
            server.kill()
    assert code != 0, server.output
    # the stream ends with an error that names the stopped rank, then [DONE]
    assert events[-1] == "[DONE]", events[-3:]
    message = json.loads(events[-2])["error"]["message"]
    assert "rank 1 of 2 stopped answering" in message, message
    assert error_at is not None and error_at - stopped_at < STEP_TIMEOUT + 10, (error_at - stopped_at)
    assert exited_at - stopped_at < STEP_TIMEOUT + 30  # not gloo's 600 s
    assert "meshserve: error: rank 1 of 2 stopped answering" in server.output, server.output
    assert "gave up on a stalled or lost peer" in server.output, server.output
    assert "Traceback" not in server.output, server.output
    assert_turns_unavailable(health_seen)
    assert_turns_unavailable(ready_seen)
    _, alive = psutil.wait_procs(everything, timeout=30)
    assert not alive, f"left behind: {alive}"


def test_stalled_rank0_makes_the_other_ranks_exit(engine):
    server = Server("--engine", engine, "--model-name", "m", "--step-timeout", STEP_TIMEOUT)
    try:
        everything = server.descendants()
        rank0, rank1 = ranks_of(server)
        rank0.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        rank1.wait(STEP_TIMEOUT + 20)  # (its exit code is its parent's to read: the line below checks it)
        rank1_gone_at = time.monotonic()
        code = server.wait(60)
        exited_at = time.monotonic()
    except psutil.TimeoutExpired:
        raise AssertionError(f"rank 1 did not exit:\n{server.output}") from None
    finally:
        if server.proc.poll() is None:
            server.kill()
    assert code != 0, server.output
    assert rank1_gone_at - stopped_at < STEP_TIMEOUT + 10
    assert exited_at - stopped_at < STEP_TIMEOUT + 30
    assert "rank 1 of 2 gave up on a stalled or lost peer (exit code 3" in server.output, server.output
    assert "meshserve: error: rank 1 of 2: rank 0 of 2 stopped answering" in server.output, server.output
    _, alive = psutil.wait_procs(everything, timeout=30)
    assert not alive, f"left behind: {alive}"
