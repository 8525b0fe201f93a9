"""The front end's engine when `meshserve serve` starts the ranks itself: the HTTP server, tokenizer
and detokenizer run in this process, the ranks elsewhere, and rank 0's engine is reached over a link
(engine_link.py has the message schema). Implements api_server.EngineClient. Two ways to start the
ranks: local_link (child processes of this one, a pipe) and ray_link (Ray actors of a
launch.ray_launcher.RayMesh, with this process as the Ray driver; rank 0 connects back over TCP).
Either gives a connection and a "ranks" object: LocalRanks or RayRanks, which both answer
`sentinels` (ready for multiprocessing.connection.wait once a rank has ended), failure(),
failed_alone(), join(timeout) and stop().

One reader thread takes rank 0's records and puts each token straight on its request's asyncio queue;
one sender thread writes requests and aborts, so no HTTP handler ever blocks on the pipe.

Restart on failure (`restarts` > 0): when a rank dies or the mesh stalls, the ranks are stopped and
started again, and every unfinished request is sent again. One that had not had a token yet never
notices. One that had, and whose tokens are reproducible (greedy, or seeded), is regenerated: the
tokens already handed over are checked against the new ones and held back, and the request goes on
from where it was; if they differ, or its sampling is unseeded, it ends with an error that says so.
Requests that arrive meanwhile wait. Once the restarts are spent, a failure ends every request and
`on_failure` is called, as without restarts.
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import queue
import signal
import sys
import threading
from dataclasses import asdict
from multiprocessing.connection import wait

from meshserve.errors import UserError
from meshserve.orchestrator.api_server import EngineGone, TokenEvent
from meshserve.orchestrator.engine_client import StreamEvents, stream_events
from meshserve.orchestrator.engine_link import rejection
from meshserve.orchestrator.engine_loop import check_prompt
from meshserve.orchestrator.sampling_params import SamplingParams

# After a rank failed, what the others get between SIGTERM and SIGKILL: a broken mesh has nothing left to
# finish, and a rank that waits on the dead one in the shared-memory all-reduce never reaches its handler.
FAILED_MESH_GRACE_S = 1.0

class _Open:
    def __init__(self, loop: asyncio.AbstractEventLoop, prompt_ids: list[int], params: SamplingParams):
        self.loop, self.queue = loop, asyncio.Queue()
        self.prompt_ids, self.params = prompt_ids, params
        self.id = -1
        self.sent: list[int] = []   # token ids already handed over
        self.replayed = 0           # after a restart: how many of `sent` the new run has matched
        self.done = False

    @property
    def reproducible(self) -> bool:
        return self.params.temperature == 0 or self.params.seed is not None

    def push(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class LinkedEngine:
    def __init__(self, engine_dir: str, meta, limits=None, metrics=None, restarts: int = 0, on_failure=None,
                 start_ranks=None):
        """start_ranks(engine_dir, limits) -> (connection, ranks): starts the ranks (again); default:
        local_link(meta.world_size)."""
        from meshserve.orchestrator.tokenizer import Tokenizer
        self.engine_dir, self.meta, self.limits, self.metrics = engine_dir, meta, limits, metrics
        self._start_ranks = start_ranks or local_link(meta.world_size)
        self.tokenizer = Tokenizer(meta.dir)
        self.max_seq_len = meta.max_seq_len
        self.restarts_left, self.restarts = restarts, 0
        self.on_failure = on_failure
        self.error: BaseException | None = None
        self._lock = threading.Lock()       # _streams, _ready, _generation
        self._streams: dict[int, _Open] = {}
        self._next_id = 0
        self._ready = False
        self._generation = 0                # which link a queued message was meant for
        self._closing = False
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._conn = self._ranks = None
        self._failed_note: str | None = None  # rank 0's own account of a failure
        self._started = threading.Event()

    # ---- life cycle (main thread) ---------------------------------------------------------------
    def start(self) -> None:
        """Start the ranks and return once the mesh takes requests; raise the rank's error if it
        cannot come up (no restart for a mesh that never started)."""
        self._launch()
        threading.Thread(target=self._read, name="meshserve-link-reader", daemon=True).start()
        threading.Thread(target=self._send_loop, name="meshserve-link-sender", daemon=True).start()
        self._started.wait()
        if self.error is not None:
            raise self.error

    def stop(self, timeout: float = 60.0) -> None:
        """Close the link (rank 0 drains, then stops every rank) and wait for the ranks; raise the
        engine's error if it failed."""
        with self._lock:
            self._closing = True
            ranks = self._ranks
        if self.error is None and self._ready:
            self._outbox.put((self._generation, {"op": "close"}))
            if not ranks.join(timeout):
                ranks.stop()
        elif ranks is not None:  # still loading (a stop during start-up), or failed
            ranks.stop()
        self._outbox.put(None)
        if self.error is not None:
            raise self.error

    # ---- api_server.EngineClient ------------------------------------------------------------------
    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        check_prompt(self.meta, prompt_ids, params)

    def is_alive(self) -> bool:
        return self.error is None

    async def generate(self, prompt_ids: list[int], params: SamplingParams):
        stream = _Open(asyncio.get_running_loop(), list(prompt_ids), params)
        with self._lock:  # (a failure for good takes the lock to end every stream it knows)
            if self.error is not None:
                raise EngineGone(f"the engine is not running ({self.error})")
            stream.id, self._next_id = self._next_id, self._next_id + 1
            self._streams[stream.id] = stream
            if self._ready:
                self._post_add(stream)
        try:
            async for item in stream_events(stream):
                yield item
        finally:
            if not stream.done:  # the client went away: free its KV blocks
                self._abort(stream)

    def generate_group(self, prompt_ids: list[int], params: list[SamplingParams]) -> list[StreamEvents]:
        """Several requests of one prompt (the choices of a request), sent in one message so that
        rank 0's engine takes them in one go: the first prefills the prompt, the others fork off it.
        One event iterator per request, in order; closing one aborts its request."""
        loop = asyncio.get_running_loop()
        streams = [_Open(loop, list(prompt_ids), p) for p in params]
        with self._lock:
            if self.error is not None:
                raise EngineGone(f"the engine is not running ({self.error})")
            for stream in streams:
                stream.id, self._next_id = self._next_id, self._next_id + 1
                self._streams[stream.id] = stream
            if self._ready:
                self._outbox.put((self._generation, {
                    "op": "add_group", "prompt_ids": list(prompt_ids),
                    "requests": [{"id": s.id, "params": asdict(s.params)} for s in streams]}))
        return [StreamEvents(s, self._abort) for s in streams]

    def _abort(self, stream: _Open) -> None:
        with self._lock:
            if self._streams.pop(stream.id, None) is not None and self._ready:
                self._outbox.put((self._generation, {"op": "abort", "id": stream.id}))

    # ---- the link ---------------------------------------------------------------------------------
    def _launch(self) -> None:
        conn, ranks = self._start_ranks(self.engine_dir, self.limits)
        with self._lock:
            self._conn, self._ranks = conn, ranks
            self._generation += 1
        self._failed_note = None

    def _post_add(self, stream: _Open) -> None:
        """Queue `stream`'s request for the current link (the caller holds the lock)."""
        self._outbox.put((self._generation, {"op": "add", "id": stream.id, "prompt_ids": stream.prompt_ids,
                                             "params": asdict(stream.params)}))

    def _send_loop(self) -> None:
        while (item := self._outbox.get()) is not None:
            generation, msg = item
            with self._lock:
                conn = self._conn if generation == self._generation else None
            if conn is None:
                continue  # meant for a link that has gone: the restart sends what still matters
            try:
                conn.send_bytes(json.dumps(msg).encode())
            except OSError:
                pass  # the reader sees the rank exit and acts on it

    def _read(self) -> None:
        while True:
            conn, ranks = self._conn, self._ranks
            ready = wait([conn, *ranks.sentinels])
            if conn in ready:
                try:
                    record = json.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    record = None
                if record is not None:
                    self._handle(record)
                    continue
            if self._closing:
                self._started.set()
                return
            if not self._rank_failed(ranks):
                return

    def _handle(self, record: dict) -> None:
        if "events" in record:
            self._deliver(record)
        elif record.get("ready"):
            with self._lock:
                self._ready = True
                for stream in self._streams.values():
                    self._post_add(stream)
            self._started.set()
        elif "failed" in record:
            self._failed_note = record["failed"]

    def _deliver(self, record: dict) -> None:
        batches: dict = {}
        with self._lock:
            for link_id, token_id, logprob, top, reason, prompt_lps in record["events"]:
                stream = self._streams.get(link_id)
                if stream is None:
                    continue
                if stream.replayed < len(stream.sent):  # regenerating what was handed over before a restart
                    if token_id == stream.sent[stream.replayed] and reason is None:
                        stream.replayed += 1
                        continue
                    del self._streams[link_id]
                    self._outbox.put((self._generation, {"op": "abort", "id": link_id}))
                    batches.setdefault(stream.loop, []).append((stream.queue, EngineGone(
                        f"the engine restarted after a failure and regenerated token {stream.replayed} of this "
                        "request differently; it was ended: send it again")))
                    continue
                stream.sent.append(token_id)
                stream.replayed = len(stream.sent)
                if reason is not None:
                    del self._streams[link_id]
                top = [tuple(t) for t in top] if top is not None else None
                batches.setdefault(stream.loop, []).append((stream.queue, TokenEvent(token_id, logprob, top, reason,
                                                                                     prompt_lps)))
            for link_id, message, code in record["rejected"]:
                stream = self._streams.pop(link_id, None)
                if stream is not None:
                    batches.setdefault(stream.loop, []).append((stream.queue, rejection(message, code)))
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_put_all, items)
        if self.metrics is not None and record.get("state"):
            self.metrics.set_scheduler_state(*record["state"])

    def _rank_failed(self, ranks) -> bool:
        """A rank exited (or rank 0 closed the link) while serving: restart, or fail for good.
        True when a new mesh is up (or coming up) and reading should go on."""
        failure = settled_failure(ranks) or UserError("rank 0 closed the engine link")
        cause: BaseException = failure
        if self._failed_note and not ranks.failed_alone():  # rank 0's account names the stalled or lost rank
            cause = EngineGone(self._failed_note)
        with self._lock:
            started = self._started.is_set()
            for_good = not started or self.restarts_left <= 0 or self._closing
            if for_good and started:
                # the clients hear of it now, not once the ranks below are stopped: a rank that waits on
                # the one that died outside gloo (a shared-memory all-reduce) only ends when it is killed,
                # after local_spawn's stop grace
                self._end_requests(cause, failure)
        ranks.stop(grace=FAILED_MESH_GRACE_S)
        with self._lock:
            if for_good:
                return self._fail_for_good(cause, failure, started)
            self.restarts_left -= 1
            self.restarts += 1
            self._ready = False
            ended = [s for s in self._streams.values() if s.sent and not s.reproducible]
            for stream in ended:
                del self._streams[stream.id]
            for stream in self._streams.values():
                stream.replayed = 0
            waiting = len(self._streams)
        for stream in ended:
            stream.push(EngineGone(f"the engine restarted after a failure ({cause}); this request had already "
                                   "had tokens and its sampling is not seeded, so it cannot go on: send it again"))
        if self.metrics is not None:
            self.metrics.engine_restarted()
        print(f"meshserve: {cause}; restarting the engine (restart {self.restarts} of "
              f"{self.restarts + self.restarts_left}); {waiting} request(s) will be sent again",
              file=sys.stderr, flush=True)
        try:
            self._launch()
        except BaseException as err:  # noqa: BLE001 - no mesh: fail for good
            with self._lock:
                return self._fail_for_good(err, UserError(f"the ranks could not be started again: {err}"), True)
        return True

    def _fail_for_good(self, cause: BaseException, error: UserError, started: bool) -> bool:
        """(lock held) End every request with `cause`; `error` is what the front end exits with.
        False: the reader stops."""
        self._end_requests(cause, error)
        self._started.set()
        if started and self.on_failure is not None:
            threading.Thread(target=self.on_failure, args=(self.error,), daemon=True).start()
        return False

    def _end_requests(self, cause: BaseException, error: UserError) -> None:
        """(lock held) The engine is gone for good (`error`): refuse new requests and end the open ones
        with `cause`."""
        self.error = error
        streams = list(self._streams.values())
        self._streams.clear()
        for stream in streams:
            stream.push(EngineGone(f"engine failed: {cause}"))


def settled_failure(ranks):
    """The failure that names the rank that failed first, once it has exited: a rank that only lost
    a peer (exit code 1), or rank 0 closing the link, often comes first while the rank whose own
    error caused it is still on its way out."""
    from meshserve.launch.local_spawn import PEER_EXIT_GRACE_S
    ranks.join(0.5)  # the rank that failed first, and those it took along, are reaped
    failure = ranks.failure()
    if failure is None or getattr(failure, "code", None) == 1:
        ranks.join(PEER_EXIT_GRACE_S)
        failure = ranks.failure() or failure
    return failure


def _put_all(items) -> None:
    for q, item in items:
        q.put_nowait(item)


def local_link(world_size: int):
    """start_ranks for LinkedEngine: the ranks as child processes of this one, rank 0 at a pipe's end."""
    def start(engine_dir: str, limits):
        from meshserve.launch.local_spawn import LocalRanks
        parent, child = mp.get_context("spawn").Pipe()
        try:
            ranks = LocalRanks(world_size, link_rank, engine_dir, child, limits)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        return parent, ranks
    return start


def ray_link(mesh):
    """start_ranks for LinkedEngine: the ranks as actors of `mesh` (a launch.ray_launcher.RayMesh,
    placed), rank 0 connecting back to a listener of this process over TCP. Returns once rank 0 has
    connected (first thing, before the engine loads)."""
    def start(engine_dir: str, limits):
        from meshserve.orchestrator.engine_link import LinkListener
        listener = LinkListener(mesh.driver_ip)
        ranks = None
        try:
            ranks = mesh.start(link_rank, engine_dir, listener.address, limits, watch=True)
            return listener.accept(ranks), ranks
        except BaseException:
            if ranks is not None:
                ranks.stop()
            raise
        finally:
            listener.close()
    return start


def link_rank(env, engine_dir: str, link, limits) -> None:
    """Every rank of an engine served by a front end in another process; rank 0 runs the engine for
    it over `link`: a pipe's end (local spawn), or an engine_link.LinkAddress to connect to (Ray)."""
    from meshserve.orchestrator.engine_client import MeshEngineClient
    from meshserve.orchestrator.engine_link import LinkAddress, serve_link
    from meshserve.orchestrator.engine_loop import EngineLoop
    from meshserve.orchestrator.heap import freeze_startup_heap
    from meshserve.orchestrator.rank_program import RankSession
    from meshserve.orchestrator.tokenizer import Tokenizer
    from meshserve.workers.runtime.watchdog import FaultTimeouts
    # the front end owns Ctrl-C (it reaches every process of the terminal), even while rank 0 loads
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = link
    if isinstance(link, LinkAddress):  # rank 0 connects before loading, so the front end knows it is there
        conn = link.connect() if env.rank == 0 else None
    try:
        session = RankSession(env, engine_dir, limits)
        freeze_startup_heap()
        if not session.is_driver:
            if conn is not None:
                conn.close()
            session.follow()
            return
        ok = False
        try:
            client = MeshEngineClient(EngineLoop(session.runner, session.meta, session.broadcast,
                                                 Tokenizer(session.meta.dir)), None, FaultTimeouts.from_env(),
                                      session.watch)
            serve_link(conn, client)
            ok = True
        finally:
            session.close(ok)
    finally:
        if conn is not None:
            conn.close()
