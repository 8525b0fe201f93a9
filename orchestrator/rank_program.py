"""The program every rank runs: join the mesh, load its shard, then either follow rank 0's plans or
(rank 0) drive the mesh and tell the others to stop."""
from __future__ import annotations


class RankSession:
    """This process as one rank of the mesh: joined, its shard loaded. Rank 0 drives through `loop`
    (an EngineLoop); every other rank calls `follow()`, which returns once rank 0 closes."""

    def __init__(self, env, engine_dir: str, limits=None):
        """limits: a workers.engine_files.RuntimeLimits (None: engine.json's)."""
        from meshserve.workers.engine_files import read_engine_meta
        from meshserve.workers.runtime.mesh import MeshAddress, close_mesh, init_mesh
        from meshserve.workers.runtime.step_runner import StepRunner
        self.meta = read_engine_meta(engine_dir, limits)
        self.mesh = init_mesh(MeshAddress(env.rank, env.world_size, env.local_rank, env.local_world_size,
                                          env.init_method), self.meta.tp, self.meta.pp)
        self.watch = None
        try:
            if self.mesh.world_size > 1:  # peers that stop answering end this rank (workers/runtime/watchdog.py)
                from meshserve.workers.runtime.watchdog import FaultTimeouts, PeerWatch
                timeouts = FaultTimeouts.from_env()
                self.watch = PeerWatch(env.rank, env.world_size, env.master_addr, env.master_port,
                                       timeouts.step_s, startup_s=timeouts.first_step_s).start()
            self.runner = StepRunner(self.meta, self.mesh)
            if self.watch is not None:
                # every rank, rank 0 included, has joined the runner's last collective: loading is over
                # (a follower need not wait for rank 0's word, which a stall right now would hold back)
                self.watch.mark_ready()
        except BaseException:
            if self.watch is not None:
                self.watch.stop()
            close_mesh(self.mesh)
            raise
        self._closed = False

    @property
    def is_driver(self) -> bool:
        return self.mesh.rank == 0

    def broadcast(self, plan):
        from meshserve.workers.runtime.rank_protocol import broadcast_plan
        return broadcast_plan(plan, self.mesh.control_group, ring=self.mesh.plan_ring) if self.mesh.world_size > 1 else plan

    def follow(self) -> None:
        from meshserve.workers.runtime.worker_loop import serve_steps
        ok = False
        try:
            serve_steps(self.runner, self.mesh, self.watch)
            ok = True
        finally:
            self.close(ok=ok)

    def close(self, ok: bool = True) -> None:
        """On rank 0, send the others the shutdown plan (after a failure too, so healthy ranks leave
        cleanly; a broken mesh is reported by the first error), then leave the mesh."""
        from meshserve.workers.runtime.mesh import close_mesh
        from meshserve.workers.runtime.rank_protocol import shutdown_plan
        if self._closed:
            return
        self._closed = True
        try:
            if self.is_driver and self.mesh.world_size > 1:
                try:
                    self.broadcast(shutdown_plan())
                except Exception:
                    if ok:
                        raise
        finally:
            if self.watch is not None:
                self.watch.stop()
            try:
                self.runner.release(wait=ok)
            finally:
                close_mesh(self.mesh)


def run_on_mesh(env, engine_dir: str, drive, limits=None):
    """Join the mesh; rank 0 runs drive(runner, meta, broadcast) and returns what it returns, the
    others follow it and return None."""
    session = RankSession(env, engine_dir, limits)
    if not session.is_driver:
        session.follow()
        return None
    ok = False
    try:
        result = drive(session.runner, session.meta, session.broadcast)
        ok = True
    finally:
        session.close(ok)
    return result
