"""`meshserve bench serve`: a running server under a stream of requests, as clients see it.

Requests arrive as a Poisson process at `rate` per second (all at once with rate inf), each a
completion of `input_len` random token ids streamed back for `output_len` tokens (greedy, no early
stop). Per request: time to first token (TTFT: from sending to the first streamed chunk), time per
output token after it (TPOT) and end-to-end latency; reported at p50 / p90 / p99 with completed and
failed counts, in one JSON file of the schema the other bench modes write (`mode` "serve").
The requests are sent from several client processes (`client_processes`), each its share of one
common schedule; `send_lag_ms_*` says how late requests left against that schedule, so a client
that cannot keep up shows rather than passing for a slow server.
"""
from __future__ import annotations

import asyncio
import datetime
import json
import math
import os
import queue as queue_mod
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServeBenchSettings:
    url: str
    rate: float                 # requests per second; math.inf sends them all at once
    num_prompts: int = 100
    input_len: int = 128
    output_len: int = 128
    seed: int = 0
    model: str | None = None    # default: the server's first model
    api_key: str | None = None
    vocab_size: int = 1000      # prompts draw token ids below this (the engine's vocabulary when known)
    client_processes: int = 0   # processes sending the requests; 0: one per 4 CPUs, 1 to 4


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


async def _one(client, settings: ServeBenchSettings, model: str, prompt: list[int]) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": settings.output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.monotonic()
    first, chunks, usage = None, 0, None
    try:
        async with client.stream("POST", f"{settings.url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                return {"ok": False, "error": f"HTTP {resp.status_code}: {text[:200]}"}
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return {"ok": False, "error": str(chunk["error"])[:200]}
                if chunk.get("choices"):
                    chunks += 1
                    if first is None:
                        first = time.monotonic()
                usage = chunk.get("usage") or usage
    except Exception as err:  # a refused connection, a cut stream: a failed request, not a failed run
        return {"ok": False, "error": f"{type(err).__name__}: {err}"}
    end = time.monotonic()
    tokens = usage["completion_tokens"] if usage else chunks
    if first is None or tokens < 1:
        return {"ok": False, "error": "the stream ended without a token"}
    return {"ok": True, "ttft": first - start, "e2e": end - start, "tokens": tokens,
            "tpot": (end - first) / (tokens - 1) if tokens > 1 else None}


def client_processes(settings: ServeBenchSettings) -> int:
    """Processes that send the requests: one Python process parses ~9,000 streamed chunks a second
    at most, so above ~70 requests/s of 128 tokens a single client, not the server, sets the pace."""
    auto = max(1, min(4, (os.cpu_count() or 1) // 4))
    return max(1, min(settings.num_prompts, settings.client_processes or auto))


def _schedule(settings: ServeBenchSettings) -> list[tuple[float, list[int]]]:
    """(seconds after the start, prompt) per request: Poisson arrivals, or all at 0 for rate inf."""
    rng = random.Random(settings.seed)
    prompts = [[rng.randrange(settings.vocab_size) for _ in range(settings.input_len)]
               for _ in range(settings.num_prompts)]
    at, out = 0.0, []
    for i, prompt in enumerate(prompts):
        if i and not math.isinf(settings.rate):
            at += rng.expovariate(settings.rate)
        out.append((at, prompt))
    return out


async def _send(settings: ServeBenchSettings, model: str, jobs, ready) -> list[dict]:
    """Send each (offset, prompt) at start + offset, where start = ready() once the client is set up."""
    import httpx
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30.0), limits=limits, headers=headers) as client:
        start_at = ready()

        async def timed(offset: float, prompt: list[int]) -> dict:
            lag = time.monotonic() - (start_at + offset)
            result = await _one(client, settings, model, prompt)
            return result | {"lag": max(0.0, lag), "end": time.monotonic()}
        tasks = []
        for offset, prompt in jobs:
            delay = start_at + offset - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(timed(offset, prompt)))
        return list(await asyncio.gather(*tasks))


def _client_process(settings, model, jobs, barrier, start_at, results) -> None:
    """One sending process: ready, wait for the others, send its share, put its results (JSON)."""
    def ready() -> float:
        barrier.wait()   # every process is ready: the parent sets the common start
        barrier.wait()
        return start_at.value
    try:
        results.put(json.dumps(asyncio.run(_send(settings, model, jobs, ready))))
    except BaseException as err:  # noqa: BLE001 - the parent reports it
        results.put(json.dumps({"crashed": f"{type(err).__name__}: {err}"}))


def _run(settings: ServeBenchSettings) -> dict:
    import multiprocessing

    import httpx
    model = settings.model
    if model is None:
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        resp = httpx.get(f"{settings.url}/v1/models", headers=headers, timeout=30.0)
        resp.raise_for_status()
        model = resp.json()["data"][0]["id"]
    jobs = _schedule(settings)
    workers = client_processes(settings)
    ctx = multiprocessing.get_context("spawn")
    barrier, start_at, queue = ctx.Barrier(workers + 1, timeout=120), ctx.Value("d", 0.0), ctx.Queue()
    procs = [ctx.Process(target=_client_process, args=(settings, model, jobs[w::workers], barrier, start_at, queue),
                         daemon=True) for w in range(workers)]
    for proc in procs:
        proc.start()
    try:
        barrier.wait()
        start_at.value = time.monotonic() + 0.05
        barrier.wait()
        parts = []
        while len(parts) < len(procs):
            try:
                parts.append(json.loads(queue.get(timeout=1.0)))
            except queue_mod.Empty:
                if not any(proc.is_alive() for proc in procs):
                    raise RuntimeError("bench serve: a client process exited without its results") from None
    except threading.BrokenBarrierError:
        raise RuntimeError("bench serve: a client process did not start within 120 s") from None
    finally:
        for proc in procs:
            proc.join(timeout=10)
    crashed = [p["crashed"] for p in parts if isinstance(p, dict)]
    if crashed:
        raise RuntimeError(f"bench serve: a client process failed: {crashed[0]}")
    results = [r for part in parts for r in part]
    elapsed = max(r["end"] for r in results) - start_at.value
    done = [r for r in results if r["ok"]]
    failed = [r for r in results if not r["ok"]]
    ms = lambda key: [r[key] * 1e3 for r in done if r.get(key) is not None]  # noqa: E731
    out = {"model": model, "rate": settings.rate if not math.isinf(settings.rate) else "inf",
           "completed": len(done), "failed": len(failed), "duration_s": elapsed,
           "request_throughput": len(done) / elapsed,
           "output_tokens_per_s": sum(r["tokens"] for r in done) / elapsed, "client_processes": workers}
    for name, values in (("ttft_ms", ms("ttft")), ("tpot_ms", ms("tpot")), ("e2e_ms", ms("e2e")),
                         ("send_lag_ms", [r["lag"] * 1e3 for r in results])):
        for q in (50, 90, 99):
            out[f"{name}_p{q}"] = percentile(values, q)
    if failed:
        out["first_error"] = failed[0]["error"]
    return out


def run_serve_bench(settings: ServeBenchSettings, out: str | None, command: str, commit: str,
                    meta=None) -> tuple[str, dict]:
    """Run it; write the JSON (header fields about the engine come from `meta` when given, else null)."""
    figures = _run(settings)
    spec = meta.spec if meta is not None else None
    report = {"mode": "serve", "commit": commit, "command": command,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": None, "gpus": None, "tp": meta.tp if meta else None, "pp": meta.pp if meta else None,
              "dtype": meta.dtype if meta else None, "engine": meta.dir.name if meta else None,
              "shape": {"hidden": spec.hidden_size, "layers": spec.num_layers, "heads": spec.num_heads,
                        "kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
                        "intermediate": spec.intermediate_size, "vocab": spec.vocab_size} if spec else None,
              "url": settings.url, "batch": None, "input_len": settings.input_len,
              "output_len": settings.output_len, "num_prompts": settings.num_prompts} | figures
    if out is None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        out = f"benchmarks/results/serve-{report['engine'] or 'server'}-{stamp}.json"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    return out, report
