"""`meshserve serve --restart-on-failure N` on a real tp=2 engine: a rank killed (SIGKILL) under load
restarts the mesh and every greedy request completes with the text it has without a failure, streamed
or not, queued or half done; an unseeded sampled stream that had tokens ends with an error that says
why; /metrics counts the restart; once the restarts are spent, the next failure ends the server
naming the rank, as without the option."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import openai
import psutil
import pytest

from tests.conftest import meshserve
from tests.serving import Server, build_small_engine

WORLD = 2


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return build_small_engine(tmp_path_factory.mktemp("restart"), tp=WORLD)


def ranks_of(server: Server) -> list[psutil.Process]:
    procs = [p for p in psutil.Process(server.proc.pid).children() if "--multiprocessing-fork" in p.cmdline()]
    live = [p for p in procs if p.status() != psutil.STATUS_ZOMBIE]
    assert len(live) == WORLD, [p.cmdline() for p in live]
    return sorted(live, key=lambda p: (p.create_time(), p.pid))


def restarts(url: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("meshserve_engine_restarts_total "):
            return float(line.split()[1])
    raise AssertionError("no meshserve_engine_restarts_total in /metrics")


def stream_completion(url: str, body: dict, on_chunk=None) -> tuple[str, str | None]:
    """(text, error message or None) of a streamed completion."""
    text, error, chunks = "", None, 0
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=300) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                error = event["error"]["message"]
                continue
            text += event["choices"][0]["text"]
            chunks += 1
            if on_chunk is not None:
                on_chunk(chunks)
    return text, error


def test_a_killed_rank_restarts_the_mesh_and_no_request_is_lost(engine):
    server = Server("--engine", engine, "--model-name", "m", "--restart-on-failure", 1)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        greedy = {"model": "m", "max_tokens": 160, "temperature": 0, "ignore_eos": True}
        prompts = [f"request {i} goes on and on" for i in range(6)]
        expected = [client.completions.create(prompt=p, **{k: v for k, v in greedy.items() if k != "ignore_eos"},
                                              extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
        assert len(set(expected)) > 1, expected  # the prompts lead to different texts: a mix-up would show

        first_ranks = ranks_of(server)
        killed = threading.Event()

        def kill_once(chunks: int) -> None:
            if chunks == 8 and not killed.is_set():
                first_ranks[1].send_signal(signal.SIGKILL)
                killed.set()

        results: dict[int, tuple[str, str | None]] = {}

        def run(i: int) -> None:
            body = {**greedy, "prompt": prompts[i]}
            if i % 2 == 0:  # streamed; request 0 kills rank 1 once it has 8 chunks
                results[i] = stream_completion(server.url, body, kill_once if i == 0 else None)
            else:
                reply = httpx.post(server.url + "/v1/completions", json=body, timeout=300)
                results[i] = (reply.json()["choices"][0]["text"], None) if reply.status_code == 200 \
                    else ("", reply.text)

        sampled: dict = {}

        def run_sampled() -> None:
            sampled["result"] = stream_completion(server.url, {"model": "m", "prompt": "free", "max_tokens": 160,
                                                               "temperature": 1.0, "ignore_eos": True})

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        threads.append(threading.Thread(target=run_sampled))
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert killed.is_set(), "the first stream ended before the kill"
        for i, want in enumerate(expected):
            got, error = results[i]
            assert error is None and got == want, (i, error, got, want)
        text, error = sampled["result"]
        if error is not None:  # it had tokens when the rank died: it cannot be regenerated
            assert "not seeded" in error, error
        assert restarts(server.url) == 1
        assert "restarting the engine (restart 1 of 1)" in server.output, server.output
        assert "rank 1 of 2 exited with code -9" in server.output, server.output
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        # the restarts are spent: the next failure ends the server, naming the rank
        everything = server.descendants()
        ranks_of(server)[0].send_signal(signal.SIGKILL)
        code = server.wait(120)
    finally:
        if server.proc.poll() is None:
            server.kill()
    assert code != 0, server.output
    assert "meshserve: error: rank 0 of 2 exited with code -9" in server.output, server.output
    _, alive = psutil.wait_procs(everything, timeout=30)
    assert not alive, f"left behind: {alive}"


def test_restart_on_failure_is_refused_under_a_launcher_and_below_zero(tmp_path):
    proc = meshserve("serve", "--engine", tmp_path, "--restart-on-failure", -1, check=False)
    assert proc.returncode == 2 and "--restart-on-failure=-1 is not allowed" in proc.stderr, proc.stderr
    started = time.monotonic()
    proc = meshserve("serve", "--engine", tmp_path, "--restart-on-failure", 1, check=False,
                     env={"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "0"})
    assert proc.returncode == 2 and "launcher's own restart policy" in proc.stderr, proc.stderr
    assert time.monotonic() - started < 60
