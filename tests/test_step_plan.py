"""The StepPlan wire format round-trips exactly, shutdown plans included."""
import torch
import torch.distributed as dist

from meshserve.launch.rank_env import free_port
from meshserve.workers.runtime.rank_protocol import SHUTDOWN, StepPlan, broadcast_plan, shutdown_plan


def _roundtrip_rank(rank, port, plans, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for plan in plans:
            got = broadcast_plan(plan if rank == 0 else None, dist.group.WORLD)
            if rank == 1:
                out.put({k: (v.tolist() if torch.is_tensor(v) else v) for k, v in vars(got).items()})
    finally:
        dist.destroy_process_group()


def test_plans_roundtrip():
    import multiprocessing as mp
    i = lambda *x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    f = lambda *x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    plan = StepPlan(i(5, 6, 7), i(0, 1, 0), i(8, 9, 16), i(2, 1), i(2, 1), i(1, 0, 2, 0).view(2, 2), i(0, 3),
                    i(11, 12), i(5, 6, -1, 7, -1, -1).view(2, 3), i(2, 1), f(0, 0.5), f(1, 0.9), f(0, 0.1),
                    f(0, 0.2), f(0.3, 0), f(1, 1.2), return_logits=True, num_logprobs=4)
    plans = [plan, shutdown_plan()]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_roundtrip_rank, args=(r, port, plans, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = [out.get(timeout=60) for _ in plans]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    want = {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in vars(plan).items()}
    assert got[0] == want
    assert got[1]["kind"] == SHUTDOWN and got[1]["temperature"] == []
