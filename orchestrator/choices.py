"""Several choices per request (`n`, `best_of`): each choice is its own engine request with its own
seed stream, and the answer gathers them by index (streamed: chunks interleave as the choices make
text, each carrying its index).

Choice i of a request seeded with `seed` draws as a single request seeded with `seed + i` would
(wrapped into the seed's 64-bit range), so any choice can be reproduced alone. The choices reach the
engine together (its generate_group): the first prefills the prompt, the others fork off its last
position and share every KV block of the prompt, the partial last one included, each copying that
block when it writes its first token there (orchestrator/scheduler.py). With an engine that takes
requests one by one, the choices after the first start once the first has its first token, and find
the prompt's full blocks in the prefix cache. With best_of > n,
best_of sequences run and the n with the highest cumulative log-probability (of the model's raw
distribution) are returned, best first.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools

import anyio

from meshserve.errors import UserError
from meshserve.orchestrator import openai_protocol as oai
from meshserve.orchestrator import tool_calls
from meshserve.orchestrator.sampling_params import SamplingParams

SEED_LO, SEED_HI = -(2**63), 2**64 - 1


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index`: seed + index, wrapped into [-2**63, 2**64 - 1]."""
    if seed is None:
        return None
    s = seed + index
    return s - 2**64 if s > SEED_HI else s


def choice_params(params: SamplingParams, count: int, ranked: bool) -> list[SamplingParams]:
    """One SamplingParams per sequence; `ranked` (best_of > n): each reports its tokens' logprobs.
    Only the first computes the prompt's logprobs (every choice echoes the same prompt), so the
    others may take its prompt blocks from the prefix cache."""
    out = []
    for i in range(count):
        p = dataclasses.replace(params, seed=choice_seed(params.seed, i),
                                prompt_logprobs=params.prompt_logprobs if i == 0 else None)
        if ranked and p.logprobs is None:
            p.logprobs = 0
        out.append(p)
    return out


async def _all(coros) -> list:
    """Run the coroutines together; when one fails the others are cancelled (closing their engine
    requests) before the error goes on."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        await _cancel(tasks)


async def _cancel(tasks) -> None:
    for t in tasks:
        t.cancel()
    with anyio.CancelScope(shield=True):
        await asyncio.wait(tasks)


async def _after_first(gens, i: int) -> None:
    if i > 0 and gens[0].source is None:  # (a group reaches the engine at once)
        await gens[0].started.wait()


class _Group:
    """The choices' engine requests, submitted together when the first choice's pump asks for its
    events; close() aborts those never read."""

    def __init__(self, engine, prompt_ids: list[int], params: list[SamplingParams]):
        self.engine, self.prompt_ids, self.params = engine, prompt_ids, params
        self.events = None

    def take(self, i: int):
        if self.events is None:
            self.events = self.engine.generate_group(self.prompt_ids, self.params)
        return self.events[i]

    async def close(self) -> None:
        for events in self.events or ():
            await events.aclose()


async def respond(api, request, req: oai.ParsedRequest, prompt_ids: list[int], params: SamplingParams,
                  start: float, ticket):
    """The response to a request with n > 1 or best_of > 1 (admitted with `ticket`)."""
    from meshserve.orchestrator.api_server import _EventStream, _Generation
    count = max(req.n, req.best_of)
    ranked = req.best_of > req.n
    gens = [_Generation(api, request, prompt_ids, p, req.logprobs, start, ticket)
            for p in choice_params(params, count, ranked)]
    group = None
    if hasattr(api.engine, "generate_group"):
        group = _Group(api.engine, prompt_ids, [g.params for g in gens])
    for i, gen in enumerate(gens):
        api.set_echo(gen, req, prompt_ids)
        if group is not None:
            gen.source = functools.partial(group.take, i)
    if req.stream:
        return _EventStream(_stream(api, gens, req, group), on_close=ticket.release,
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        return await _gather(api, gens, req, ranked)
    finally:
        if group is not None:
            with anyio.CancelScope(shield=True):
                await group.close()


def _failure(api, req: oai.ParsedRequest, err: Exception) -> oai.RequestError:
    from meshserve.orchestrator.api_server import EngineGone, _alive, _log_failure
    if isinstance(err, UserError):
        return oai.engine_refusal(req, err)
    _log_failure(err)
    status = 503 if isinstance(err, EngineGone) or not _alive(api.engine) else 500
    return oai.RequestError(f"generation failed: {err}", status=status, err_type="server_error")


async def _gather(api, gens, req: oai.ParsedRequest, ranked: bool):
    from fastapi.responses import JSONResponse, Response

    async def one(i: int, gen):
        await _after_first(gens, i)
        parts, entries, finish = [gen.echo], [], None
        steps = gen.steps()
        try:
            async for step in steps:
                parts.append(step.text)
                entries += step.logprobs
                finish = step.finish_reason or finish
        finally:
            await steps.aclose()
        return "".join(parts), entries, finish, gen.cum_logprob

    try:
        results = await _all(one(i, g) for i, g in enumerate(gens))
    except Exception as err:  # noqa: BLE001 - said in the OpenAI shape
        raise _failure(api, req, err) from None
    if any(finish is None for _, _, finish, _ in results):  # the client hung up; nobody reads this
        return Response(status_code=499)
    if ranked:
        results = sorted(results, key=lambda r: -r[3])[: req.n]
    build = oai.chat_response if req.chat else oai.completion_response
    prompt_entries = gens[0].prompt_entries or []  # the first choice's; every choice echoes the same prompt
    choices = []
    for i, (text, entries, finish, _) in enumerate(results):
        choice = build("", 0, "", text, finish, 0, 0, api._format_logprobs(req, prompt_entries + entries))["choices"][0]
        choice["index"] = i
        tool_calls.apply(choice, req.tools)
        choices.append(choice)
    body = build(oai.new_id(req.chat), oai.now(), api.model_name, "", "stop", len(gens[0].prompt_ids),
                 sum(g.completion_tokens for g in gens), None)
    body["choices"] = choices
    return JSONResponse(body)


async def _stream(api, gens, req: oai.ParsedRequest, group: _Group | None = None):
    from meshserve.orchestrator.api_server import in_band_error
    rid, created, model = oai.new_id(req.chat), oai.now(), api.model_name
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    def chunk(i: int, text: str, finish: str | None, entries, first: bool = False, delta: dict | None = None) -> dict:
        lp = api._format_logprobs(req, entries)
        if req.chat:
            if delta is None:
                delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            out = oai.chat_chunk(rid, created, model, delta, finish, lp)
        else:
            out = oai.completion_chunk(rid, created, model, text, finish, lp)
        out["choices"][0]["index"] = i
        if req.include_usage:
            out["usage"] = None
        return out

    async def pump(i: int, gen) -> None:
        await _after_first(gens, i)
        if i and needs_entries:  # its echo carries the first choice's prompt entries: made at its first token
            await gens[0].started.wait()
        steps = gen.steps()
        try:
            async for step in steps:
                queue.put_nowait((i, step))
        except Exception as err:  # noqa: BLE001 - handed to the stream, which reports it
            queue.put_nowait((i, err))
        finally:
            await steps.aclose()
            queue.put_nowait((i, done))

    needs_entries = req.echo and req.logprobs is not None
    parses = req.tools is not None and req.tools.parses
    calls = [tool_calls.CallStream(req.tools) if parses else None for _ in gens]  # per choice
    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    # with logprobs, a choice's echo waits for its first step: the prompt's logprobs come with the
    # first choice's first token (the others are read after it)
    echo_later = [needs_entries] * len(gens)
    try:
        for i, gen in enumerate(gens):
            if req.chat:
                yield oai.sse(chunk(i, "", None, [], first=True))
            elif req.echo and not echo_later[i]:
                yield oai.sse(chunk(i, gen.echo, None, []))
        left = len(gens)
        while left:
            i, item = await queue.get()
            if item is done:
                left -= 1
                continue
            if isinstance(item, Exception):
                raise item
            if echo_later[i]:
                echo_later[i] = False
                yield oai.sse(chunk(i, gens[i].echo, None, gens[0].prompt_entries or []))
            if calls[i] is None:
                yield oai.sse(chunk(i, item.text, item.finish_reason, item.logprobs))
            else:
                for delta, finish, entries in calls[i].step(item.text, item.finish_reason, item.logprobs):
                    yield oai.sse(chunk(i, "", finish, entries, delta=delta))
        if req.include_usage:
            yield oai.sse(oai.usage_chunk(rid, created, model, req.chat, len(gens[0].prompt_ids),
                                          sum(g.completion_tokens for g in gens)))
        yield oai.SSE_DONE
    except Exception as err:  # noqa: BLE001 - the status line is gone; report in-band
        yield in_band_error(err, req)
        yield oai.SSE_DONE
    finally:
        await _cancel(tasks)
        if group is not None:
            with anyio.CancelScope(shield=True):
                await group.close()
