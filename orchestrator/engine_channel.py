"""Rank 0's engine as the front end sees it: add a request, abort one, take the next step's token
events. Two ways to reach it, with the same three calls:

A step may produce no token (a prefill chunk that does not reach the end of its prompt): `busy` tells
whether the engine still has work after the step.

- `InProcessEngine`: the engine loop runs in this process (one rank, or rank 0 under a launcher);
- `PipeEngine`: the ranks run in child processes started here, and rank 0 answers over a local pipe
  (`serve_channel`). Every message is a JSON record (no pickle); each call waits for its answer,
  while watching the rank processes, so a dead rank is reported by name instead of hanging.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from multiprocessing.connection import wait

from meshserve.errors import UserError
from meshserve.orchestrator.sampling_params import SamplingParams


@dataclass
class TokenEvent:
    """One new token of one request. finish_reason: the engine's token-level stop ("stop" for an
    end-of-sequence or stop token, "length"; "error" when the request's grammar failed: `error` says
    why, and the token is no part of the answer), None while the request runs."""
    request_id: int
    token_id: int
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list | None = None     # [(token id, logprob)] when logprobs were asked
    first_logits: list | None = None     # the logits that chose the first token, when asked
    # on the first token, when prompt logprobs were asked: per prompt position, None (the first) or
    # [logprob, [[token id, logprob], ...]]
    prompt_logprobs: list | None = None
    error: str | None = None


def wire_prompt_logprobs(entries: list | None) -> list | None:
    """Sequence.prompt_logprobs as plain JSON lists (None stays None)."""
    if entries is None:
        return None
    return [None if e is None else [e[0], [list(t) for t in e[1]]] for e in entries]


def events_of(outputs) -> list[TokenEvent]:
    """The engine loop's TokenOutputs as plain events."""
    events = []
    for out in outputs:
        seq = out.seq
        first = seq.first_logits if len(seq.output_ids) == 1 else None
        top = [list(t) for t in out.top_logprobs] if out.top_logprobs is not None else None
        events.append(TokenEvent(seq.request_id, out.token_id, seq.finish_reason if out.finished else None,
                                 out.logprob, top, first, wire_prompt_logprobs(out.prompt_logprobs),
                                 seq.error if out.finished else None))
    return events


class InProcessEngine:
    def __init__(self, loop):
        self.loop = loop

    @property
    def busy(self) -> bool:
        return self.loop.has_work()

    def add(self, prompt_ids: list[int], params: SamplingParams) -> int:
        return self.loop.add_request(prompt_ids, params).request_id

    def abort(self, request_id: int) -> None:
        self.loop.abort(request_id)

    def step(self) -> list[TokenEvent]:
        return events_of(self.loop.step()) if self.loop.has_work() else []

    def close(self) -> None:
        self.loop.drain()


def serve_channel(conn, loop) -> None:
    """Rank 0 in a child process: answer the front end's calls until it says close, or goes away
    without a word (an LLM garbage-collected unclosed, its process ending): then stop the mesh as on
    close."""
    engine = InProcessEngine(loop)
    while True:
        try:
            msg = json.loads(conn.recv_bytes())
        except (EOFError, OSError):
            engine.close()
            return
        op = msg["op"]
        reply: dict = {}
        if op == "add":
            try:
                reply["id"] = engine.add(msg["prompt_ids"], SamplingParams(**msg["params"]))
            except UserError as err:
                reply["error"] = str(err)
        elif op == "abort":
            engine.abort(msg["id"])
        elif op == "step":
            reply["events"] = [asdict(e) for e in engine.step()]
            reply["busy"] = engine.busy
        elif op == "close":
            engine.close()
            conn.send_bytes(b"{}")
            return
        else:
            raise ValueError(f"unknown engine channel call {op!r}")
        conn.send_bytes(json.dumps(reply).encode())


class PipeEngine:
    """The front end's side of `serve_channel`; `ranks` (meshserve.launch.local_spawn.LocalRanks) are watched."""

    def __init__(self, conn, ranks):
        self.conn, self.ranks = conn, ranks
        self.busy = False

    def _call(self, msg: dict) -> dict:
        try:
            self.conn.send_bytes(json.dumps(msg).encode())
            while True:
                ready = wait([self.conn, *(p.sentinel for p in self.ranks.procs)])
                if self.conn in ready:
                    return json.loads(self.conn.recv_bytes())
                for p in self.ranks.procs:
                    if p.sentinel in ready:
                        p.join(5)  # reaped, so its exit code is known
                failure = self.ranks.failure()
                if failure is not None:
                    raise failure
                gone = [r for r, p in enumerate(self.ranks.procs) if p.exitcode is not None]
                if gone:
                    raise UserError(f"rank {gone[0]} of {len(self.ranks.procs)} exited before rank 0 closed the "
                                    "engine")
        except (EOFError, BrokenPipeError, ConnectionResetError):
            self.ranks.join(10.0)  # the rank that failed first is named once every rank has exited
            raise self.ranks.failure() or UserError("rank 0 closed the engine channel") from None

    def add(self, prompt_ids: list[int], params: SamplingParams) -> int:
        reply = self._call({"op": "add", "prompt_ids": list(prompt_ids), "params": asdict(params)})
        if "error" in reply:
            raise UserError(reply["error"])
        return reply["id"]

    def abort(self, request_id: int) -> None:
        self._call({"op": "abort", "id": request_id})

    def step(self) -> list[TokenEvent]:
        reply = self._call({"op": "step"})
        self.busy = reply["busy"]
        return [TokenEvent(**e) for e in reply["events"]]

    def close(self) -> None:
        self._call({"op": "close"})
