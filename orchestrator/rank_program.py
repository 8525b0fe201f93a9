"""The program every rank runs: join the mesh, load its shard, then either follow rank 0's plans or
(rank 0) drive the mesh with `drive(runner, meta, broadcast)` and tell the others to stop."""
from __future__ import annotations


def run_on_mesh(env, engine_dir: str, drive) -> None:
    from workers.engine_files import read_engine_meta
    from workers.mesh import close_mesh, init_mesh
    from workers.step_plan import broadcast_plan, shutdown_plan
    from workers.step_runner import StepRunner
    from workers.worker_loop import serve_steps
    meta = read_engine_meta(engine_dir)
    mesh = init_mesh(env, meta.tp, meta.pp)
    try:
        runner = StepRunner(meta, mesh)
        if mesh.rank != 0:
            serve_steps(runner, mesh)
            return
        broadcast = (lambda plan: broadcast_plan(plan, mesh.control_group)) if mesh.world_size > 1 \
            else (lambda plan: plan)
        try:
            drive(runner, meta, broadcast)
        except BaseException:
            if mesh.world_size > 1:
                try:  # let healthy ranks leave cleanly; a broken mesh is reported by the first error
                    broadcast(shutdown_plan())
                except Exception:
                    pass
            raise
        if mesh.world_size > 1:
            broadcast(shutdown_plan())
    finally:
        close_mesh(mesh)
