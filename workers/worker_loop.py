"""What every rank but 0 does: take the next StepPlan from rank 0 and run its share, until shutdown."""
from __future__ import annotations

from workers.step_plan import SHUTDOWN, broadcast_plan


def serve_steps(runner, mesh) -> None:
    while True:
        plan = broadcast_plan(None, mesh.control_group)
        if plan.kind == SHUTDOWN:
            return
        runner.run(plan)
