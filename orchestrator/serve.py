"""`meshserve serve`: every rank joins the mesh; rank 0 runs the scheduler and the engine.

Started locally (no launcher), this process is the HTTP front end (API, tokenizer, detokenizer) and the
ranks are its children; rank 0's engine is reached over a pipe (linked_engine.py), so the front end
can restart a failed mesh (`--restart-on-failure N`). With `--launcher ray --restart-on-failure N`
the same holds with this process as the Ray driver and the ranks as Ray actors (rank 0 connects back
over TCP). Otherwise, under a launcher (mpirun, srun, torchrun, or Ray without the option), rank 0
runs the HTTP API itself, and a failure ends the job so that its own restart policy applies.
Either way the HTTP address is checked first (listen_check.py): a port that is taken ends the command
(exit code 2) before any rank starts, or under a launcher before rank 0 loads.

Faults (see README, Failure behaviour): a step that outlives the step timeout, or a rank whose
heartbeats stop, fails every open request, turns /health and /ready to 503 and ends rank 0 with exit
code 3 and a line that names the rank; SIGINT/SIGTERM drain the requests in progress for up to the
drain timeout, then end the rest with an error."""
from __future__ import annotations

import signal
import threading
from pathlib import Path

from meshserve.orchestrator.heap import freeze_startup_heap
from meshserve.orchestrator.listen_check import check_listen_address

STOP_MARGIN_S = 30.0  # local spawn: what a stop may take beyond the drain before the ranks are killed


def serve(engine_dir: str, host: str | None, port: int, model_name: str | None = None, limits=None,
          restarts: int = 0, ray: dict | None = None) -> None:
    """limits: a workers.engine_files.RuntimeLimits (None: engine.json's); restarts: how many times a
    mesh that fails is started again; ray: run the ranks as Ray actors, this process being the driver
    and the front end (ray_launcher.RayMesh's options: address, gpus_per_rank, cpus_per_rank); host
    None: 127.0.0.1, or with `ray` this process's IP as the cluster sees it."""
    from meshserve.launch.local_spawn import run_ranks
    from meshserve.launch.rank_env import launched_env
    from meshserve.workers.engine_files import read_engine_meta
    from meshserve.workers.runtime.watchdog import FaultTimeouts
    meta = read_engine_meta(engine_dir, limits)
    name = model_name or Path(engine_dir).name
    if ray is not None:
        _serve_front_end_on_ray(str(Path(engine_dir).resolve()), meta, host, port, name, limits, restarts, ray)
        return
    if launched_env() is None:
        _serve_front_end(str(engine_dir), meta, host or "127.0.0.1", port, name, limits, restarts)
        return
    grace = FaultTimeouts.from_env().drain_s + STOP_MARGIN_S
    run_ranks(meta.world_size, serve_rank, str(engine_dir), host, port, name, limits, tp=meta.tp, stop_grace=grace)


def _serve_front_end_on_ray(engine_dir: str, meta, host: str | None, port: int, model_name: str, limits,
                            restarts: int, options: dict) -> None:
    """This process is the Ray driver and serves HTTP; the ranks run in Ray actors (started, and
    restarted in the same placement, here). Whatever happens, every actor is killed, the placement
    removed and Ray disconnected before this returns."""
    from meshserve.launch.launched import raise_interrupt
    from meshserve.launch.ray_launcher import RayMesh
    from meshserve.orchestrator.linked_engine import ray_link
    _require_tokenizer(meta)
    mesh = RayMesh(meta.world_size, meta.tp, **options)
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        mesh.place()
        _serve_front_end(engine_dir, meta, host or mesh.driver_ip, port, model_name, limits, restarts,
                         ray_link(mesh))
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        mesh.close()
        signal.signal(signal.SIGTERM, previous)


def _serve_front_end(engine_dir: str, meta, host: str, port: int, model_name: str, limits, restarts: int,
                     start_ranks=None) -> None:
    """This process serves HTTP; the ranks run in child processes (started, and restarted, here), or
    wherever `start_ranks` (see LinkedEngine) puts them."""
    from meshserve.launch.launched import raise_interrupt
    from meshserve.orchestrator.api_server import build_app, serve_app
    from meshserve.orchestrator.linked_engine import LinkedEngine
    from meshserve.orchestrator.metrics import ServerMetrics
    from meshserve.workers.runtime.watchdog import FaultTimeouts
    _require_tokenizer(meta)
    check_listen_address(host, port)  # before the ranks load: a taken port is found in a moment
    metrics = ServerMetrics()
    app = None

    def on_failure(err: BaseException) -> None:
        """The mesh failed for good: the open requests have their error; stop the server."""
        server = getattr(app.state, "server", None) if app is not None else None
        if server is not None:
            server.should_exit = True

    engine = LinkedEngine(engine_dir, meta, limits, metrics, restarts, on_failure, start_ranks)
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        engine.start()
        app = build_app(engine, model_name, metrics)
        freeze_startup_heap()
        serve_app(app, host, port, drain_timeout=FaultTimeouts.from_env().drain_s)
    except KeyboardInterrupt:
        if app is None:  # stopped while the ranks were loading: the server never ran (exit 130, not 0)
            raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.stop()  # raises the mesh's failure, if it failed


def _require_tokenizer(meta) -> None:
    from meshserve.errors import UserError
    if not meta.has_tokenizer:
        raise UserError(f"engine {meta.dir} has no tokenizer; serving needs one (build from a checkpoint "
                        "that has tokenizer files)")


def serve_rank(env, engine_dir: str, host: str, port: int, model_name: str, limits=None) -> None:
    from meshserve.orchestrator.rank_program import RankSession
    if env.rank == 0:  # the rank that serves HTTP, before it loads (a launcher's other ranks end with it)
        check_listen_address(host, port)
    session = RankSession(env, engine_dir, limits)
    freeze_startup_heap()
    if not session.is_driver:
        session.follow()
        return
    ok = False
    try:
        _serve_api(session, host, port, model_name)
        ok = True
    finally:
        session.close(ok)


def _serve_api(session, host: str, port: int, model_name: str) -> None:
    from meshserve.launch.launched import raise_interrupt
    from meshserve.orchestrator.api_server import build_app, serve_app
    from meshserve.orchestrator.engine_client import MeshEngineClient, MeshStalled
    from meshserve.orchestrator.engine_loop import EngineLoop
    from meshserve.orchestrator.metrics import ServerMetrics
    from meshserve.orchestrator.tokenizer import Tokenizer
    from meshserve.workers.runtime.watchdog import FaultTimeouts, exit_now
    meta = session.meta
    _require_tokenizer(meta)
    timeouts = FaultTimeouts.from_env()
    metrics = ServerMetrics()
    app = None

    def on_failure(err: BaseException) -> None:
        """The mesh stalled (watchdog thread): the open requests have their error; stop the server,
        and end the process should the server not stop by itself."""
        server = getattr(app.state, "server", None) if app is not None else None
        if server is not None:
            server.should_exit = True
        backstop = threading.Timer(15.0, exit_now, args=(str(err),))
        backstop.daemon = True
        backstop.start()

    client = MeshEngineClient(EngineLoop(session.runner, meta, session.broadcast, Tokenizer(meta.dir)), metrics,
                              timeouts, session.watch, on_failure)
    app = build_app(client, model_name, metrics)
    client.start()
    freeze_startup_heap()
    # uvicorn drains on SIGINT/SIGTERM (api_server.serve_app), then raises the signal again once it has
    # restored the previous handlers; a requested stop is a clean exit, not a failure.
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        serve_app(app, host, port, drain_timeout=timeouts.drain_s)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if isinstance(client.error, MeshStalled):  # the engine thread waits forever on the stalled rank
            exit_now(str(client.error))
        client.stop()  # the engine thread ends before this thread sends the shutdown plan
