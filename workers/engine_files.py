"""Read a built engine directory: its config, its limits, and one rank's weights (memory-mapped)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from meshserve.errors import UserError
from meshserve.workers.model_spec import LlamaSpec

ENGINE_FORMAT = "meshserve-engine/2"
# Format 1 cut the MLP at intermediate_size // tp columns per rank: its engines are wrong wherever tp
# does not divide intermediate_size, and load only where it does (the layout is otherwise the same).
OLD_FORMAT_EXACT_WHEN_DIVIDING = "meshserve-engine/1"
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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

    @property
    def world_size(self) -> int:
        return self.tp * self.pp


def read_engine_meta(engine_dir: str | Path) -> EngineMeta:
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
    meta = EngineMeta(d, LlamaSpec.from_trtllm_config(cfg), cfg["dtype"], mapping["tp_size"],
                      mapping["pp_size"], eng["max_batch_size"], eng["max_seq_len"], eng["max_num_tokens"],
                      eng["kv_block_size"], bool(eng.get("has_tokenizer")))
    missing = [r for r in range(meta.world_size) if not (d / f"rank{r}.safetensors").is_file()]
    if missing:
        raise UserError(f"engine {d}: rank file(s) {', '.join(f'rank{r}.safetensors' for r in missing)} "
                        "missing; rebuild it with `meshserve build`")
    return meta


def load_rank_weights(meta: EngineMeta, rank: int, device) -> dict[str, torch.Tensor]:
    """This rank's tensors, straight from the memory-mapped rank file to the device."""
    out = {}
    with safe_open(str(meta.dir / f"rank{rank}.safetensors"), framework="pt", device=str(device)) as f:
        for name in f.keys():
            out[name] = f.get_tensor(name)
    return out
