"""`meshserve serve`: every rank joins the mesh; rank 0 also runs the scheduler and the HTTP API."""
from __future__ import annotations

import signal
from pathlib import Path


def serve(engine_dir: str, host: str, port: int, model_name: str | None = None, limits=None) -> None:
    """limits: a workers.engine_files.RuntimeLimits (None: engine.json's)."""
    from meshserve.launch.local_spawn import run_ranks
    from meshserve.workers.engine_files import read_engine_meta
    meta = read_engine_meta(engine_dir, limits)
    name = model_name or Path(engine_dir).name
    run_ranks(meta.world_size, serve_rank, str(engine_dir), host, port, name, limits, tp=meta.tp)


def serve_rank(env, engine_dir: str, host: str, port: int, model_name: str, limits=None) -> None:
    from meshserve.orchestrator.rank_program import run_on_mesh
    run_on_mesh(env, engine_dir, lambda runner, meta, broadcast:
                _serve_api(runner, meta, broadcast, host, port, model_name), limits)


def _serve_api(runner, meta, broadcast, host: str, port: int, model_name: str) -> None:
    from meshserve.launch.launched import raise_interrupt
    from meshserve.orchestrator.api_server import build_app, serve_app
    from meshserve.orchestrator.engine_client import MeshEngineClient
    from meshserve.orchestrator.engine_loop import EngineLoop
    from meshserve.errors import UserError
    from meshserve.orchestrator.metrics import ServerMetrics
    from meshserve.orchestrator.tokenizer import Tokenizer
    if not meta.has_tokenizer:
        raise UserError(f"engine {meta.dir} has no tokenizer; serving needs one (build from a checkpoint "
                        "that has tokenizer files)")
    metrics = ServerMetrics()
    client = MeshEngineClient(EngineLoop(runner, meta, broadcast, Tokenizer(meta.dir)), metrics)
    client.start()
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again once it has
    # restored the previous handlers; a requested stop is a clean exit, not a failure.
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        serve_app(build_app(client, model_name, metrics), host, port)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        client.stop()  # the engine thread ends before this thread sends the shutdown plan

