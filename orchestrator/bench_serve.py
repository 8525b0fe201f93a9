"""`meshserve bench serve`: a running server under a stream of requests, as clients see it.

Requests arrive as a Poisson process at `rate` per second (all at once with rate inf), each a
completion of `input_len` random token ids streamed back for `output_len` tokens (greedy, no early
stop). Per request: time to first token (TTFT: from sending to the first streamed chunk), time per
output token after it (TPOT) and end-to-end latency; reported at p50 / p90 / p99 with completed and
failed counts, in one JSON file of the schema the other bench modes write (`mode` "serve").
"""
from __future__ import annotations

import asyncio
import datetime
import json
import math
import random
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


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


async def _one(client, settings: ServeBenchSettings, model: str, prompt: list[int]) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": settings.output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
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
                        first = time.perf_counter()
                usage = chunk.get("usage") or usage
    except Exception as err:  # a refused connection, a cut stream: a failed request, not a failed run
        return {"ok": False, "error": f"{type(err).__name__}: {err}"}
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else chunks
    if first is None or tokens < 1:
        return {"ok": False, "error": "the stream ended without a token"}
    return {"ok": True, "ttft": first - start, "e2e": end - start, "tokens": tokens,
            "tpot": (end - first) / (tokens - 1) if tokens > 1 else None}


async def _run(settings: ServeBenchSettings) -> dict:
    import httpx
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30.0), limits=limits, headers=headers) as client:
        model = settings.model
        if model is None:
            resp = await client.get(f"{settings.url}/v1/models")
            resp.raise_for_status()
            model = resp.json()["data"][0]["id"]
        rng = random.Random(settings.seed)
        prompts = [[rng.randrange(settings.vocab_size) for _ in range(settings.input_len)]
                   for _ in range(settings.num_prompts)]
        tasks, start = [], time.perf_counter()
        for i, prompt in enumerate(prompts):
            if i and not math.isinf(settings.rate):
                await asyncio.sleep(rng.expovariate(settings.rate))
            tasks.append(asyncio.ensure_future(_one(client, settings, model, prompt)))
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    done = [r for r in results if r["ok"]]
    failed = [r for r in results if not r["ok"]]
    ms = lambda key: [r[key] * 1e3 for r in done if r.get(key) is not None]  # noqa: E731
    out = {"model": model, "rate": settings.rate if not math.isinf(settings.rate) else "inf",
           "completed": len(done), "failed": len(failed), "duration_s": elapsed,
           "request_throughput": len(done) / elapsed,
           "output_tokens_per_s": sum(r["tokens"] for r in done) / elapsed}
    for name, values in (("ttft_ms", ms("ttft")), ("tpot_ms", ms("tpot")), ("e2e_ms", ms("e2e"))):
        for q in (50, 90, 99):
            out[f"{name}_p{q}"] = percentile(values, q)
    if failed:
        out["first_error"] = failed[0]["error"]
    return out


def run_serve_bench(settings: ServeBenchSettings, out: str | None, command: str, commit: str,
                    meta=None) -> tuple[str, dict]:
    """Run it; write the JSON (header fields about the engine come from `meta` when given, else null)."""
    figures = asyncio.run(_run(settings))
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
