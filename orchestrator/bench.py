"""`meshserve bench latency|throughput`: figures of a built engine through the real rank mesh.

- latency: `batch` requests of `input_len` random tokens, `output_len` tokens each (greedy, no early
  stop): prefill time, then the time per output token and tokens/s of the decode phase, the
  weight bytes rank 0 reads per decode step against the copy bandwidth measured in the same run, and
  the control plane's share of a decode step: rank 0's time outside waiting for step results
  (scheduling, the plan and its delivery, filling the input buffers, launching, taking the results).
  On a GPU, with one step in flight, the device idles about that long each step; on CPU ranks the
  forward pass itself runs on the host and counts in. With scheduling ahead (EngineLoop), the
  decode rows that went out before their input token reached the host are counted.
- throughput: `num_prompts` such requests given to the scheduler at once, offline: output and total
  tokens/s, and the most KV blocks in use.

One warm-up round runs first. Each run writes one JSON file (the schema below) and prints it. With
`profile`, rank 0 also writes a torch.profiler table of the measured round next to it (".profile.txt"):
where the time goes, by operator and kernel, with the GPU's busy time against the wall time.
"""
from __future__ import annotations

import datetime
import gc
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class BenchSettings:
    mode: str              # "latency" | "throughput"
    batch: int = 1
    input_len: int = 128
    output_len: int = 128
    num_prompts: int = 1
    seed: int = 0
    profile: bool = False
    structured: dict | None = None  # a grammar every request follows (--response-format)


def run_bench(engine_dir: str, settings: BenchSettings, out: str | None, command: str, limits=None) -> str:
    """Run the benchmark on a locally started (or launched) mesh; returns the JSON file written."""
    from meshserve.launch.local_spawn import run_ranks
    from meshserve.workers.engine_files import read_engine_meta
    meta = read_engine_meta(engine_dir, limits)
    if out is None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        out = f"benchmarks/results/{settings.mode}-{meta.dir.name}-tp{meta.tp}pp{meta.pp}-{stamp}.json"
    run_ranks(meta.world_size, _bench_rank, str(engine_dir), settings, str(out), command, _commit(), limits,
              tp=meta.tp)
    return out


def _commit() -> str:
    if os.environ.get("MESHSERVE_COMMIT"):
        return os.environ["MESHSERVE_COMMIT"]
    proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def _bench_rank(env, engine_dir: str, settings: BenchSettings, out: str, command: str, commit: str, limits) -> None:
    from meshserve.orchestrator.engine_loop import EngineLoop
    from meshserve.orchestrator.rank_program import run_on_mesh

    def drive(runner, meta, broadcast) -> dict:
        tokenizer = None
        if settings.structured is not None:
            from meshserve.orchestrator.tokenizer import Tokenizer
            tokenizer = Tokenizer(meta.dir)
        loop = EngineLoop(runner, meta, broadcast, tokenizer)
        measure = _latency if settings.mode == "latency" else _throughput
        measure(loop, settings, warm_up=True)
        if settings.profile:
            figures = _profiled(lambda: measure(loop, settings, warm_up=False), Path(out).with_suffix(".profile.txt"))
        else:
            figures = measure(loop, settings, warm_up=False)
        loop.drain()
        return _header(meta, runner.mesh.device, settings, command, commit) | figures

    report = run_on_mesh(env, engine_dir, drive, limits)
    if report is None:  # not rank 0
        return
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2), flush=True)
    if "control_plane_share" in report:
        print(f"meshserve: control plane {report['control_plane_ms_per_step']:.3f} ms of each decode step "
              f"({report['control_plane_share']:.1%})", flush=True)
    if "exposed_control_plane_share" in report:
        print(f"meshserve: rank 0's GPU idle between steps {report['gpu_idle_ms_per_step']:.3f} ms per step "
              f"({report['exposed_control_plane_share']:.1%} of the time)", flush=True)
    print(f"meshserve: bench results written to {out}", flush=True)


def _profiled(run, path: Path) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        figures = run()
    wall = time.perf_counter() - start
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events)
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"wall {wall * 1e3:.1f} ms, device busy {device_us / 1e3:.1f} ms (profiler overhead included)\n"
                    + events.table(sort_by=sort, row_limit=40, max_name_column_width=60) + "\n")
    del prof, events
    gc.collect()
    return figures | {"profile": str(path)}


def _requests(loop, settings: BenchSettings, count: int, output_len: int, warm_up: bool):
    """Random prompts; the warm-up round's differ from the measured round's, so no measured prompt
    is a prefix-cache hit."""
    import torch

    from meshserve.orchestrator.sampling_params import SamplingParams
    gen = torch.Generator().manual_seed(settings.seed * 2 + int(warm_up))
    vocab = loop.meta.spec.vocab_size
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True, structured=settings.structured)
    return [loop.add_request(torch.randint(0, vocab, (settings.input_len,), generator=gen).tolist(), params)
            for _ in range(count)]


def _latency(loop, settings: BenchSettings, warm_up: bool) -> dict:
    output_len = min(settings.output_len, 4) if warm_up else settings.output_len
    seqs = _requests(loop, settings, settings.batch, output_len, warm_up)
    t0 = time.perf_counter()
    while not all(s.output_ids for s in seqs):  # prefill: until every request has its first token
        loop.step()
    meter = _idle_meter(loop, warm_up)
    t1, waited, ahead = time.perf_counter(), loop.wait_s, loop.rows_ahead
    steps = 0
    while loop.has_work():
        loop.step()
        steps += 1
    t2 = time.perf_counter()
    loop.runner.idle_meter = None
    host_s = (t2 - t1) - (loop.wait_s - waited)
    decode_tokens = sum(len(s.output_ids) for s in seqs) - len(seqs)
    per_token = (t2 - t1) / max(1, output_len - 1)
    weights = sum(p.numel() * p.element_size() for p in loop.runner.model.parameters())
    copy_bw = _copy_bandwidth(loop.runner.mesh.device)
    step_s = (t2 - t1) / max(1, steps)
    return {"prefill_s": t1 - t0, "prefill_tokens_per_s": settings.batch * settings.input_len / (t1 - t0),
            "ms_per_token": per_token * 1e3, "output_tokens_per_s": decode_tokens / max(1e-9, t2 - t1),
            "decode_step_ms": step_s * 1e3, "rank0_weight_bytes": weights,
            "rank0_weight_read_GBps": weights / step_s / 1e9, "copy_bandwidth_GBps": copy_bw,
            "weight_read_fraction_of_copy": weights / step_s / 1e9 / copy_bw,
            "control_plane_ms_per_step": host_s / max(1, steps) * 1e3,
            "control_plane_share": host_s / max(1e-9, t2 - t1),
            "decode_rows_scheduled_ahead": loop.rows_ahead - ahead} | _idle_figures(meter, t2 - t1)


def _idle_meter(loop, warm_up: bool):
    """On a GPU engine whose rank 0 samples (one stage): an IdleMeter on rank 0's steps."""
    runner = loop.runner
    if warm_up or runner.mesh.device.type != "cuda" or runner.mesh.sampler_rank != 0:
        return None
    from meshserve.workers.runtime.idle_meter import IdleMeter
    runner.idle_meter = IdleMeter()
    return runner.idle_meter


def _idle_figures(meter, wall_s: float) -> dict:
    """The control plane's exposed share: rank 0's GPU idle between decode steps over the wall time
    (control_plane_share counts rank 0's host time, which scheduling ahead overlaps with the GPU)."""
    if meter is None:
        return {}
    idle, steps = meter.idle_s()
    return {"gpu_idle_ms_per_step": idle / max(1, steps) * 1e3, "exposed_control_plane_share": idle / max(1e-9, wall_s)}


def _throughput(loop, settings: BenchSettings, warm_up: bool) -> dict:
    count = min(settings.num_prompts, 2) if warm_up else settings.num_prompts
    output_len = min(settings.output_len, 4) if warm_up else settings.output_len
    seqs = _requests(loop, settings, count, output_len, warm_up)
    peak_blocks = 0
    t0 = time.perf_counter()
    while loop.has_work():
        loop.step()
        peak_blocks = max(peak_blocks, loop.blocks.num_used)
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(s.output_ids) for s in seqs)
    return {"elapsed_s": elapsed, "output_tokens_per_s": out_tokens / elapsed,
            "total_tokens_per_s": (out_tokens + count * settings.input_len) / elapsed,
            "peak_kv_blocks": peak_blocks, "kv_blocks": loop.blocks.num_blocks - 1}


def _copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second, in GB/s) on rank 0's device."""
    import torch
    n = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n * reps / (time.perf_counter() - t0) / 1e9


def _header(meta, device, settings: BenchSettings, command: str, commit: str) -> dict:
    import torch
    spec = meta.spec
    return {"mode": settings.mode, "commit": commit, "command": command,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "gpus": meta.world_size if device.type == "cuda" else 0, "tp": meta.tp, "pp": meta.pp,
            "dtype": meta.dtype, "engine": meta.dir.name, "load_format": meta.load_format,
            "shape": {"hidden": spec.hidden_size, "layers": spec.num_layers, "heads": spec.num_heads,
                      "kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
                      "intermediate": spec.intermediate_size, "vocab": spec.vocab_size},
            "batch": settings.batch if settings.mode == "latency" else None, "input_len": settings.input_len,
            "response_format": settings.structured,
            "output_len": settings.output_len,
            "num_prompts": settings.num_prompts if settings.mode == "throughput" else settings.batch,
            "max_batch_size": meta.max_batch_size, "max_num_tokens": meta.max_num_tokens}
