"""Read a built engine directory: its config, its limits, and one rank's weights (memory-mapped, or
made at load for an engine of load format "dummy")."""
from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from meshserve.errors import UserError
from meshserve.workers.engine_layout import RankTensor, mesh_coords, rank_tensors
from meshserve.workers.model_spec import LlamaSpec

ENGINE_FORMAT = "meshserve-engine/2"
# Format 1 cut the MLP at intermediate_size // tp columns per rank: its engines are wrong wherever tp
# does not divide intermediate_size, and load only where it does (the layout is otherwise the same).
OLD_FORMAT_EXACT_WHEN_DIVIDING = "meshserve-engine/1"
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# "safetensors": rank{r}.safetensors files; "dummy": no rank files, random weights made on the rank's
# device at load, of the names, shapes and dtype a build would write (for benchmarks of any size).
LOAD_FORMATS = ("safetensors", "dummy")


@dataclass(frozen=True)
class EngineMeta:
    dir: Path
    spec: LlamaSpec
    dtype: str
    tp: int
    pp: int
    max_batch_size: int
    max_seq_len: int
    max_num_tokens: int
    kv_block_size: int
    has_tokenizer: bool
    num_kv_blocks: int | None = None  # None: enough for max_batch_size full sequences (capped by memory)
    load_format: str = "safetensors"  # one of LOAD_FORMATS
    gpu_memory_fraction: float = 0.9  # of the GPU memory free after the weights, the most the KV cache and steps take

    @property
    def world_size(self) -> int:
        return self.tp * self.pp


@dataclass(frozen=True)
class RuntimeLimits:
    """Batch and memory limits chosen when the engine runs (serve, generate, LLM); None keeps the
    value engine.json holds (written at build time as a default). Every rank must use the same."""
    max_batch_size: int | None = None
    max_num_tokens: int | None = None
    max_seq_len: int | None = None
    kv_block_size: int | None = None
    num_kv_blocks: int | None = None
    gpu_memory_fraction: float | None = None
    seq_len_up_to_model: bool = False  # lower a max_seq_len above the model's limit (as a build does)

    def __post_init__(self):
        f = self.gpu_memory_fraction
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1):
            raise UserError(f"gpu_memory_fraction={f!r} is not allowed: use a number in (0, 1], e.g. 0.9")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("seq_len_up_to_model", "gpu_memory_fraction"):
                continue
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise UserError(f"{f.name}={v!r} is not allowed: use a positive integer")

    def apply(self, meta: EngineMeta) -> EngineMeta:
        """meta with these limits in place of engine.json's, checked against the model and each other."""
        given = {f.name: getattr(self, f.name) for f in fields(self)
                 if getattr(self, f.name) is not None and f.name != "seq_len_up_to_model"}
        if self.seq_len_up_to_model and "max_seq_len" in given:
            given["max_seq_len"] = min(given["max_seq_len"], meta.spec.max_position_embeddings)
        out = replace(meta, **given)
        if out.max_seq_len > meta.spec.max_position_embeddings:
            raise UserError(f"max_seq_len={out.max_seq_len} exceeds the model's max_position_embeddings "
                            f"{meta.spec.max_position_embeddings}; use at most that")
        if out.max_num_tokens < out.max_batch_size:
            raise UserError(f"max_num_tokens={out.max_num_tokens} is below max_batch_size={out.max_batch_size}; "
                            "a decode step needs one token per sequence")
        if out.num_kv_blocks is not None and out.num_kv_blocks < 2:
            raise UserError(f"num_kv_blocks={out.num_kv_blocks} is too few: one block is reserved, use >= 2")
        return out


def read_engine_meta(engine_dir: str | Path, limits: RuntimeLimits | None = None) -> EngineMeta:
    """The engine's config and limits (engine.json's, or `limits` where given)."""
    d = Path(engine_dir)
    if not d.is_dir():
        raise UserError(f"engine {d} does not exist; build one with `meshserve build --model ... --out {d}`")
    for name in ("config.json", "engine.json"):
        if not (d / name).is_file():
            raise UserError(f"engine {d} has no {name}; rebuild it with `meshserve build`")
    try:
        cfg = json.loads((d / "config.json").read_text())
        eng = json.loads((d / "engine.json").read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"engine {d}: unreadable JSON ({err}); rebuild it with `meshserve build`") from None
    mapping = cfg["mapping"]
    fmt = eng.get("format")
    if fmt == OLD_FORMAT_EXACT_WHEN_DIVIDING and cfg["intermediate_size"] % mapping["tp_size"]:
        raise UserError(f"engine {d} was built by an older meshserve ({fmt}) at tp={mapping['tp_size']}, which "
                        f"does not divide intermediate_size={cfg['intermediate_size']}: its MLP weights were cut "
                        f"short and its output is wrong; rebuild it with `meshserve build --overwrite`")
    if fmt not in (ENGINE_FORMAT, OLD_FORMAT_EXACT_WHEN_DIVIDING):
        raise UserError(f"engine {d}: format {fmt!r} is not {ENGINE_FORMAT!r}; rebuild it with `meshserve build`")
    load_format = eng.get("load_format", "safetensors")
    if load_format not in LOAD_FORMATS:
        raise UserError(f"engine {d}: load_format {load_format!r} is not one of {', '.join(LOAD_FORMATS)}; "
                        "rebuild it with `meshserve build`")
    meta = EngineMeta(d, LlamaSpec.from_trtllm_config(cfg), cfg["dtype"], mapping["tp_size"],
                      mapping["pp_size"], eng["max_batch_size"], eng["max_seq_len"], eng["max_num_tokens"],
                      eng["kv_block_size"], bool(eng.get("has_tokenizer")), load_format=load_format)
    missing = [r for r in range(meta.world_size)
               if load_format == "safetensors" and not (d / f"rank{r}.safetensors").is_file()]
    if missing:
        raise UserError(f"engine {d}: rank file(s) {', '.join(f'rank{r}.safetensors' for r in missing)} "
                        "missing; rebuild it with `meshserve build`")
    return limits.apply(meta) if limits is not None else meta


def load_rank_weights(meta: EngineMeta, rank: int, device) -> dict[str, torch.Tensor]:
    """This rank's tensors, straight from the memory-mapped rank file to the device (or, for a dummy
    engine, made there: dummy_rank_weights)."""
    if meta.load_format == "dummy":
        return dummy_rank_weights(meta.spec, meta.tp, meta.pp, rank, TORCH_DTYPES[meta.dtype], device)
    out = {}
    path = meta.dir / f"rank{rank}.safetensors"
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # missing, truncated, not safetensors
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot load the weights from {path} ({why}); the engine folder is incomplete or "
                        "damaged: build it again") from None
    return out


def dummy_rank_weights(spec: LlamaSpec, tp: int, pp: int, rank: int, dtype: torch.dtype,
                       device) -> dict[str, torch.Tensor]:
    """Random weights with the names and shapes a build writes for `rank` (engine_layout.rank_tensors),
    made on `device` one tensor at a time, so the peak is the weights themselves: matrices normal x 0.02
    with the vocabulary padding zero (config.json holds only the padded intermediate_size, so the MLP's
    padding is random too), norms 1. Each tensor's values depend only on its source tensor (global layer
    index) and, when split, on the TP rank: the same on every run and for every pp; tensors every TP rank
    holds whole (the embedding) are the same on all of them. Different tp values give different models."""
    tp_rank = mesh_coords(rank, tp)[1]
    return {t.name: _dummy_tensor(t, tp_rank, dtype, device) for t in rank_tensors(spec, tp, pp, rank)}


def _dummy_tensor(t: RankTensor, tp_rank: int, dtype: torch.dtype, device) -> torch.Tensor:
    if len(t.shape) == 1:
        return torch.ones(t.shape, dtype=dtype, device=device)
    split = any(p.dim is not None for p in t.pieces)
    key = f"{t.pieces[0].source if t.pieces else t.name}|{tp_rank if split else 'whole'}"
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(key.encode()))
    w = torch.randn(t.shape, generator=gen, dtype=dtype, device=device).mul_(0.02)
    if t.pad_rows:
        w[w.shape[0] - t.pad_rows:] = 0
    if t.pad_cols:
        w[:, w.shape[1] - t.pad_cols:] = 0
    return w


def rank_weight_bytes(spec: LlamaSpec, tp: int, pp: int, rank: int, dtype: str) -> int:
    """Bytes of the weights `rank` holds (its rank file's tensors)."""
    return sum(TORCH_DTYPES[dtype].itemsize * math.prod(t.shape) for t in rank_tensors(spec, tp, pp, rank))
