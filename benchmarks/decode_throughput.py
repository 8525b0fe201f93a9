"""Decode and prefill throughput of a built engine through the real rank mesh.

    python benchmarks/decode_throughput.py --engine ENGINE --batch 1 8 --prompt-len 128 --new-tokens 128 \
        --out benchmarks/results/NAME.json

Rank 0 times whole steps (every step ends with the sampled ids on the host), so the figures include
all scheduling and communication. Under pipeline parallelism a step finishes one micro-batch, so
decode tokens/s counts the tokens the steps returned. Writes the command, the commit and the device
with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _profile_decode(loop, meta, batch, prompt_len, path):
    """Where rank 0's decode steps spend their time (torch.profiler table)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from meshserve.orchestrator.sampling_params import SamplingParams
    for _ in range(batch):
        loop.add_request(list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=40, temperature=0))
    for _ in range(5):
        loop.step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for _ in range(10):
            loop.step()
    while loop.has_work():
        loop.step()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    text = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    text += "\n" + prof.key_averages().table(sort_by=key, row_limit=20)
    Path(path).write_text(text)


def bench_rank(env, engine_dir, batches, prompt_len, new_tokens, out_path, command, profile_path=None):
    import torch

    from meshserve.orchestrator.engine_loop import EngineLoop
    from meshserve.orchestrator.rank_program import RankSession
    from meshserve.orchestrator.sampling_params import SamplingParams
    session = RankSession(env, engine_dir)
    if not session.is_driver:
        session.follow()
        return
    runner, meta = session.runner, session.meta
    loop = EngineLoop(runner, meta, session.broadcast)
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    results = []
    for batch in [batches[0]] + batches:  # the first round warms up
        g = torch.Generator().manual_seed(batch)
        seqs = []
        for _ in range(batch):
            ids = torch.randint(3, meta.spec.vocab_size, (prompt_len,), generator=g).tolist()
            seqs.append(loop.add_request(ids, SamplingParams(max_tokens=new_tokens, temperature=0)))
        t0 = time.perf_counter()
        while not all(s.output_ids for s in seqs):  # prefill: until every sequence has its first token
            loop.step()
        t1 = time.perf_counter()
        steps = decoded = 0
        while loop.has_work():  # under PP a step finishes one micro-batch of ~batch/pp sequences
            decoded += len(loop.step())
            steps += 1
        t2 = time.perf_counter()
        step_s = (t2 - t1) / max(1, steps)
        results.append({"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                        "prefill_s": t1 - t0, "prefill_tokens_per_s": batch * prompt_len / (t1 - t0),
                        "decode_step_ms": step_s * 1e3, "decode_tokens_per_s": decoded / max(1e-9, t2 - t1),
                        "rank0_weight_GBps": weight_bytes / step_s / 1e9})
    if profile_path:
        _profile_decode(loop, meta, batches[-1], prompt_len, profile_path)
    loop.drain()
    session.close()
    commit = os.environ.get("BENCH_COMMIT") or subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report = {"command": command, "commit": commit, "device": device, "world_size": meta.world_size,
              "tp": meta.tp, "pp": meta.pp, "dtype": meta.dtype, "engine_source": str(meta.dir.name),
              "results": results[1:]}
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", required=True)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", required=True)
    ap.add_argument("--profile", help="also write a torch.profiler table of 10 decode steps here")
    args = ap.parse_args()
    from meshserve.launch.local_spawn import run_ranks
    from meshserve.workers.engine_files import read_engine_meta
    meta = read_engine_meta(args.engine)
    run_ranks(meta.world_size, bench_rank, args.engine, args.batch, args.prompt_len, args.new_tokens,
              args.out, " ".join(["python"] + sys.argv), args.profile)


if __name__ == "__main__":
    main()
