"""One tiny collective per group the mesh uses, each with a deadline, for `meshserve check` once every
rank reaches every peer: the control plane (an all-reduce over all ranks, gloo), each TP group (an
all-reduce on the device backend) and each pipeline hand-off (a send to the next stage's peer, on the
device backend). A collective that cannot finish would otherwise wait for the process group's
timeout; here it runs on a thread and counts as failed at its deadline (the process then exits
without waiting for it)."""
from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from meshserve.workers.engine_layout import mesh_coords
from meshserve.workers.runtime.mesh_check import PREFIX, collect


def _within(deadline_s: float, work) -> str:
    """'ok', 'failed: ...' or 'timed out after Ns': work() run on a thread for at most deadline_s."""
    result: list[str] = []

    def run():
        try:
            result.append(work())
        except Exception as err:  # noqa: BLE001 - reported in the table
            result.append(f"failed: {str(err).splitlines()[0][:160]}")

    thread = threading.Thread(target=run, name="meshserve-check-collective", daemon=True)
    thread.start()
    thread.join(deadline_s)
    return result[0] if result else f"timed out after {deadline_s:g}s"


def run_group_checks(store, rank: int, world_size: int, tp: int, device, timeout_s: float) -> dict[str, str]:
    """Form the process group and run each collective this rank takes part in; returns
    {"init" | "control" | "tp" | "pp": outcome} and publishes it for rank 0."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    stage, _ = mesh_coords(rank, tp)
    pp = world_size // tp
    results: dict[str, str] = {}
    groups: dict[str, object] = {}

    def init() -> str:
        dist.init_process_group(backend, store=dist.PrefixStore(f"{PREFIX}/pg", store), rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s),
                                **({"device_id": device} if backend == "nccl" else {}))
        groups["control"] = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
        for s in range(pp):
            group = dist.new_group(list(range(s * tp, (s + 1) * tp))) if tp > 1 else None
            if s == stage:
                groups["tp"] = group
        return "ok"

    def all_reduce(group, expect: int) -> str:
        on = torch.device("cpu") if group is groups["control"] else device
        t = torch.ones(1, device=on)
        dist.all_reduce(t, group=group)
        if on.type == "cuda":
            torch.cuda.synchronize(on)
        return "ok" if int(t.item()) == expect else f"failed: sum {t.item():g}, expected {expect}"

    def hand_off() -> str:
        ops = []
        t_out, t_in = torch.full((1,), float(rank), device=device), torch.zeros(1, device=device)
        if stage + 1 < pp:
            ops.append(dist.P2POp(dist.isend, t_out, rank + tp))
        if stage > 0:
            ops.append(dist.P2POp(dist.irecv, t_in, rank - tp))
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return "ok" if stage == 0 or int(t_in.item()) == rank - tp else "failed: wrong value received"

    results["init"] = _within(timeout_s, init)
    if results["init"] == "ok":
        results["control"] = _within(timeout_s, lambda: all_reduce(groups["control"], world_size))
        if tp > 1:
            results["tp"] = _within(timeout_s, lambda: all_reduce(groups["tp"], tp))
        if pp > 1:
            results["pp"] = _within(timeout_s, hand_off)
    store.set(f"{PREFIX}/groups/{rank}", json.dumps(results))
    return results


def gather_group_checks(store, world_size: int, timeout_s: float) -> dict[int, dict[str, str]]:
    """Rank 0: every rank's outcomes (a rank missing by the deadline is absent)."""
    keys = {r: f"{PREFIX}/groups/{r}" for r in range(world_size)}
    got = collect(store, list(keys.values()), time.monotonic() + 4 * timeout_s + 2)
    return {r: json.loads(got[k]) for r, k in keys.items() if k in got}


def group_problems(results: dict[int, dict[str, str]], world_size: int, tp: int, hosts: dict[int, str],
                   timeout_s: float) -> tuple[dict[int, str], list[tuple[list[str], str]]]:
    """The table's 'collectives' column and one problem per failing group."""
    column, found = {}, []
    names = {"init": "forming the process group", "control": "the control-plane all-reduce (all ranks, gloo)",
             "tp": "the TP group's all-reduce", "pp": "the pipeline hand-off to/from the next stage"}
    bad: dict[str, list[str]] = {}
    for r in range(world_size):
        got = results.get(r)
        if got is None:
            column[r] = "no answer"
            bad.setdefault("answer", []).append(f"rank {r} on {hosts.get(r, '?')}: no result within the deadline")
            continue
        failed = {k: v for k, v in got.items() if v != "ok"}
        column[r] = "ok" if not failed else ", ".join(f"{k} {v.split(':')[0]}" for k, v in failed.items())
        for k, v in failed.items():
            bad.setdefault(k, []).append(f"rank {r} on {hosts.get(r, '?')}: {names[k]} {v}")
    for k, lines in bad.items():
        found.append((lines, "every peer answered the probe, so the interface choice is right; look for "
                     "NCCL_* / GLOO_* settings that differ between the nodes, a GPU or driver fault on the "
                     f"hosts named, or raise --timeout (now {timeout_s:g}s) on a slow or loaded machine"))
    return column, found
