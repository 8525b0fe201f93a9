"""`meshserve bench gemv --shape NAME --tp N`: the decode-sized linears of one TP rank of a named
shape (qkv, o, gate/up with SiLU x up folded in, down), 1 and 8 rows, through cuBLAS and through the
Triton GEMV with its default configuration and every configuration of a small grid; each timed as
CUDA-graph replays over enough copies of the weight that none is still in L2 (a decode step reads
each weight once). Each result is checked against torch's. Writes the bench JSON (`mode`: "gemv",
one row per linear and row count) and prints it."""
from __future__ import annotations

import datetime
import itertools
import json
from pathlib import Path

ROWS = (1, 8)
GRID = list(itertools.product((16, 32, 64), (256, 512), (4, 8), (3, 4, 5)))  # (BLOCK_N, BLOCK_K, warps, stages)
COPY_BYTES = 400e6  # weight copies per timing: more than the L2 many times over


def run_gemv_bench(shape: str, tp: int, dtype_name: str, out: str | None, command: str, commit: str) -> str:
    import torch

    from meshserve.errors import UserError
    from meshserve.workers.build.random_checkpoint import SHAPES
    if shape not in SHAPES:
        raise UserError(f"unknown shape {shape!r}; known shapes: {', '.join(sorted(SHAPES))}")
    s = SHAPES[shape]
    head_dim = s["hidden"] // s["heads"]
    if tp < 1 or s["heads"] % tp or s["kv_heads"] % tp or s["intermediate"] % tp:
        raise UserError(f"--tp={tp} does not divide {shape}'s heads ({s['heads']}), KV heads ({s['kv_heads']}) "
                        f"and MLP width ({s['intermediate']})")
    if not torch.cuda.is_available():
        raise UserError("bench gemv runs on a CUDA GPU; none is visible here")
    dtype = getattr(torch, dtype_name)
    linears = {"qkv": ((s["heads"] + 2 * s["kv_heads"]) * head_dim // tp, s["hidden"], False),
               "o": (s["hidden"], s["hidden"] // tp, False),
               "gate_up": (s["intermediate"] // tp, s["hidden"], True),
               "down": (s["hidden"], s["intermediate"] // tp, False)}
    rows = [row for name, (n, k, gated) in linears.items() for row in _linear_rows(name, n, k, gated, dtype)]
    if out is None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        out = f"benchmarks/results/gemv-{shape}-{dtype_name}-tp{tp}-{stamp}.json"
    report = {"mode": "gemv", "commit": commit, "command": command,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(0), "gpus": 1, "tp": tp, "pp": 1, "dtype": dtype_name,
              "shape": shape, "output_tokens_per_s": None,  # no model run
              "configs": "(BLOCK_N, BLOCK_K, warps, stages)", "rows": rows}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2), flush=True)
    print(f"meshserve: bench results written to {out}", flush=True)
    return out


def _linear_rows(name: str, n: int, k: int, gated: bool, dtype) -> list[dict]:
    import torch

    from meshserve.workers.runtime.fused_kernels import silu_mul
    from meshserve.workers.runtime.gemv import _sm_count, default_config, gemv
    device = torch.device("cuda")
    weight_rows = 2 * n if gated else n
    weights = [torch.randn(weight_rows, k, device=device, dtype=dtype) / k ** 0.5
               for _ in range(max(2, int(COPY_BYTES // (weight_rows * k * dtype.itemsize))))]
    gb = weight_rows * k * dtype.itemsize / 1e9
    out = []
    for m in ROWS:
        x = torch.randn(m, k, device=device, dtype=dtype)

        def torch_op(w):
            y = x @ w.t()
            return silu_mul(y) if gated else y
        want = torch_op(weights[0]).float()
        row = {"linear": name, "n": n, "k": k, "gated": gated, "rows": m,
               "cublas_us": _graph_us([lambda w=w: torch_op(w) for w in weights])}
        err = (gemv(x, weights[0], gated=gated).float() - want).abs().max().item()
        row["default_config"] = list(default_config(n, gated, _sm_count(device)))
        row["default_us"] = _graph_us([lambda w=w: gemv(x, w, gated=gated) for w in weights])
        row["default_max_abs_diff"] = err
        timed = []
        for config in GRID:
            if gated and config[0] == 64:
                continue  # two 64-row tiles a step: more shared memory than an SM has
            try:
                timed.append((_graph_us([lambda w=w: gemv(x, w, gated=gated, config=config) for w in weights]),
                              list(config)))
            except Exception:  # noqa: BLE001 - a configuration this GPU cannot run (out of resources)
                continue
        timed.sort()
        row["best"] = [{"us": t, "config": c} for t, c in timed[:4]]
        for key in ("cublas", "default"):
            row[f"{key}_TBps"] = gb / row[f"{key}_us"] * 1e3
        out.append(row)
        print(f"meshserve: {name} [{m}, {k}] x [{weight_rows}, {k}]^T: cuBLAS {row['cublas_us']:.1f} us, "
              f"default {row['default_us']:.1f} us, best {timed[0][0]:.1f} us {timed[0][1]}", flush=True)
    return out


def _graph_us(calls, replays: int = 20) -> float:
    """Microseconds per call: the calls captured in turn in one CUDA graph, replayed."""
    import torch
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * len(calls))
