"""A Hugging Face Llama directory (config.json + one or many safetensors files) as a build source."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from meshserve.errors import UserError
from meshserve.workers.engine_layout import Piece
from meshserve.workers.model_spec import LlamaSpec
from meshserve.workers.build.safetensors_io import FLOAT_DTYPES, SafetensorsFile
from meshserve.workers.build.source_shapes import check_source_shapes, source_shapes

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "generation_config.json",
                   "chat_template.jinja", "chat_template.json")


class HFCheckpoint:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        cfg_path = self.dir / "config.json"
        if not cfg_path.is_file():
            raise UserError(f"{self.dir}: no config.json; pass a Hugging Face model directory or a .gguf file")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{cfg_path}: not valid JSON ({err})") from None
        self.spec = LlamaSpec.from_hf_config(cfg, str(cfg_path))
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, SafetensorsFile] = {}
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            for name, fname in weight_map.items():
                if not (self.dir / fname).is_file():
                    raise UserError(f"{index}: lists {fname} for {name}, but that file is missing")
                st = self._open(fname)
                if name not in st.entries:
                    raise UserError(f"{index}: lists {fname} for {name}, but that file does not hold it")
                self._where[name] = st
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                bins = list(self.dir.glob("*.bin"))
                hint = " (found PyTorch .bin files: re-save with safe_serialization=True)" if bins else ""
                raise UserError(f"{self.dir}: no *.safetensors weights{hint}")
            for fname in files:
                st = self._open(fname)
                for name in st.names():
                    self._where[name] = st
        if self.spec.tie_word_embeddings and "lm_head.weight" in self._where:
            # transformers scores with a stored lm_head.weight even under tie_word_embeddings (the same
            # result when it equals the embedding), so the build does too
            self.spec = replace(self.spec, tie_word_embeddings=False)
        check_source_shapes(self.spec, {n: st.shape(n) for n, st in self._where.items()}, str(self.dir),
                            "config.json")
        for name in source_shapes(self.spec):
            stored = self._where[name].entries[name]["dtype"]
            if stored not in FLOAT_DTYPES:
                raise UserError(f"{self.dir}: tensor {name} is stored as {stored}; meshserve builds from float "
                                f"weights ({', '.join(FLOAT_DTYPES)}): use the unquantized checkpoint")

    def _open(self, fname: str) -> SafetensorsFile:
        if fname not in self._files:
            self._files[fname] = SafetensorsFile(str(self.dir / fname))
        return self._files[fname]

    def describe(self) -> str:
        return f"Hugging Face checkpoint {self.dir}"

    def read(self, piece: Piece) -> torch.Tensor:
        if piece.source not in self._where:
            raise UserError(f"{self.dir}: tensor {piece.source} is missing from the checkpoint")
        return self._where[piece.source].read(piece.source, piece.dim, piece.start, piece.stop)

    def save_tokenizer(self, out_dir: Path) -> bool:
        return copy_tokenizer(self.dir, out_dir)


def copy_tokenizer(src_dir: Path, out_dir: Path) -> bool:
    """Copy the tokenizer files src_dir has into out_dir; True when a tokenizer was among them."""
    copied = False
    for fname in TOKENIZER_FILES:
        if (src_dir / fname).is_file():
            shutil.copy2(src_dir / fname, out_dir / fname)
            copied = copied or fname.startswith("tokenizer")
    return copied
