"""What a dummy engine is built from: a model's hyper-parameters without its weights.

A named shape (those of `meshserve random-checkpoint`), a Hugging Face directory of which only
config.json (and the tokenizer files, when present) is read, or a .gguf file of which only the header
is read. Each has .spec, .describe() and .save_tokenizer(dir), as a checkpoint source has.
"""
from __future__ import annotations

import json
from pathlib import Path

from meshserve.errors import UserError
from meshserve.workers.build.checkpoint_hf import copy_tokenizer
from meshserve.workers.build.random_checkpoint import shape_config
from meshserve.workers.model_spec import LlamaSpec


class ShapeSource:
    """A named shape: a config, and a synthetic tokenizer (token i reads "<ti>")."""

    def __init__(self, name: str):
        self.name = name
        self.config = shape_config(name)
        self.spec = LlamaSpec.from_hf_config(self.config, f"shape {name}")

    def describe(self) -> str:
        return f"shape {self.name}"

    def save_tokenizer(self, out_dir: Path) -> bool:
        from meshserve.workers.build.synthetic_tokenizer import write_synthetic_tokenizer
        write_synthetic_tokenizer(out_dir, self.spec.vocab_size, self.config.get("bos_token_id"),
                                  self.config.get("eos_token_id"))
        return True


class HFConfigSource:
    """A Hugging Face Llama directory, read for its config.json and tokenizer files only."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        path = self.dir / "config.json"
        if not path.is_file():
            raise UserError(f"{self.dir}: no config.json; a dummy engine needs a Hugging Face model directory's "
                            "config.json, a .gguf file, or --shape NAME")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err})") from None
        self.spec = LlamaSpec.from_hf_config(cfg, str(path))

    def describe(self) -> str:
        return f"Hugging Face config {self.dir / 'config.json'}"

    def save_tokenizer(self, out_dir: Path) -> bool:
        return copy_tokenizer(self.dir, out_dir)


def open_config_source(model: str | None, shape: str | None):
    """The hyper-parameters of `shape` (a name) or `model` (a path): exactly one of them is given."""
    if (model is None) == (shape is None):
        raise UserError("--load-format dummy takes its sizes from --shape NAME or from --model DIR|FILE.gguf "
                        "(only its config is read): give exactly one")
    if shape is not None:
        return ShapeSource(shape)
    path = Path(model)
    if path.is_dir():
        return HFConfigSource(path)
    from meshserve.workers.build.checkpoint_source import open_source
    return open_source(path)  # a .gguf file: its tensors stay unread
