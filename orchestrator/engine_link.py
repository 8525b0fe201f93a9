"""Rank 0's end of the link to an HTTP front end in another process (see linked_engine.py for the
other end): `meshserve serve` started locally, where the front end is the parent and the ranks its
children, linked by a pipe; or with `--launcher ray --restart-on-failure N`, where the front end is
the Ray driver and the ranks are actors, linked over TCP (LinkListener, LinkAddress: rank 0 connects
to the front end and both prove they know a key made for that start, so no one else can join).

The front end tokenizes and detokenizes; only token ids cross. Every message is one JSON record with
fixed fields (no pickle of anything a client sent):

front end -> rank 0
  {"op": "add", "id": N, "prompt_ids": [...], "params": {SamplingParams fields}}
  {"op": "add_group", "prompt_ids": [...], "requests": [{"id": N, "params": {...}}, ...]}
                                       requests of one prompt (a request's choices), added at once
  {"op": "abort", "id": N}
  {"op": "close"}                      drain the steps in flight, stop the mesh, exit 0
rank 0 -> front end
  {"ready": true}                      the mesh is up and takes requests
  {"events": [[id, token_id, logprob, top_logprobs, finish_reason, prompt_logprobs], ...],
   "rejected": [[id, message, code], ...], "state": [running, waiting, kv_used, kv_total, hit_rate]}
                                       after each step (each list may be empty); a rejected request
                                       ends with that error (code: "grammar_failed" when its grammar
                                       failed on the way, else null: the engine refused it)
  {"failed": "..."}                    the mesh stalled or broke; rank 0 exits right after

prompt_logprobs is null but on a request's first token when it asked for them (api_server.TokenEvent
has the shape). The engine thread appends events as it delivers them and sends one record per step;
the ids are the front end's.
"""
from __future__ import annotations

import json
import os
import queue
import secrets
import signal
import socket
import threading
from dataclasses import dataclass
from multiprocessing.connection import Client, Listener, wait

from meshserve.errors import UserError
from meshserve.orchestrator.grammar import GrammarFailed

POLL_S = 0.25
CONNECT_TIMEOUT_S = 120.0  # rank 0 connects first thing; a start slower than this means the address is unreachable


@dataclass(frozen=True)
class LinkAddress:
    """Where rank 0 connects to its front end over TCP, and the key both ends must prove they hold."""
    host: str
    port: int
    authkey: bytes

    def connect(self):
        """A connection to the front end (send_bytes / recv_bytes, as a pipe's)."""
        return Client((self.host, self.port), family="AF_INET", authkey=self.authkey)

    def __repr__(self) -> str:  # the key stays out of logs and tracebacks
        return f"LinkAddress({self.host}:{self.port})"


class LinkListener:
    """The front end's end of a link over TCP, bound to `host` (an address rank 0's node can reach)
    on a free port, with a random key: one thread accepts rank 0's connection (skipping any that
    cannot prove the key); accept() waits for it, or for a rank to end first."""

    def __init__(self, host: str):
        authkey = secrets.token_bytes(32)
        self._listener = Listener((host, 0), family="AF_INET", authkey=authkey)
        self.address = LinkAddress(host, self._listener.address[1], authkey)
        self._accepted: queue.SimpleQueue = queue.SimpleQueue()
        self._ready_fd, self._notify_fd = os.pipe()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="meshserve-link-accept", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn = self._listener.accept()
            except Exception:  # noqa: BLE001 - a connection that could not prove the key, or went away
                continue
            if self._closed:
                conn.close()
                return
            self._accepted.put(conn)
            try:
                os.write(self._notify_fd, b"x")
            except OSError:  # closed meanwhile
                pass
            return

    def accept(self, ranks, timeout: float = CONNECT_TIMEOUT_S):
        """Rank 0's connection; raises the ranks' failure when one ends first (or a UserError at the
        timeout)."""
        ready = wait([self._ready_fd, *ranks.sentinels], timeout)
        if self._ready_fd in ready:
            return self._accepted.get()
        if ready:
            ranks.join(0.5)
            raise ranks.failure() or UserError("a rank ended before rank 0 connected to the front end")
        raise UserError(f"rank 0 did not connect to the front end at {self.address.host}:{self.address.port} "
                        f"within {timeout:.0f}s; is that address reachable from rank 0's node?")

    def close(self) -> None:
        """Stop listening (a connection accepted but not taken is closed)."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():  # wake the accepting thread with a connection of our own
            try:
                socket.create_connection((self.address.host, self.address.port), timeout=2).close()
            except OSError:
                pass
            self._thread.join(2)
        self._listener.close()
        while not self._accepted.empty():
            self._accepted.get().close()
        os.close(self._ready_fd)
        os.close(self._notify_fd)


class LinkOut:
    """Records to the front end; one lock keeps records whole when threads share the pipe."""

    def __init__(self, conn):
        self.conn = conn
        self.lock = threading.Lock()
        self.events: list = []
        self.rejected: list = []
        self.state: list | None = None   # the scheduler state last sent

    def send(self, record: dict) -> None:
        data = json.dumps(record).encode()
        with self.lock:
            self.conn.send_bytes(data)

    def flush(self, state) -> None:
        """Send what the engine delivered since the last flush, and the scheduler state when it
        changed (engine thread only)."""
        state = list(state)
        if not self.events and not self.rejected and state == self.state:
            return
        events, rejected = self.events, self.rejected
        self.events, self.rejected, self.state = [], [], state
        self.send({"events": events, "rejected": rejected, "state": state})


class _LinkStream:
    """A request of the front end as MeshEngineClient sees a stream: push() is called from the engine
    thread with each token event, or with the error that ends the request."""

    def __init__(self, link_id: int, out: LinkOut, open_streams: dict):
        self.link_id, self.out, self.open = link_id, out, open_streams
        self.request_id: int | None = None
        self.done = False

    def push(self, item) -> None:
        if isinstance(item, UserError):  # this request is refused (or its grammar failed); the engine goes on
            self.out.rejected.append([self.link_id, str(item), rejection_code(item)])
            self.open.pop(self.link_id, None)
        elif isinstance(item, BaseException):
            pass  # the engine failed: the "failed" record and rank 0's exit tell the front end once
        else:
            self.out.events.append([self.link_id, item.token_id, item.logprob, item.top_logprobs,
                                    item.finish_reason, item.prompt_logprobs])
            if item.finish_reason is not None:
                self.done = True
                self.open.pop(self.link_id, None)


def rejection_code(err: UserError) -> str | None:
    """The code of a rejected record's error: "grammar_failed" for a GrammarFailed, else None."""
    return GrammarFailed.code if isinstance(err, GrammarFailed) else None


def rejection(message: str, code: str | None) -> UserError:
    """The error a rejected record stands for (the other end of rejection_code)."""
    return GrammarFailed(message) if code == GrammarFailed.code else UserError(message)


def serve_link(conn, client) -> None:
    """Run rank 0's engine (a started-later MeshEngineClient) for the front end at the other end of
    `conn` until it says close or goes away. Returns normally on close; raises if the engine failed."""
    from meshserve.orchestrator.sampling_params import SamplingParams
    # the front end decides when to stop (it drains first); a Ctrl-C reaches every process of the terminal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from meshserve.workers.runtime.watchdog import exit_now
    out = LinkOut(conn)
    client.on_round = lambda: out.flush(client.scheduler_state())

    def on_failure(err: BaseException) -> None:
        """The mesh stalled (watchdog thread): tell the front end, then exit; the engine thread,
        blocked on the stalled rank, cannot be joined."""
        _send_failed(out, err)
        exit_now(str(err))
    client.on_failure = on_failure
    open_streams: dict[int, _LinkStream] = {}
    client.start()
    out.send({"ready": True})
    while client.error is None:
        if not conn.poll(POLL_S):
            continue
        try:
            msg = json.loads(conn.recv_bytes())
        except (EOFError, OSError):
            break  # the front end is gone: stop the mesh
        op = msg.get("op")
        if op in ("add", "add_group"):
            streams, params = [], []
            for req in (msg,) if op == "add" else msg["requests"]:
                try:
                    params.append(SamplingParams(**req["params"]))
                except (TypeError, ValueError, UserError) as err:
                    out.send({"events": [], "rejected": [[req["id"], str(err), None]],
                              "state": list(client.scheduler_state())})
                    continue
                streams.append(_LinkStream(req["id"], out, open_streams))
                open_streams[req["id"]] = streams[-1]
            if op == "add" and streams:
                client.submit(streams[0], msg["prompt_ids"], params[0])
            elif streams:
                client.submit_group(streams, msg["prompt_ids"], params)
        elif op == "abort":
            stream = open_streams.pop(msg["id"], None)
            if stream is not None:
                client.cancel(stream)
        elif op == "close":
            break
    if client.error is not None:
        _send_failed(out, client.error)
    client.stop()  # raises the engine's error, if any


def _send_failed(out: LinkOut, err: BaseException) -> None:
    try:
        out.send({"failed": str(err)})
    except OSError:
        pass

