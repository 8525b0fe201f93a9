"""Rank 0's OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models (and
/v1/models/{id}), /health, /metrics and /openapi.json, over any object that implements `EngineClient`.

In front of the routes, `_Guard` checks the API key (every route but /health and /ready) and
refuses bodies over the size limit before reading them; `_Admission` bounds the requests (and
their prompt tokens) that wait for a first token, answering 429 beyond it.

Each request runs its engine generator in a small pump task feeding a queue; a second task waits
for the client to hang up. Whatever ends a request (last token, stop string, hang-up, error), the
pump is cancelled and the generator closed, so the engine aborts it and frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, ClassVar, Protocol

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from meshserve.orchestrator import openai_protocol as oai
from meshserve.orchestrator import tool_calls
from meshserve.orchestrator.detokenizer import IncrementalDetokenizer, TokenTexts
from meshserve.errors import UserError
from meshserve.orchestrator.metrics import ServerMetrics
from meshserve.orchestrator.openai_protocol import ParsedRequest, RequestError, Served, TokenLogprob
from meshserve.orchestrator.request_text import RequestText
from meshserve.orchestrator.sampling_params import SamplingParams

if TYPE_CHECKING:
    import meshserve.orchestrator.tokenizer


@dataclass
class TokenEvent:
    token_id: int
    logprob: float | None            # log-probability of token_id under the model (None unless logprobs asked)
    top_logprobs: list[tuple[int, float]] | None  # top-N (token id, logprob) when asked
    finish_reason: str | None         # None while running; "stop" | "length" | "abort" on the last event
    # on the first event, when the request asked for prompt logprobs: one entry per prompt token, None
    # for the first, else [logprob of that token, [[token id, logprob], ...] top alternatives]
    prompt_logprobs: list | None = None


class EngineGone(RuntimeError):
    """The server ended this request on purpose (the drain deadline of a stop, a stalled mesh): logged
    in one line, without a traceback."""


class EngineClient(Protocol):
    tokenizer: "meshserve.orchestrator.tokenizer.Tokenizer"
    max_seq_len: int

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise UserError for requests the engine can never run (too long etc.)."""

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        """Async generator, one event per new token; closing or cancelling it aborts the request."""

    # optional: generate_group(prompt_ids, [params, ...]) -> [async iterator, ...]: several requests of
    # one prompt (a request's choices) queued together, so the engine prefills the prompt once;
    # each iterator's aclose() aborts its request

    def is_alive(self) -> bool:
        """Engine loop alive and stepping."""


_log = logging.getLogger("meshserve.api")

MiB = 1 << 20


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"{name}={raw!r} is not allowed: use an integer >= 1") from None
    if value < 1:
        raise UserError(f"{name}={raw!r} is not allowed: use an integer >= 1")
    return value


@dataclass
class ApiSettings:
    """How the HTTP front end guards itself. `meshserve serve` flags reach every rank through the
    MESHSERVE_* variables that `from_env` reads."""
    api_key: str | None = None           # None: no key needed
    max_request_bytes: int = 8 * MiB     # larger bodies get 413, unread
    max_queued_requests: int = 256       # admitted requests without a first token yet; more get 429
    max_queued_tokens: int = 1 << 20     # their prompt tokens; more get 429 (a request alone always fits)
    special_tokens_in_content: bool = False  # chat: let message text spell control tokens (unsafe)
    retry_after_s: int = 1
    open_paths: tuple = ("/health", "/ready")  # no key needed

    ENV: ClassVar[dict] = {"api_key": "MESHSERVE_API_KEY", "max_request_bytes": "MESHSERVE_MAX_REQUEST_BYTES",
                           "max_queued_requests": "MESHSERVE_MAX_QUEUED_REQUESTS",
                           "max_queued_tokens": "MESHSERVE_MAX_QUEUED_TOKENS",
                           "special_tokens_in_content": "MESHSERVE_CHAT_SPECIAL_TOKENS_IN_CONTENT"}

    @classmethod
    def from_env(cls) -> "ApiSettings":
        d = cls()
        e = cls.ENV
        return cls(api_key=os.environ.get(e["api_key"]) or None,
                   max_request_bytes=_env_int(e["max_request_bytes"], d.max_request_bytes),
                   max_queued_requests=_env_int(e["max_queued_requests"], d.max_queued_requests),
                   max_queued_tokens=_env_int(e["max_queued_tokens"], d.max_queued_tokens),
                   special_tokens_in_content=os.environ.get(e["special_tokens_in_content"], "") == "1")


class _Ticket:
    """One admitted request's place in the queue; released at its first token or its end."""

    def __init__(self, admission: "_Admission", tokens: int):
        self._admission, self.tokens, self._held = admission, tokens, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission._release(self)


class _Admission:
    """Bounds the requests that wait for their first token (queued in the engine or in prefill),
    by count and by prompt tokens. Only the event loop's thread calls it."""

    def __init__(self, settings: ApiSettings, metrics: ServerMetrics):
        self.settings, self.metrics = settings, metrics
        self.requests = self.tokens = 0

    def admit(self, prompt_tokens: int) -> _Ticket:
        s = self.settings
        why = None
        if self.requests >= s.max_queued_requests:
            why = f"{self.requests} requests are waiting (--max-queued-requests {s.max_queued_requests})"
        elif self.requests and self.tokens + prompt_tokens > s.max_queued_tokens:
            why = (f"{self.tokens} prompt tokens are waiting and this request adds {prompt_tokens} "
                   f"(--max-queued-tokens {s.max_queued_tokens})")
        if why is not None:
            self.metrics.request_rejected("queue_full")
            raise RequestError(f"the server is overloaded: {why}; retry after {s.retry_after_s} s", status=429,
                               err_type="rate_limit_error", code="queue_full",
                               headers={"Retry-After": str(s.retry_after_s)})
        self.requests += 1
        self.tokens += prompt_tokens
        self.metrics.set_api_queue(self.requests, self.tokens)
        return _Ticket(self, prompt_tokens)

    def _release(self, ticket: _Ticket) -> None:
        self.requests -= 1
        self.tokens -= ticket.tokens
        self.metrics.set_api_queue(self.requests, self.tokens)


async def _send_error(send, status: int, body: dict, headers: dict | None = None) -> None:
    raw = json.dumps(body).encode("utf-8")
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    head += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": raw})


class _Guard:
    """ASGI middleware: the API key on every route but the open ones (compared in constant time),
    then a body larger than max_request_bytes by its Content-Length is refused before it is read
    (bodies without a length are counted as they are read, by `_read_json`)."""

    def __init__(self, app, settings: ApiSettings, metrics: ServerMetrics):
        self.app, self.settings, self.metrics = app, settings, metrics
        key = settings.api_key
        self._key = f"Bearer {key}".encode("utf-8") if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self._key is not None and scope.get("path") not in self.settings.open_paths:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self._key):
                self.metrics.request_rejected("unauthorized")
                why = "no API key was given" if not given else "the API key is not valid"
                return await _send_error(send, 401, oai.error_body(
                    f"{why}: send the header 'Authorization: Bearer <key>'", code="invalid_api_key"),
                    {"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await _send_error(send, 400, oai.error_body("the Content-Length header is not a number"))
            if n > self.settings.max_request_bytes:
                self.metrics.request_rejected("too_large")
                return await _send_error(send, 413, _too_large(n, self.settings.max_request_bytes),
                                         {"Connection": "close"})
        return await self.app(scope, receive, send)


def _too_large(n: int | None, limit: int) -> dict:
    size = f"{n} bytes" if n is not None else f"more than {limit} bytes"
    return oai.error_body(f"the request body is too large ({size}): at most {limit} bytes are allowed "
                          "(--max-request-bytes)", code="request_too_large")

_END = object()           # the engine generator ran out
_DISCONNECTED = object()  # the client hung up


@dataclass
class _Step:
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None


class _Generation:
    """One request's trip through the engine, as a stream of text steps (the last one has a reason)."""

    def __init__(self, api: "_Api", request: Request, prompt_ids: list[int], params: SamplingParams,
                 num_logprobs: int | None, start: float, ticket: _Ticket | None = None):
        self.api, self.request, self.prompt_ids, self.params = api, request, prompt_ids, params
        self.num_logprobs, self.start = num_logprobs, start
        self.ticket = ticket
        self.echo = ""                      # the prompt's text when the answer echoes it (its offsets count it)
        self.echo_only = False              # the answer is the echo alone: the one token run for it is dropped
        self.prompt_entries: list[TokenLogprob] | None = None  # the prompt's logprobs, with its first token
        self.completion_tokens = 0
        self.cum_logprob = 0.0              # of its tokens, when the engine reports them (best_of ranks by it)
        self.started = asyncio.Event()      # set at its first token, or its end
        self.ttft: float | None = None
        self._pump: asyncio.Task | None = None
        self.source = None  # a callable giving its engine events (one of a group), else engine.generate

    async def steps(self) -> AsyncIterator[_Step]:
        api, params = self.api, self.params
        api.metrics.request_started(len(self.prompt_ids))
        queue: asyncio.Queue = asyncio.Queue()
        self._queue = queue
        api.active.add(self)
        self._pump = asyncio.create_task(self._pump_events(queue))
        watcher = asyncio.create_task(self._watch_disconnect(queue))
        text_owner = RequestText(api.engine.tokenizer, params, self.prompt_ids)
        pending: list[TokenLogprob] = []
        finish = "abort"
        try:
            while True:
                item = await queue.get()
                if item is _DISCONNECTED:
                    return
                if isinstance(item, BaseException):
                    finish = "error"
                    raise item
                if item is _END:  # the engine stopped without saying why
                    yield _Step(text_owner.end("abort"), pending, "abort")
                    return
                ev: TokenEvent = item
                if ev.prompt_logprobs is not None and self.prompt_entries is None:
                    self.prompt_entries = await asyncio.get_running_loop().run_in_executor(
                        None, api.prompt_entries, self.prompt_ids, ev.prompt_logprobs, self.num_logprobs)
                if self.echo_only:
                    finish = "length"
                    yield _Step("", [], finish)
                    return
                self._count_token()
                self.cum_logprob += ev.logprob if ev.logprob is not None else 0.0
                offset = text_owner.offset
                delta = text_owner.add(ev.token_id, ev.finish_reason)
                if self.num_logprobs is not None and delta.shown:
                    pending.append(self._logprob_entry(ev, len(self.echo) + offset))
                if delta.finish_reason is not None:
                    finish = delta.finish_reason
                    await self.close_engine()  # a stop string: the engine drops the rest now
                    yield _Step(delta.text, pending, delta.finish_reason)
                    return
                if delta.text:
                    yield _Step(delta.text, pending, None)
                    pending = []
        finally:
            self.started.set()
            api.active.discard(self)
            self.release()
            watcher.cancel()
            with anyio.CancelScope(shield=True):
                await self.close_engine()
            api.metrics.request_finished(finish, time.perf_counter() - self.start, self.ttft,
                                         self.completion_tokens)

    def end(self, err: BaseException) -> None:
        """End the request now with `err` (reported to its client as an error)."""
        self._queue.put_nowait(err)

    def release(self) -> None:
        """Leave the admission queue (at the first token, or however the request ends)."""
        if self.ticket is not None:
            self.ticket.release()

    def _count_token(self) -> None:
        if self.completion_tokens == 0:
            self.release()
        self.completion_tokens += 1
        self.api.metrics.token_generated()
        self.started.set()
        if self.ttft is None:
            self.ttft = time.perf_counter() - self.start
            self.api.metrics.first_token(self.ttft)

    def _logprob_entry(self, ev: TokenEvent, offset: int) -> TokenLogprob:
        texts = self.api.token_texts
        token, raw = texts.get(ev.token_id)
        top = None
        if ev.top_logprobs is not None:
            top = [(*texts.get(t), lp) for t, lp in ev.top_logprobs[: self.num_logprobs]]
        lp = ev.logprob if ev.logprob is not None else float("nan")
        return TokenLogprob(token, raw, lp, top, offset)

    async def _pump_events(self, queue: asyncio.Queue) -> None:
        events = None
        try:
            events = self.source() if self.source is not None else self.api.engine.generate(self.prompt_ids,
                                                                                             self.params)
            async for ev in events:
                queue.put_nowait(ev)
            queue.put_nowait(_END)
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # noqa: BLE001 - handed to the request, which reports it
            queue.put_nowait(err)
        finally:
            aclose = getattr(events, "aclose", None) if events is not None else None
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()

    async def _watch_disconnect(self, queue: asyncio.Queue) -> None:
        while True:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                queue.put_nowait(_DISCONNECTED)
                return

    async def close_engine(self) -> None:
        """Cancel the pump (closing the engine generator) and wait until it is gone."""
        task = self._pump
        if task is None:
            return
        if not task.done():
            task.cancel()
        await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # retrieved: it was already handed over through the queue


class _EventStream(StreamingResponse):
    """SSE response that always closes its body generator, however the response ends."""
    media_type = "text/event-stream"

    def __init__(self, content, *, on_close=None, **kwargs):
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._on_close is not None:  # also when the body never started
                self._on_close()
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


class _Api:
    def __init__(self, engine: EngineClient, model_name: str, metrics: ServerMetrics, settings: ApiSettings):
        self.engine, self.model_name, self.metrics, self.settings = engine, model_name, metrics, settings
        self.served = Served(model_name, engine.max_seq_len)
        self.admission = _Admission(settings, metrics)
        self.created = int(time.time())
        self._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="meshserve-tokenize")
        self._token_texts: TokenTexts | None = None
        self._grammars = None
        self._grammar_lock = threading.Lock()
        self.active: set[_Generation] = set()  # requests between their first step and their end
        self.draining = False                  # a stop was asked: new requests get 503

    def end_all(self, message: str) -> int:
        """End every request in progress with an error (the drain deadline); returns how many."""
        ended = list(self.active)
        for gen in ended:
            gen.end(EngineGone(message))
        return len(ended)

    @property
    def grammars(self):
        """The engine's GrammarCompiler when it runs in this process, else one of the front end's own,
        which checks grammars before admission (rank 0 compiles them again for its matchers)."""
        with self._grammar_lock:
            if self._grammars is None:
                self._grammars = getattr(self.engine, "grammars", None)
            if self._grammars is None:
                from meshserve.orchestrator.grammar import GrammarCompiler
                hf = self.engine.tokenizer.hf_tokenizer
                self._grammars = GrammarCompiler(hf, len(hf))
            return self._grammars

    @property
    def token_texts(self) -> TokenTexts:
        if self._token_texts is None:
            self._token_texts = TokenTexts(self.engine.tokenizer)
        return self._token_texts

    def prompt_entries(self, prompt_ids: list[int], prompt_logprobs: list, num: int | None) -> list[TokenLogprob]:
        """The echoed prompt's logprobs entries: each token with its logprob under the tokens before
        it (None for the first) and its top `num` alternatives; text offsets count the prompt's
        decoded text. Blocks for a long prompt: run it off the event loop."""
        texts, detok = self.token_texts, IncrementalDetokenizer(self.engine.tokenizer)
        out = []
        for tid, entry in zip(prompt_ids, prompt_logprobs, strict=True):
            offset = detok.decoded_len
            detok.add(tid)
            token, raw = texts.get(tid)
            if entry is None:
                out.append(TokenLogprob(token, raw, None, None, offset))
                continue
            lp, top = entry
            out.append(TokenLogprob(token, raw, lp, [(*texts.get(t), tlp) for t, tlp in top[:num or 0]], offset))
        return out

    async def handle(self, request: Request, chat: bool) -> Response:
        start = time.perf_counter()
        if self.draining:
            raise RequestError("the server is shutting down and takes no new requests; retry on another "
                               "replica", status=503, err_type="server_error")
        body = await _read_json(request, self.settings.max_request_bytes, self.metrics)
        parse = oai.parse_chat_request if chat else oai.parse_completion_request
        try:
            req = parse(body, self.served)
        except RecursionError:  # a value nested almost as deep as the JSON parser goes
            raise RequestError("the request body is nested too deeply") from None
        loop = asyncio.get_running_loop()
        oai.check_prompt_size(req, self.engine.tokenizer, self.engine.max_seq_len)
        # off the event loop: a long prompt's tokenization never holds up other requests
        prompt_ids = await loop.run_in_executor(self._tokenize_pool, oai.tokenize, req, self.engine.tokenizer,
                                                self.settings.special_tokens_in_content)
        params = oai.sampling_params(req, len(prompt_ids), self.engine.max_seq_len)
        oai.check_with_engine(self.engine, req, prompt_ids, params)
        if params.structured is not None or req.tools is not None:  # compiled (or found cached) off the loop
            await loop.run_in_executor(None, oai.compile_grammar, self.grammars, req, params)
        count = max(req.n, req.best_of)
        ticket = self.admission.admit(len(prompt_ids) * count)
        if count > 1:
            from meshserve.orchestrator import choices
            return await choices.respond(self, request, req, prompt_ids, params, start, ticket)
        gen = _Generation(self, request, prompt_ids, params, req.logprobs, start, ticket)
        self.set_echo(gen, req, prompt_ids)
        if req.stream:
            return _EventStream(self._stream(gen, req), on_close=gen.release,
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._gather(gen, req)

    def set_echo(self, gen: _Generation, req: ParsedRequest, prompt_ids: list[int]) -> None:
        """Give `gen` the prompt's text when the request asks for echo, and whether that is the whole
        answer (max_tokens 0)."""
        gen.echo_only = req.echo_only
        if req.echo:
            gen.echo = req.prompt if isinstance(req.prompt, str) else self.engine.tokenizer.decode(prompt_ids)

    def _format_logprobs(self, req: ParsedRequest, entries: list[TokenLogprob]) -> dict | None:
        if req.logprobs is None:
            return None
        return oai.chat_logprobs(entries) if req.chat else oai.completion_logprobs(entries)

    async def _gather(self, gen: _Generation, req: ParsedRequest) -> Response:
        parts, entries, finish = [gen.echo], [], None
        steps = gen.steps()
        try:
            async for step in steps:
                parts.append(step.text)
                entries += step.logprobs
                finish = step.finish_reason or finish
        except UserError as err:
            raise oai.engine_refusal(req, err) from None
        except Exception as err:  # noqa: BLE001 - the engine failed: say so in the OpenAI shape
            _log_failure(err)
            status = 503 if isinstance(err, EngineGone) or not _alive(self.engine) else 500
            raise RequestError(f"generation failed: {err}", status=status, err_type="server_error") from None
        finally:
            await steps.aclose()
        if finish is None:  # the client hung up; nobody reads this
            return Response(status_code=499)
        build = oai.chat_response if req.chat else oai.completion_response
        body = build(oai.new_id(req.chat), oai.now(), self.model_name, "".join(parts), finish,
                     len(gen.prompt_ids), gen.completion_tokens,
                     self._format_logprobs(req, (gen.prompt_entries or []) + entries))
        tool_calls.apply(body["choices"][0], req.tools)
        return JSONResponse(body)

    async def _stream(self, gen: _Generation, req: ParsedRequest) -> AsyncIterator[bytes]:
        rid, created, model = oai.new_id(req.chat), oai.now(), self.model_name

        def chunk(text: str, finish: str | None, entries: list[TokenLogprob], first: bool = False,
                  delta: dict | None = None) -> dict:
            lp = self._format_logprobs(req, entries)
            if req.chat:
                if delta is None:
                    delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                out = oai.chat_chunk(rid, created, model, delta, finish, lp)
            else:
                out = oai.completion_chunk(rid, created, model, text, finish, lp)
            if finish is not None:
                out["usage"] = oai.usage(len(gen.prompt_ids), gen.completion_tokens)
            elif req.include_usage:
                out["usage"] = None
            return out

        calls = tool_calls.CallStream(req.tools) if req.tools is not None and req.tools.parses else None
        steps = gen.steps()
        echo_later = req.echo and req.logprobs is not None  # its logprobs come with the first token
        try:
            if req.chat:
                yield oai.sse(chunk("", None, [], first=True))
            elif req.echo and not echo_later:
                yield oai.sse(chunk(gen.echo, None, []))
            async for step in steps:
                if echo_later:
                    echo_later = False
                    yield oai.sse(chunk(gen.echo, None, gen.prompt_entries or []))
                if calls is None:
                    yield oai.sse(chunk(step.text, step.finish_reason, step.logprobs))
                else:
                    for delta, finish, entries in calls.step(step.text, step.finish_reason, step.logprobs):
                        yield oai.sse(chunk("", finish, entries, delta=delta))
                if step.finish_reason is not None and req.include_usage:
                    yield oai.sse(oai.usage_chunk(rid, created, model, req.chat, len(gen.prompt_ids),
                                                  gen.completion_tokens))
            yield oai.SSE_DONE
        except Exception as err:  # noqa: BLE001 - the status line is gone; report in-band
            yield in_band_error(err, req)
            yield oai.SSE_DONE
        finally:
            with anyio.CancelScope(shield=True):
                await steps.aclose()


def in_band_error(err: Exception, req: ParsedRequest) -> bytes:
    """The SSE event that ends a stream whose status line has gone out: the error in OpenAI's shape,
    naming the field a request's own error is about (a server error is logged too)."""
    if isinstance(err, UserError):
        refused = oai.engine_refusal(req, err)
        return oai.sse(oai.error_body(f"generation failed: {refused.message}", refused.err_type, refused.param,
                                      refused.code))
    _log_failure(err)
    return oai.sse(oai.error_body(f"generation failed: {err}", "server_error"))


def _log_failure(err: BaseException) -> None:
    if isinstance(err, EngineGone):
        _log.warning("request ended: %s", err)
    else:
        _log.exception("generation failed")


def _alive(engine: EngineClient) -> bool:
    try:
        return bool(engine.is_alive())
    except Exception:  # noqa: BLE001 - a broken engine is simply not alive
        return False


async def _read_json(request: Request, max_bytes: int, metrics: ServerMetrics | None = None):
    chunks, size = [], 0
    async for chunk in request.stream():  # counted as it comes: a body without Content-Length too
        size += len(chunk)
        if size > max_bytes:
            if metrics is not None:
                metrics.request_rejected("too_large")
            raise RequestError(_too_large(None, max_bytes)["error"]["message"], status=413,
                               code="request_too_large", headers={"Connection": "close"})
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except RecursionError:
        raise RequestError("the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError, or an integer of too many digits
        raise RequestError(f"the request body is not valid JSON ({err})") from None


def _body_doc(schema: dict) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": {"200": {"description": "the completion (or an SSE stream with stream=true)"},
                          "400": {"description": "invalid request (the error names the field)"},
                          "401": {"description": "missing or wrong API key"},
                          "404": {"description": "unknown model"},
                          "413": {"description": "request body too large"},
                          "429": {"description": "queue full; see Retry-After"}}}


def build_app(engine: EngineClient, model_name: str, metrics: ServerMetrics,
              settings: ApiSettings | None = None) -> FastAPI:
    """The HTTP app over `engine`; serve it with `serve_app`. settings: None reads them from the
    MESHSERVE_* environment (`ApiSettings.from_env`)."""
    settings = settings if settings is not None else ApiSettings.from_env()
    api = _Api(engine, model_name, metrics, settings)
    app = FastAPI(title="meshserve", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.api = api
    app.add_middleware(_Guard, settings=settings, metrics=metrics)

    @app.exception_handler(RequestError)
    async def _request_error(_request: Request, err: RequestError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, err: StarletteHTTPException):
        return JSONResponse(oai.error_body(str(err.detail)), status_code=err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, err: Exception):
        return JSONResponse(oai.error_body(f"internal error: {err}", "server_error"), status_code=500)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await api.handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await api.handle(request, chat=True)

    def openapi() -> dict:
        """FastAPI's document, with the request bodies made from the same bounds the parsers check
        (added afterwards: FastAPI's own schema model would turn 64-bit bounds into floats)."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path, chat in (("/v1/completions", False), ("/v1/chat/completions", True)):
                doc["paths"][path]["post"].update(_body_doc(oai.request_schema(chat, api.served)))
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [oai.model_card(model_name, api.created, engine.max_seq_len)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise oai.unknown_model(model_id, model_name)
        return oai.model_card(model_name, api.created, engine.max_seq_len)

    @app.get("/health")
    async def health():
        """Liveness: 200 while the engine loop is alive and stepping, and the server is not stopping."""
        if not _alive(engine):
            return JSONResponse({"status": "unavailable"}, status_code=503)
        if api.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """Readiness: 200 only while new requests are taken (not before the engine runs, nor while
        stopping, nor after a failure)."""
        if _alive(engine) and not api.draining and getattr(app.state, "serving", False):
            return {"status": "ready"}
        return JSONResponse({"status": "draining" if api.draining else "unavailable"}, status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


class _Uvicorn:
    """Built lazily so importing this module does not import uvicorn."""

    @staticmethod
    def server_class():
        import uvicorn

        class Server(uvicorn.Server):
            """uvicorn's server, with a drain on the first SIGINT/SIGTERM instead of its fixed
            shutdown: new requests get 503 while /health and /ready keep answering (503), requests
            in progress may finish until `drain_s` has passed, and whatever still runs then is
            ended with an error (a stream: an error event, then `data: [DONE]`). A second signal
            stops at once, as uvicorn does."""
            on_started = None
            api = None            # the _Api whose requests are drained
            drain_s = 30.0
            _deadline: float | None = None
            _cut_at: float | None = None

            async def startup(self, sockets=None):
                await super().startup(sockets)
                if not self.should_exit and self.on_started is not None:
                    self.on_started()

            def handle_exit(self, sig, frame) -> None:
                if self._deadline is None and self.api is not None and not self.should_exit:
                    getattr(self, "_captured_signals", []).append(sig)  # raised again once stopped
                    self._deadline = time.monotonic() + self.drain_s
                    self.api.draining = True
                    n = len(self.api.active)
                    _log.info("stopping: new requests get 503; waiting up to %gs for %d request(s) in progress",
                              self.drain_s, n)
                    return
                super().handle_exit(sig, frame)

            async def on_tick(self, counter: int) -> bool:
                if self._deadline is not None and not self.should_exit:
                    now = time.monotonic()
                    if not self.api.active:
                        _log.info("drained: no request in progress")
                        self.should_exit = True
                    elif self._cut_at is None and now >= self._deadline:
                        n = self.api.end_all(f"the server is stopping and the request did not finish within "
                                             f"the drain timeout ({self.drain_s:g}s)")
                        _log.warning("drain timeout (%gs): ended %d request(s) still in progress", self.drain_s, n)
                        self._cut_at = now
                    elif self._cut_at is not None and now > self._cut_at + 5:
                        self.should_exit = True
                return await super().on_tick(counter)

        return uvicorn, Server


def serve_app(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, ready: threading.Event | None = None,
              *, log_level: str = "info", access_log: bool = False, drain_timeout: float = 30.0) -> None:
    """Run uvicorn in this thread until it is told to stop (SIGINT/SIGTERM in the main thread, which
    drain for up to `drain_timeout` seconds first, or `app.state.server.should_exit = True`, which
    does not). Port 0 picks a free port; once the server accepts
    connections it prints "meshserve: serving on http://HOST:PORT" (HOST: this machine's host name
    when bound to every interface), stores the port in `app.state.port`, and sets `ready`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as err:
        sock.close()
        why = getattr(err, "strerror", None) or err
        raise UserError(f"cannot listen on {host}:{port} ({why}); pick another --port "
                        "(0 picks a free one) or --host") from None
    bound = sock.getsockname()[1]
    uvicorn, server_class = _Uvicorn.server_class()
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, timeout_graceful_shutdown=5)
    server = server_class(config)
    server.api, server.drain_s = getattr(app.state, "api", None), drain_timeout
    app.state.server, app.state.port = server, bound
    if host in ("0.0.0.0", "::", ""):  # every interface: show a name other machines can reach
        shown = socket.gethostname()
    else:
        shown = f"[{host}]" if family == socket.AF_INET6 else host

    def started():
        app.state.serving = True
        print(f"meshserve: serving on http://{shown}:{bound}", flush=True)
        if ready is not None:
            ready.set()

    server.on_started = started
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
