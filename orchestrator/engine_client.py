"""The bridge between the asyncio HTTP server and the engine loop, which runs in its own thread.

Requests and aborts reach the loop through a thread-safe inbox; each new token goes back to the
request's asyncio queue with call_soon_threadsafe. The loop thread alone talks to the other ranks.

A third thread watches the clock: a step that runs past the step timeout (the first step has its own,
longer one) or a peer whose heartbeats stop (workers/runtime/watchdog.py) is a stalled mesh. Every
open and queued request then fails with an error that names the rank, `is_alive` turns false, and
`on_failure` is called (the server stops and the process exits: the engine thread, blocked in a
receive that never completes, cannot be joined).
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
import traceback

from meshserve.orchestrator.api_server import EngineGone, TokenEvent
from meshserve.orchestrator.engine_channel import wire_prompt_logprobs
from meshserve.orchestrator.engine_loop import EngineLoop, check_prompt
from meshserve.errors import UserError
from meshserve.orchestrator.grammar import GrammarFailed
from meshserve.orchestrator.sampling_params import SamplingParams
from meshserve.workers.runtime.watchdog import FaultTimeouts


class MeshStalled(EngineGone):
    """A step did not finish in time, or a rank stopped answering; the message names the rank(s)."""


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()
        self.request_id: int | None = None
        self.done = False

    def push(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


async def stream_events(stream):
    """The events pushed on `stream.queue`, up to the one that finishes the request (then
    `stream.done` is set); an exception pushed there is raised."""
    while True:
        item = await stream.queue.get()
        if isinstance(item, BaseException):
            raise item
        yield item
        if item.finish_reason is not None:
            stream.done = True
            return


class StreamEvents:
    """The events of one request submitted with others (generate_group), as an async iterator;
    aclose() aborts the request unless it has finished, whether or not it was iterated."""

    def __init__(self, stream, cancel):
        self._stream, self._cancel = stream, cancel
        self._events = stream_events(stream)

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self._events.__anext__()

    async def aclose(self) -> None:
        await self._events.aclose()
        if not self._stream.done:
            self._stream.done = True
            self._cancel(self._stream)


class MeshEngineClient:
    def __init__(self, engine: EngineLoop, metrics=None, timeouts: FaultTimeouts | None = None, watch=None,
                 on_failure=None):
        """timeouts: step timeouts (default: FaultTimeouts.from_env()); watch: rank 0's PeerWatch (None:
        one rank); on_failure(err): called once, from the watchdog thread, when the mesh stalls."""
        self.engine, self.metrics = engine, metrics
        self.tokenizer = engine.tokenizer
        self.max_seq_len = engine.meta.max_seq_len
        self.timeouts = timeouts or FaultTimeouts.from_env()
        self.watch, self.on_failure = watch, on_failure
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # _streams and error: the engine and watchdog threads both write them
        self._streams: dict[int, _Stream] = {}
        self._step_started: float | None = None  # monotonic start of the step in progress
        self._steps_done = 0
        self.error: BaseException | None = None
        self.on_round = None  # called by the engine thread after each round of deliveries (or idle wait)
        self._thread = threading.Thread(target=self._run, name="meshserve-engine", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name="meshserve-step-watchdog", daemon=True)

    # ---- called from the asyncio side --------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        self._watchdog.start()
        if self.watch is not None:
            self.watch.on_lost = self._peers_lost

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if not isinstance(self.error, MeshStalled):  # a stalled engine thread never returns
            self._thread.join()
        if self.error is not None:
            raise self.error

    def is_alive(self) -> bool:
        return self._thread.is_alive() and self.error is None and self._overdue() is None

    def _overdue(self) -> tuple[float, float] | None:
        """(seconds, limit) when the step in progress has run past its timeout."""
        started = self._step_started
        if started is None:
            return None
        limit = self.timeouts.first_step_s if self._steps_done == 0 else self.timeouts.step_s
        elapsed = time.monotonic() - started
        return (elapsed, limit) if elapsed > limit else None

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        check_prompt(self.engine.meta, prompt_ids, params)

    @property
    def grammars(self):
        """The engine's GrammarCompiler: the front end compiles with it, the engine finds it cached."""
        return self.engine.grammars

    def _require_alive(self) -> None:
        if not self.is_alive():
            raise EngineGone("the engine is not running" + (f" ({self.error})" if self.error else ""))

    async def generate(self, prompt_ids: list[int], params: SamplingParams):
        self._require_alive()
        stream = _Stream(asyncio.get_running_loop())
        self.submit(stream, prompt_ids, params)
        try:
            async for item in stream_events(stream):
                yield item
        finally:
            if not stream.done:  # the client went away or closed us early: free its KV blocks
                self.cancel(stream)

    def generate_group(self, prompt_ids: list[int], params: list[SamplingParams]) -> list[StreamEvents]:
        """Several requests of one prompt (the choices of a request), queued together so that the
        engine takes them in one go: the first prefills the prompt, the others fork off it. One
        event iterator per request, in order; closing one aborts its request."""
        self._require_alive()
        loop = asyncio.get_running_loop()
        streams = [_Stream(loop) for _ in params]
        self.submit_group(streams, prompt_ids, params)
        return [StreamEvents(s, self.cancel) for s in streams]

    def submit_group(self, streams: list, prompt_ids: list[int], params: list[SamplingParams]) -> None:
        """submit() for several requests of one prompt, which the engine thread adds at once."""
        self._inbox.put(("add_group", streams, prompt_ids, params))
        self._wake.set()

    def submit(self, stream, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; the engine thread calls stream.push with each TokenEvent, or with the
        error that ends it (a UserError when the engine refuses the request, a GrammarFailed when
        its grammar fails on the way), and sets stream.request_id once it is admitted."""
        self._inbox.put(("add", stream, prompt_ids, params))
        self._wake.set()

    def cancel(self, stream) -> None:
        """Abort a submitted request (nothing happens if it has finished)."""
        self._inbox.put(("abort", stream))
        self._wake.set()

    # ---- the engine thread -------------------------------------------------------------------
    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "add":
                self._add(*msg[1:])
            elif msg[0] == "add_group":
                _, streams, prompt_ids, params = msg
                for stream, p in zip(streams, params, strict=True):
                    self._add(stream, prompt_ids, p)
            else:
                stream = msg[1]
                with self._lock:
                    found = stream.request_id is not None and self._streams.pop(stream.request_id, None)
                if found:
                    self.engine.abort(stream.request_id)

    def _add(self, stream, prompt_ids: list[int], params: SamplingParams) -> None:
        with self._lock:
            if self.error is not None:
                stream.push(RuntimeError(f"engine failed: {self.error}"))
                return
            try:
                seq = self.engine.add_request(prompt_ids, params)
            except UserError as err:
                stream.push(err)
                return
            stream.request_id = seq.request_id
            self._streams[seq.request_id] = stream

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and self.error is None:
                self._drain_inbox()
                if not self.engine.has_work():
                    self._report()
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                self._timed(self.engine.step)
                self._report()
            if self.error is None:
                self._timed(self.engine.drain)  # steps still in flight end before the shutdown plan
        except BaseException as err:  # the mesh is broken: fail every open request, health turns 503
            if self.error is None:
                traceback.print_exc()
            self._fail(err)

    def _timed(self, step) -> None:
        self._step_started = time.monotonic()
        outputs = step()
        self._step_started = None
        self._steps_done += 1
        self._deliver(outputs)

    def _fail(self, err: BaseException) -> bool:
        """Fail every open and queued request with `err`; False if the client had already failed."""
        with self._lock:
            if self.error is not None:
                return False
            self.error = err
            streams = list(self._streams.values())
            self._streams.clear()
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if msg[0] == "add":
                streams.append(msg[1])
            elif msg[0] == "add_group":
                streams += msg[1]
        kind = EngineGone if isinstance(err, EngineGone) else RuntimeError  # EngineGone: no traceback
        for stream in streams:
            stream.push(kind(f"engine failed: {err}"))
        return True

    def _deliver(self, outputs) -> None:
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.seq.request_id)
                if stream is None:
                    continue
                reason = out.seq.finish_reason if out.finished else None
                if reason == "error":  # its grammar failed: the request ends with that error, not a token
                    stream.push(GrammarFailed(out.seq.error))
                else:
                    stream.push(TokenEvent(out.token_id, out.logprob, out.top_logprobs, reason,
                                           wire_prompt_logprobs(out.prompt_logprobs)))
                if out.finished:
                    del self._streams[out.seq.request_id]

    # ---- the watchdog thread -----------------------------------------------------------------
    def _watch(self) -> None:
        period = max(0.05, min(0.5, self.timeouts.step_s / 10))
        while not self._stop.wait(period) and self.error is None:
            overdue = self._overdue()
            if overdue is not None:
                self._stalled(*overdue)
                return

    def _stalled(self, elapsed: float, limit: float) -> None:
        step = self.engine.oldest_step_id()
        what = f"step {step} did not finish within {limit:g}s"
        which = "--first-step-timeout" if self._steps_done == 0 else "--step-timeout"
        watch = self.watch
        if watch is not None:
            silent = watch.silent() or watch.silent(longer_than=2.5 * watch.period)
            if silent:
                cause = watch.describe(silent)
            else:
                behind = watch.unfinished(step)
                cause = (f"rank(s) {', '.join(map(str, behind))} of {watch.world_size} did not finish it"
                         if behind else "rank 0 did not finish it")
            message = f"{cause}: {what} ({which})"
        else:
            message = f"{what} ({which})"
        self._raise_failure(MeshStalled(message))

    def _peers_lost(self, silent: dict[int, float]) -> None:
        self._raise_failure(MeshStalled(self.watch.describe(silent)))

    def _raise_failure(self, err: MeshStalled) -> None:
        if self._fail(err) and self.on_failure is not None:
            self.on_failure(err)

    def scheduler_state(self) -> tuple[int, int, int, int, float]:
        """(running, waiting, KV blocks used, KV blocks, prefix-cache hit rate), as ServerMetrics takes them."""
        s = self.engine.scheduler
        rate = s.hit_tokens / s.queried_tokens if s.queried_tokens else 0.0
        return len(s.running), len(s.waiting), s.blocks.num_used, s.blocks.num_blocks - 1, rate

    def _report(self) -> None:
        if self.on_round is not None:
            self.on_round()
        if self.metrics is not None:
            self.metrics.set_scheduler_state(*self.scheduler_state())
