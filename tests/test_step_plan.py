"""The StepPlan wire format round-trips exactly, shutdown plans included, over gloo and through the
shared-memory plan ring (whose slots wrap, and which hands plans larger than a slot to gloo)."""
import multiprocessing as mp
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from meshserve.launch.rank_env import free_port
from meshserve.workers.runtime.plan_ring import SLOT_BYTES, SLOTS, open_plan_ring
from meshserve.workers.runtime.rank_protocol import SHUTDOWN, StepPlan, broadcast_plan, shutdown_plan


def _as_lists(plan: StepPlan) -> dict:
    return {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in vars(plan).items()}


def _roundtrip_rank(rank, port, plans, transport, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ring = None
        if transport == "ring":
            ring = open_plan_ring(SimpleNamespace(world_size=2, rank=rank, control_group=dist.group.WORLD))
            if rank == 1:
                out.put(ring is not None)
        for plan in plans:
            got = broadcast_plan(plan if rank == 0 else None, dist.group.WORLD, ring=ring)
            if rank == 1:
                out.put(_as_lists(got))
    finally:
        dist.destroy_process_group()


def _plan(seed: int, history_width: int = 3) -> StepPlan:
    gen = torch.Generator().manual_seed(seed)
    i = lambda *shape: torch.randint(-5, 1000, shape, generator=gen)  # noqa: E731
    f = lambda *shape: torch.rand(shape, generator=gen)  # noqa: E731
    t, b = 3 + seed % 4, 2
    return StepPlan(i(t), i(t), i(t), i(b), i(b), i(b, 2), i(b), i(b), i(b, history_width), i(b), f(b), f(b), f(b),
                    f(b), f(b), f(b), bias_rows=i(2), bias_ids=i(2), bias_values=f(2), mask_rows=i(1),
                    token_mask=i(1, 4), return_logits=bool(seed % 2), num_logprobs=seed % 3 - 1, step_id=seed,
                    prompt_rows=i(seed % 3), prompt_targets=i(seed % 3), num_prompt_logprobs=seed % 4 - 1,
                    copy_blocks=i(seed % 3, 2))


@pytest.mark.parametrize("transport", ["gloo", "ring"])
def test_plans_roundtrip(transport):
    big = _plan(99, history_width=SLOT_BYTES // 8)  # larger than a ring slot: sent over gloo
    plans = [_plan(0), big, *(_plan(s) for s in range(1, 2 * SLOTS + 2)), shutdown_plan()]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_roundtrip_rank, args=(r, port, plans, transport, out)) for r in range(2)]
    for p in procs:
        p.start()
    if transport == "ring":
        assert out.get(timeout=60) is True, "the two ranks share /dev/shm: the ring must open"
    got = [out.get(timeout=60) for _ in plans]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for sent, received in zip(plans[:-1], got[:-1], strict=True):
        assert received == _as_lists(sent)
    assert got[-1]["kind"] == SHUTDOWN and got[-1]["temperature"] == [] and got[-1]["copy_blocks"] == []
    assert any(len(g["copy_blocks"]) == 2 for g in got[:-1])
