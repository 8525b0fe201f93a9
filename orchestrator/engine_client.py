"""The bridge between the asyncio HTTP server and the engine loop, which runs in its own thread.

Requests and aborts reach the loop through a thread-safe inbox; each new token goes back to the
request's asyncio queue with call_soon_threadsafe. The loop thread alone talks to the other ranks.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
import traceback

from meshserve.orchestrator.api_server import TokenEvent
from meshserve.orchestrator.engine_loop import EngineLoop, check_prompt
from meshserve.errors import UserError
from meshserve.orchestrator.sampling_params import SamplingParams


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()
        self.request_id: int | None = None
        self.done = False

    def push(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class MeshEngineClient:
    HEARTBEAT_S = 120.0  # a step longer than this counts as a stalled engine

    def __init__(self, engine: EngineLoop, metrics=None):
        self.engine, self.metrics = engine, metrics
        self.tokenizer = engine.tokenizer
        self.max_seq_len = engine.meta.max_seq_len
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._streams: dict[int, _Stream] = {}
        self._heartbeat = time.monotonic()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="meshserve-engine", daemon=True)

    # ---- called from the asyncio side --------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join()
        if self.error is not None:
            raise self.error

    def is_alive(self) -> bool:
        return (self._thread.is_alive() and self.error is None
                and time.monotonic() - self._heartbeat < self.HEARTBEAT_S)

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        check_prompt(self.engine.meta, prompt_ids, params)

    async def generate(self, prompt_ids: list[int], params: SamplingParams):
        if not self.is_alive():
            raise RuntimeError("the engine is not running")
        stream = _Stream(asyncio.get_running_loop())
        self._inbox.put(("add", stream, prompt_ids, params))
        self._wake.set()
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    stream.done = True
                    return
        finally:
            if not stream.done:  # the client went away or closed us early: free its KV blocks
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
                _, stream, prompt_ids, params = msg
                try:
                    seq = self.engine.add_request(prompt_ids, params)
                except UserError as err:
                    stream.push(err)
                    continue
                stream.request_id = seq.request_id
                self._streams[seq.request_id] = stream
            else:
                stream = msg[1]
                if stream.request_id is not None and self._streams.pop(stream.request_id, None):
                    self.engine.abort(stream.request_id)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._heartbeat = time.monotonic()
                self._drain_inbox()
                if not self.engine.has_work():
                    self._report()
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                self._deliver(self.engine.step())
                self._report()
            self._deliver(self.engine.drain())  # steps still in flight end before the shutdown plan
        except BaseException as err:  # the mesh is broken: fail every open request, health turns 503
            traceback.print_exc()
            self.error = err
            for stream in self._streams.values():
                stream.push(RuntimeError(f"engine failed: {err}"))
            self._streams.clear()

    def _deliver(self, outputs) -> None:
        for out in outputs:
            stream = self._streams.get(out.seq.request_id)
            if stream is None:
                continue
            reason = out.seq.finish_reason if out.finished else None
            stream.push(TokenEvent(out.token_id, out.logprob, out.top_logprobs, reason))
            if out.finished:
                del self._streams[out.seq.request_id]

    def _report(self) -> None:
        if self.metrics is None:
            return
        s = self.engine.scheduler
        rate = s.hit_tokens / s.queried_tokens if s.queried_tokens else 0.0
        self.metrics.set_scheduler_state(len(s.running), len(s.waiting), s.blocks.num_used,
                                         s.blocks.num_blocks - 1, rate)
