"""Signals and failures an operator meets, on real processes: a terminal's hangup (SIGHUP) stops the
command as SIGTERM does and leaves the ranks to it; ranks spawned here survive a Ctrl-C or hangup
while they still import (no traceback from each); a rank killed by a signal is named with the
signal; the rank whose own error brought the mesh down is named, not the peer that only lost it;
rank 0 of an LLM whose owner went away stops quietly; a request to an engine that is gone is refused
as such (503, no traceback); a follower rank's SIGTERM reaches the open streams within a second or so."""
from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import signal
import threading
import time
from types import SimpleNamespace

import pytest

from meshserve.errors import UserError
from tests.serving import Server, build_small_engine

# A follower's SIGTERM used to reach the streams after ~5.5 s (rank 0, waiting on it in a shared-memory
# all-reduce, was killed only after local_spawn's stop grace); now after ~0.5 s. The bound leaves room
# for a loaded machine.
FOLLOWER_FAILURE_BOUND_S = 3.0


def _report_signals(env, folder: str) -> None:
    """A rank's program: wait a little (the test signals the ranks meanwhile), then write down how
    this rank handles SIGINT and SIGHUP."""
    time.sleep(1.0)
    ignored = [s.name for s in (signal.SIGINT, signal.SIGHUP) if signal.getsignal(s) == signal.SIG_IGN]
    with open(os.path.join(folder, f"rank{env.rank}"), "w") as f:
        f.write(" ".join(ignored))


def test_spawned_ranks_survive_ctrl_c_and_hangup_while_starting(tmp_path, capfd):
    from meshserve.launch.local_spawn import LocalRanks
    ranks = LocalRanks(2, _report_signals, str(tmp_path))
    try:
        for p in ranks.procs:  # at once: the ranks are still importing
            os.kill(p.pid, signal.SIGINT)
            os.kill(p.pid, signal.SIGHUP)
        assert ranks.join(60)
        codes = [p.exitcode for p in ranks.procs]
    finally:
        ranks.stop()
    err = capfd.readouterr().err
    assert codes == [0, 0], (codes, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    # then rank 0 acts on Ctrl-C, the others follow it; the hangup is the parent's to act on
    assert (tmp_path / "rank0").read_text() == "SIGHUP"
    assert (tmp_path / "rank1").read_text() == "SIGINT SIGHUP"


def test_hangup_stops_the_command_as_sigterm_does(monkeypatch):
    from meshserve.launch import launched
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    got = []
    try:
        signal.signal(signal.SIGHUP, lambda *_: got.append("SIGHUP left as it was"))  # (not Python's default: death)
        launched.enter("serve")
        signal.signal(signal.SIGTERM, lambda *_: got.append("SIGTERM"))  # as a server's drain handler would
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert got == ["SIGTERM"]


@pytest.mark.parametrize("code, said", [
    (-9, "rank 1 of 2 exited with code -9 (killed by SIGKILL)"),
    (-1, "rank 1 of 2 exited with code -1 (killed by SIGHUP)"),
    (-7, "rank 1 of 2 exited with code -7 (killed by SIGBUS: a rank file was truncated or overwritten while in use"),
    (130, "rank 1 of 2 exited with code 130 (interrupted)"),
    (2, "rank 1 of 2 exited with code 2 (its error is above)"),
])
def test_a_rank_killed_by_a_signal_is_named_with_it(code, said):
    from meshserve.launch.local_spawn import rank_failed
    err = rank_failed(1, 2, code)
    assert str(err).startswith(said), err
    assert err.code == code


def _fail_in_order(env) -> None:
    """Rank 0 loses its peer at once; rank 1, whose own error it is, takes a while to exit."""
    if env.rank == 0:
        raise RuntimeError("Connection closed by peer [127.0.0.1]:1")
    time.sleep(1.5)
    raise UserError("cannot load the weights from rank1.safetensors")


def test_the_rank_that_failed_first_is_named_not_the_peer_that_lost_it(capfd):
    from meshserve.launch.local_spawn import LocalRanks
    from meshserve.orchestrator.linked_engine import settled_failure
    ranks = LocalRanks(2, _fail_in_order)
    try:
        ranks.procs[0].join(60)  # rank 0 has closed the link: the front end asks why
        failure = settled_failure(ranks)
    finally:
        ranks.stop()
    assert str(failure).startswith("rank 1 of 2 exited with code 2"), failure
    assert "cannot load the weights from rank1.safetensors" in capfd.readouterr().err


def test_rank0_stops_quietly_when_its_llm_goes_away():
    from meshserve.orchestrator.engine_channel import serve_channel
    drained = []
    loop = SimpleNamespace(has_work=lambda: False, drain=lambda: drained.append(True))
    front, rank0 = mp.Pipe()
    front.close()  # an LLM garbage-collected without close(), or its process gone
    serve_channel(rank0, loop)
    assert drained == [True]


def test_a_request_to_an_engine_that_is_gone_is_refused_as_such():
    """EngineGone (503, one log line), not a RuntimeError (500 and a traceback)."""
    from meshserve.orchestrator.api_server import EngineGone
    from meshserve.orchestrator.engine_client import MeshEngineClient
    from meshserve.orchestrator.linked_engine import LinkedEngine
    from meshserve.orchestrator.sampling_params import SamplingParams
    from meshserve.workers.runtime.watchdog import FaultTimeouts
    mesh = MeshEngineClient(SimpleNamespace(tokenizer=None, meta=SimpleNamespace(max_seq_len=8)),
                            timeouts=FaultTimeouts())
    linked = LinkedEngine.__new__(LinkedEngine)  # the state a failure for good leaves
    linked._lock, linked.error = threading.Lock(), UserError("rank 1 of 2 exited with code -9 (killed by SIGKILL)")

    async def generate(engine):
        async for _ in engine.generate([1, 2], SamplingParams(max_tokens=1)):
            pass

    async def generate_group(engine):
        engine.generate_group([1, 2], [SamplingParams(max_tokens=1)])

    for engine in (mesh, linked):
        for call in (generate, generate_group):
            with pytest.raises(EngineGone, match="the engine is not running"):
                asyncio.run(call(engine))


@pytest.fixture(scope="module")
def tp2_engine(tmp_path_factory):
    """tp=2: rank 0 waits on rank 1 in a shared-memory all-reduce, which notices no dead peer."""
    return build_small_engine(tmp_path_factory.mktemp("signals"), tp=2, max_seq_len=4096)


def test_sigterm_to_a_follower_rank_reaches_open_streams_at_once(tp2_engine):
    import httpx
    import psutil
    server = Server("--engine", tp2_engine, "--model-name", "m")
    events: list[tuple[float, str]] = []
    flowing = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", server.url + "/v1/completions", timeout=120,
                          json={"model": "m", "prompt": "keep going", "max_tokens": 4000, "ignore_eos": True,
                                "temperature": 0, "stream": True}) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append((time.monotonic(), line[len("data: "):]))
                    if len(events) >= 4:  # every rank is stepping this request
                        flowing.set()
        flowing.set()

    try:
        everything = server.descendants()
        ranks = sorted((p for p in everything if "--multiprocessing-fork" in p.cmdline()),
                       key=lambda p: (p.create_time(), p.pid))
        assert len(ranks) == 2, ranks
        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        assert flowing.wait(60)
        before = len(events)
        signalled = time.monotonic()
        ranks[1].send_signal(signal.SIGTERM)
        reader.join(60)
        assert not reader.is_alive(), "the stream did not end"
        code = server.wait(60)
    finally:
        if server.proc.poll() is None:
            server.kill()
    failed = [(at, e) for at, e in events if e != "[DONE]" and "error" in json.loads(e)]
    assert not [e for at, e in events[:before] if "error" in e], "a stream failed before any rank did"
    assert len(failed) == 1 and events[-1][1] == "[DONE]", events[-3:]
    at, event = failed[0]
    assert "rank 1 of 2 exited with code -15 (killed by SIGTERM)" in json.loads(event)["error"]["message"], event
    assert at - signalled < FOLLOWER_FAILURE_BOUND_S, f"the stream heard of it after {at - signalled:.1f}s"
    assert code == 2, server.output
    assert "meshserve: error: rank 1 of 2 exited with code -15 (killed by SIGTERM)" in server.output, server.output
    _, alive = psutil.wait_procs(everything, timeout=30)
    assert not alive, f"left behind: {alive}"
