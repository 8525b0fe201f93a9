"""meshserve: serve Llama models across a tensor- and pipeline-parallel rank mesh.

    from meshserve import LLM, SamplingParams

The code lives in three sub-packages (imports go one way, top to bottom): `meshserve.orchestrator`
(CLI, front end, scheduler, Python API), `meshserve.launch` (how ranks come to life) and
`meshserve.workers` (the offline build and the rank runtime); `meshserve.errors` sits below them all.
Names here load on first use, so `import meshserve` stays light.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["LLM", "RequestOutput", "RuntimeLimits", "SamplingParams", "UserError", "__version__"]

_PUBLIC = {"LLM": "meshserve.orchestrator.llm", "RequestOutput": "meshserve.orchestrator.llm",
           "SamplingParams": "meshserve.orchestrator.sampling_params", "UserError": "meshserve.errors",
           "RuntimeLimits": "meshserve.workers.engine_files"}


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'meshserve' has no attribute {name!r}")
