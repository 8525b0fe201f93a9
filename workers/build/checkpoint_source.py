"""Open a build source by what it is: a Hugging Face Llama directory or a GGUF file."""
from __future__ import annotations

from pathlib import Path

from meshserve.errors import UserError


def open_source(path: str | Path):
    """Return an object with .spec, .read(Piece), .save_tokenizer(dir) and .describe()."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"model source {p} does not exist; pass a Hugging Face Llama directory, "
                        "a .gguf file, or 'demo'")
    if p.is_dir():
        from meshserve.workers.build.checkpoint_hf import HFCheckpoint
        return HFCheckpoint(p)
    if p.suffix == ".gguf":
        from meshserve.workers.build.checkpoint_gguf import GGUFCheckpoint
        return GGUFCheckpoint(p)
    raise UserError(f"model source {p} is neither a directory nor a .gguf file; pass a Hugging Face "
                    "Llama directory (config.json + *.safetensors) or a .gguf file")
