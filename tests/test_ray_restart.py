"""`meshserve serve --launcher ray --restart-on-failure 1` on a real tp=2 engine and a private local Ray
cluster: the meshserve process is the Ray driver and the HTTP front end, the ranks are Ray actors,
rank 0 linked to the front end over TCP. A rank's process killed (SIGKILL) under load: the actors are
started again in the same placement, every greedy request, streamed or not, completes with exactly
the text it has without the failure, and /metrics counts the restart. Once the restarts are spent,
the next failure ends the server naming the rank, and no Ray process is left. SIGTERM to the driver
lets the requests in flight finish, then exits 0, leaving nothing behind."""
from __future__ import annotations

import contextlib
import re
import signal
import threading
import time

import httpx
import openai
import psutil
import pytest

from tests.launchers import wait_gone
from tests.ray_cluster import cleanup, meshserve_process, private_env, rank_process, ray_root, require_ray
from tests.serving import build_small_engine

WORLD = 2
SERVING = r"^meshserve: serving on (http://[A-Za-z0-9_.\-\[\]:]+)"
MAX_TOKENS = 160


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    require_ray()
    return build_small_engine(tmp_path_factory.mktemp("ray-restart"), tp=WORLD)


def restarts(url: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("meshserve_engine_restarts_total "):
            return float(line.split()[1])
    raise AssertionError("no meshserve_engine_restarts_total in /metrics")


def complete(client: openai.OpenAI, prompt: str, stream: bool, on_chunk=None) -> str:
    """The greedy completion of `prompt` (streamed or not) through the official client."""
    reply = client.completions.create(model="m", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=stream,
                                      extra_body={"ignore_eos": True})
    if not stream:
        return reply.choices[0].text
    text = ""
    for n, chunk in enumerate(reply, 1):
        text += "".join(c.text for c in chunk.choices)
        if on_chunk is not None:
            on_chunk(n)
    return text


@contextlib.contextmanager
def ray_front_end(engine, times: int):
    """`meshserve serve --launcher ray --restart-on-failure TIMES` on a private cluster, serving:
    yields (process, its output, the cluster's root folder, the URL, an openai client); cleans up after."""
    with ray_root() as root:
        proc, output = meshserve_process(["serve", "--engine", engine, "--model-name", "m", "--launcher", "ray",
                                          "--restart-on-failure", times, "--port", 0], private_env(root))
        with cleanup(proc, root):
            url = output.wait_for(SERVING, timeout=180).group(1)
            yield proc, output, root, url, openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=180)


def test_a_killed_rank_actor_restarts_the_mesh_and_no_request_is_lost(engine):
    with ray_front_end(engine, 1) as (proc, output, root, url, client):
        prompts = [f"request {i} goes on and on" for i in range(6)]
        expected = [complete(client, p, stream=False) for p in prompts]
        assert len(set(expected)) > 1, expected  # the prompts lead to different texts: a mix-up would show

        tree = psutil.Process(proc.pid).children(recursive=True)
        rank1 = rank_process(tree, engine, 1)
        killed = threading.Event()

        def kill_once(chunks: int) -> None:
            if chunks == 8 and not killed.is_set():
                rank1.kill()  # SIGKILL of rank 1's actor process, requests in flight
                killed.set()

        results: dict[int, str | BaseException] = {}

        def run(i: int) -> None:
            try:  # requests 0, 2, 4 stream; request 0 kills rank 1 once it has 8 chunks
                results[i] = complete(client, prompts[i], i % 2 == 0, kill_once if i == 0 else None)
            except BaseException as err:  # noqa: BLE001 - reported below
                results[i] = err

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
        assert killed.is_set(), "the first stream ended before the kill"
        for i, want in enumerate(expected):
            assert results.get(i) == want, (i, results.get(i), want, output.text())
        assert restarts(url) == 1
        text = output.text()
        resent = re.search(r"rank 1 of 2 failed: its Ray actor died .*; restarting the engine \(restart 1 of 1\); "
                           r"(\d+) request\(s\) will be sent again", text)
        assert resent and int(resent.group(1)) > 0, text  # the kill came with requests in flight
        assert complete(client, prompts[0], stream=True) == expected[0]  # the new mesh serves as the first did

        # the restarts are spent: the next failure ends the server, naming the rank
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert rank1 not in tree
        rank_process(tree, engine, 0).kill()
        started = time.monotonic()
        assert output.wait_exit(120) == 2, output.text()
        assert time.monotonic() - started < 60, output.text()
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert alive == [] and wait_gone(str(root), 30) == [], output.text()
    errors = [line for line in output.text().splitlines() if line.startswith("meshserve: error:")]
    assert len(errors) == 1 and errors[0].startswith("meshserve: error: rank 0 of 2 failed: its Ray actor died"), \
        output.text()


def test_sigterm_drains_the_open_requests_and_leaves_nothing(engine):
    """SIGTERM to the driver: the stream in flight finishes, the server exits 0, and every actor and
    Ray daemon is gone."""
    with ray_front_end(engine, 2) as (proc, output, root, url, client):
        tree = psutil.Process(proc.pid).children(recursive=True)
        stopping = threading.Event()

        def stop_once(chunks: int) -> None:
            if chunks == 4 and not stopping.is_set():
                proc.send_signal(signal.SIGTERM)
                stopping.set()

        want = complete(client, "a stream in flight", stream=False)
        assert complete(client, "a stream in flight", stream=True, on_chunk=stop_once) == want
        assert stopping.is_set()
        assert output.wait_exit(90) == 0, output.text()
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert alive == [] and wait_gone(str(root), 30) == [], output.text()
    assert "meshserve: error" not in output.text() and "restarting" not in output.text(), output.text()
