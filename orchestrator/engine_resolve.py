"""From a YAML config to a ready engine directory: fetch the demo model and build on first use.

Under a launcher (mpirun, srun) every process calls `ensure_engine`: rank 0 decides whether the engine
exists, and if not all of them build it together; each returns only once the engine is complete.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from meshserve.orchestrator.config import MeshConfig
from meshserve.orchestrator.demo_model import cache_root


def resolve_source(source: str) -> str:
    if source == "demo":
        from meshserve.orchestrator.demo_model import demo_gguf_path
        return str(demo_gguf_path())
    return source


def build_from(source: str, out: str, parallel, engine, group=None, **options):
    """Build `source` (a path, or "demo") into `out`. With a rank group of several processes, rank 0
    fetches the model first (the others then find it in the cache) and every process builds its share."""
    from meshserve.workers.build.engine_build import build_engine
    if group is not None:
        group.agreed("fetching the model", lambda: resolve_source(source) if group.is_lead else None)
    return build_engine(resolve_source(source), out, parallel, engine, group=group, **options)


def engine_path(cfg: MeshConfig) -> str:
    """model.engine_dir, else a folder in the cache named after the source and what the build fixes
    (layout and dtype; batch and memory limits are chosen at run time, see runtime_limits)."""
    if cfg.model.engine_dir:
        return cfg.model.engine_dir
    from meshserve.workers.engine_files import ENGINE_FORMAT  # a new format gets a new folder, built afresh
    e, p = cfg.engine, cfg.parallel
    key = hashlib.sha256(repr((cfg.model.source, e.dtype, p.tp, p.pp, ENGINE_FORMAT)).encode()).hexdigest()[:10]
    name = cfg.model.name or Path(cfg.model.source).stem
    return str(cache_root() / "engines" / f"{name}-tp{p.tp}pp{p.pp}-{e.dtype}-{key}")


def runtime_limits(cfg: MeshConfig, **overrides):
    """The config's engine limits as run-time settings (a RuntimeLimits), with `overrides` that are
    not None (command-line flags) taking precedence."""
    from meshserve.workers.engine_files import RuntimeLimits
    e = cfg.engine
    values = {"max_batch_size": e.max_batch_size, "max_num_tokens": e.max_num_tokens,
              "max_seq_len": e.max_seq_len, "kv_block_size": e.kv_block_size}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return RuntimeLimits(**values, seq_len_up_to_model=overrides.get("max_seq_len") is None)


def ensure_engine(cfg: MeshConfig, show_progress: bool = True) -> str:
    """The engine directory for cfg, built now if it does not exist yet."""
    from meshserve.launch.rank_env import launched_env
    from meshserve.workers.engine_files import read_engine_meta
    env = launched_env()
    if env is not None and env.world_size > 1:
        return _ensure_engine_launched(cfg, env, show_progress)
    if cfg.model.engine_dir and Path(cfg.model.engine_dir).exists():
        read_engine_meta(cfg.model.engine_dir)
        return cfg.model.engine_dir
    out = engine_path(cfg)
    if not Path(out).exists():
        print(f"building engine {out} (first use)", flush=True)
        build_from(cfg.model.source, out, cfg.parallel, cfg.engine, show_progress=show_progress)
    return out


def _ensure_engine_launched(cfg: MeshConfig, env, show_progress: bool) -> str:
    from meshserve.launch.local_spawn import check_world_size
    from meshserve.launch.rank_sync import open_rank_group
    from meshserve.errors import UserError
    from meshserve.workers.engine_files import read_engine_meta
    out = engine_path(cfg)
    if not Path(out).exists():  # a wrong process count fails here, before anything is built
        check_world_size(env, cfg.parallel.world_size, cfg.parallel.tp)
    with open_rank_group(env) as group:
        if group.broadcast(int(Path(out).exists()) if group.is_lead else 0):
            if not Path(out).exists():
                raise UserError(f"rank {env.rank} does not see the engine {out} that rank 0 sees; every node "
                                "must see the same folder (a shared file system)")
            read_engine_meta(out)
            return out
        if not cfg.model.source:
            raise UserError(f"engine {out} does not exist and the config has no model.source to build it from",
                            every_rank=True, quiet=not group.is_lead)
        check_world_size(env, cfg.parallel.world_size, cfg.parallel.tp)
        if group.is_lead:
            print(f"building engine {out} (first use) on {group.size} processes", flush=True)
        build_from(cfg.model.source, out, cfg.parallel, cfg.engine, group, show_progress=show_progress)
    return out
