"""From a YAML config to a ready engine directory: fetch the demo model and build on first use."""
from __future__ import annotations

import hashlib
from pathlib import Path

from orchestrator.config import MeshConfig
from orchestrator.demo_model import cache_root


def resolve_source(source: str) -> str:
    if source == "demo":
        from orchestrator.demo_model import demo_gguf_path
        return str(demo_gguf_path())
    return source


def ensure_engine(cfg: MeshConfig, show_progress: bool = True) -> str:
    """The engine directory for cfg, built now if it does not exist yet."""
    from workers.engine_files import read_engine_meta
    if cfg.model.engine_dir and Path(cfg.model.engine_dir).exists():
        read_engine_meta(cfg.model.engine_dir)
        return cfg.model.engine_dir
    e, p = cfg.engine, cfg.parallel
    key = hashlib.sha256(repr((cfg.model.source, e, p)).encode()).hexdigest()[:10]
    name = cfg.model.name or Path(cfg.model.source).stem
    out = cfg.model.engine_dir or str(cache_root() / "engines" / f"{name}-tp{p.tp}pp{p.pp}-{e.dtype}-{key}")
    if not Path(out).exists():
        from workers.engine_build import build_engine
        print(f"building engine {out} (first use)", flush=True)
        build_engine(resolve_source(cfg.model.source), out, p, e, show_progress=show_progress)
    return out
