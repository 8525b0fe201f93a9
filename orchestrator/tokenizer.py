"""The engine's tokenizer (saved beside the rank files at build time), and its chat template.

Chat messages are text, whatever they spell: a message whose content holds the text of a special
token (e.g. "<|im_start|>") gets the tokens of that text, never the control token itself, so a user
cannot open a turn of another role. The template's own frame keeps its special tokens. A template
that takes `tools` gets them too (checked by meshserve.orchestrator.tool_calls).
"""
from __future__ import annotations

import json
import re
import secrets
import threading
from functools import cached_property
from pathlib import Path

from meshserve.errors import UserError
from meshserve.orchestrator.sampling_params import has_lone_surrogate

_TEXT_KEYS = ("content", "name", "tool_call_id")  # the message fields that hold client text


def _check_text(text: str, where: str) -> None:
    if has_lone_surrogate(text):
        raise UserError(f"{where} holds a lone surrogate, which is not valid Unicode; send UTF-8 text")


class Tokenizer:
    def __init__(self, engine_dir: str | Path):
        from transformers import AutoTokenizer
        self._tok = AutoTokenizer.from_pretrained(str(engine_dir))
        # Encoding with split_special_tokens switches a setting of the shared backend for the call,
        # so encodings never overlap: one at a time, whatever thread asks.
        self._encode_lock = threading.Lock()
        self._special_texts = sorted({t.content for t in self._tok.added_tokens_decoder.values()
                                      if t.special and t.content})

    @property
    def hf_tokenizer(self):
        """The transformers tokenizer underneath (grammar engines read its vocabulary)."""
        return self._tok

    @property
    def special_texts(self) -> list[str]:
        """The text of each special token (e.g. "<|im_start|>")."""
        return list(self._special_texts)

    @cached_property
    def takes_tools(self) -> bool:
        """Whether the chat template reads `tools` (so a request's functions reach the model)."""
        if not self._tok.chat_template:
            return False
        try:
            template = self._tok.get_chat_template(tools=[])
        except ValueError:
            return False
        return _reads_variable(template, "tools")

    @cached_property
    def max_token_chars(self) -> int | None:
        """The most characters of text one token stands for (the longest vocabulary entry: a byte-level
        or SentencePiece byte piece is at least as long as its text), so a text of more than
        n * max_token_chars characters needs more than n tokens; None when a normalizer other than
        Llama's (Prepend, Replace) might shorten the text first."""
        backend = getattr(self._tok, "backend_tokenizer", None)
        if backend is None:
            return None
        norm = json.loads(backend.to_str()).get("normalizer")
        kinds = [n.get("type") for n in norm.get("normalizers", [norm])] if norm else []
        if not set(kinds) <= {"Prepend", "Replace"}:
            return None
        return max(map(len, self._tok.get_vocab()), default=1)

    @property
    def eos_token_id(self) -> int | None:
        return self._tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        _check_text(text, "the prompt")
        with self._encode_lock:
            return self._tok(text)["input_ids"]

    def encode_chat(self, messages: list[dict], special_tokens_in_content: bool = False,
                    tools: list[dict] | None = None) -> list[int]:
        """The chat template's token ids, with the generation prompt. Special-token text inside a
        message stays plain text unless special_tokens_in_content (the text is then tokenized as a
        whole, special tokens and all, as a raw prompt would be). `tools` go to the template as they
        are."""
        if not self._tok.chat_template:
            raise UserError("this engine's tokenizer has no chat template; send a plain prompt instead")
        for i, m in enumerate(messages):
            for key in _TEXT_KEYS:
                if isinstance(m.get(key), str):
                    _check_text(m[key], f"messages[{i}].{key}")
        text = self._render(messages, tools)
        with self._encode_lock:
            if special_tokens_in_content or not self._spells_special_token(messages):
                return self._tok(text, add_special_tokens=False)["input_ids"]
            return self._encode_framed(messages, text, tools)

    def _render(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        from jinja2 import TemplateError
        try:
            return self._tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        except TemplateError as err:  # the template's own raise_exception: it refuses these messages
            raise UserError(f"the chat template cannot render these messages: {err}") from None

    def _spells_special_token(self, messages: list[dict]) -> bool:
        return any(isinstance(m.get(key), str) and s in m[key]
                   for m in messages for key in _TEXT_KEYS for s in self._special_texts)

    def _encode_framed(self, messages: list[dict], text: str, tools: list[dict] | None = None) -> list[int]:
        """Render the template with a marker in place of each message text, tokenize the frame
        between markers with its special tokens and each text with none (special-token text split
        like any other text)."""
        nonce = secrets.token_hex(8)
        pieces: list[str] = []
        marked = []
        for m in messages:
            m = dict(m)
            for key in _TEXT_KEYS:
                if isinstance(m.get(key), str):
                    m[key] = f"\ue000{nonce}:{len(pieces)}\ue001"
                    pieces.append(messages[len(marked)][key])
            marked.append(m)
        parts = re.split(f"\ue000{nonce}:(\\d+)\ue001", self._render(marked, tools))
        texts = [p if k % 2 == 0 else pieces[int(p)] for k, p in enumerate(parts)]
        if "".join(texts) != text:
            raise UserError("a message holds the text of a special token (one of "
                            f"{', '.join(self._special_texts[:5])}...), and this tokenizer's chat template "
                            "changes message text, so it cannot be kept plain text; remove it")
        ids: list[int] = []
        for k, part in enumerate(texts):
            if part:
                ids += self._tok(part, add_special_tokens=False, split_special_tokens=k % 2 == 1)["input_ids"]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def _reads_variable(template: str, name: str) -> bool:
    """Whether a Jinja template reads the variable `name` (its own tags, e.g. `generation`, are
    unknown here: such a template is read token by token instead)."""
    import jinja2
    import jinja2.meta
    env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    try:
        return name in jinja2.meta.find_undeclared_variables(env.parse(template))
    except jinja2.TemplateSyntaxError:
        try:
            return any(kind == "name" and value == name for _, kind, value in env.lex(template))
        except jinja2.TemplateSyntaxError:
            return False
