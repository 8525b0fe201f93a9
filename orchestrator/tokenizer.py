"""The engine's tokenizer (saved beside the rank files at build time), and its chat template."""
from __future__ import annotations

from pathlib import Path

from meshserve.errors import UserError


class Tokenizer:
    def __init__(self, engine_dir: str | Path):
        from transformers import AutoTokenizer
        self._tok = AutoTokenizer.from_pretrained(str(engine_dir))

    @property
    def eos_token_id(self) -> int | None:
        return self._tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self._tok(text)["input_ids"]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        if not self._tok.chat_template:
            raise UserError("this engine's tokenizer has no chat template; send a plain prompt instead")
        text = self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)
