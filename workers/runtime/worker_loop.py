"""What every rank but 0 does: take the next StepPlan from rank 0 and run its share, until shutdown.

Plans arrive in rank 0's order and each is run to the end of this rank's share before the next, so
every stage sees the micro-batches in the same order (KV writes of a plan land before the next
plan's); the hidden states a stage passes on leave without waiting for the next stage. The number
of steps finished goes out with this rank's heartbeats (`watch`), so a stalled step can be traced to
the rank that did not finish it."""
from __future__ import annotations

from meshserve.workers.runtime.rank_protocol import SHUTDOWN, broadcast_plan


def serve_steps(runner, mesh, watch=None) -> None:
    """watch: this rank's workers.runtime.watchdog.PeerWatch (None: no heartbeats)."""
    while True:
        plan = broadcast_plan(None, mesh.control_group, ring=mesh.plan_ring)
        if plan.kind == SHUTDOWN:
            if watch is not None:
                watch.stop()  # rank 0 is about to leave: its silence from now on is expected
            runner.flush()
            return
        runner.launch(plan)
        if watch is not None:
            watch.finished_steps = plan.step_id + 1
