"""Token ids to text while a request streams: whole characters only, stop strings cut out.

`IncrementalDetokenizer` re-decodes a short window of ids for every new token (a prefix offset
marks where the window starts, a read offset where the text already handed out ends), so the work
per token stays bounded however long the output grows. `TokenTexts` gives each token's own
string and raw bytes, for the logprobs fields of responses.
"""
from __future__ import annotations

import re

REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 6  # prompt tokens decoded ahead of the output, so the first word keeps its spacing
_MAX_PENDING_TOKENS = 8  # give up waiting for a character to complete after this many tokens


class IncrementalDetokenizer:
    """Feed output token ids one at a time; get back only text that is safe to show.

    - Text is released only when the decoded window does not end in U+FFFD, so a multi-byte
      character split across tokens is never shown half-done.
    - With stop strings, a tail that could be the start of one is held back; once one appears,
      `stopped` names it and the text ends just before it (nothing after it is ever released).
    """

    def __init__(self, tokenizer, stop: list[str] | None = None, prompt_ids: list[int] | None = None):
        self._decode = tokenizer.decode
        self.stop = [s for s in (stop or []) if s]
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        context = list(prompt_ids[-_CONTEXT_TOKENS:]) if prompt_ids else []
        self._ids: list[int] = context
        self._prefix = 0                # window start: decode(ids[prefix:read]) is text already counted
        self._read = len(context)       # ids before this are in self._text (or are prompt context)
        self._text = ""                 # every character decoded so far (stop check happens on it)
        self._sent = 0                  # how much of self._text has been released
        self.stopped: str | None = None
        self.num_tokens = 0

    @property
    def text(self) -> str:
        """All text released so far."""
        return self._text[: self._sent]

    @property
    def decoded_len(self) -> int:
        """Characters decoded so far, released or held back (for logprobs text offsets)."""
        return len(self._text) if self.stopped is None else self._sent

    def add(self, token_id: int) -> str:
        """Take one new token; return the text it releases (often "", never past a stop string)."""
        if self.stopped is not None:
            return ""
        self._ids.append(token_id)
        self.num_tokens += 1
        prefix_text = self._decode(self._ids[self._prefix: self._read])
        full_text = self._decode(self._ids[self._prefix:])
        pending = len(self._ids) - self._read
        if len(full_text) > len(prefix_text) and (not full_text.endswith(REPLACEMENT)
                                                  or pending >= _MAX_PENDING_TOKENS):
            self._text += full_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release(final=False)

    def flush(self) -> str:
        """The request is over: release what was held back (a dangling partial character shows as
        U+FFFD, as a decode of the whole output would show it)."""
        if self.stopped is not None:
            return ""
        if self._read < len(self._ids):
            prefix_text = self._decode(self._ids[self._prefix: self._read])
            full_text = self._decode(self._ids[self._prefix:])
            if len(full_text) > len(prefix_text):
                self._text += full_text[len(prefix_text):]
            self._prefix = self._read = len(self._ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        start = self._sent
        if self.stop:
            hits = [(i, s) for s in self.stop if (i := self._text.find(s, start)) >= 0]
            if hits:
                end, self.stopped = min(hits)
                self._sent = max(end, start)
                return self._text[start: self._sent]
        end = len(self._text)
        if self.stop and not final:
            end -= self._stop_prefix_len(self._text[max(start, end - self._hold):])
        self._sent = max(end, start)
        return self._text[start: self._sent]

    def _stop_prefix_len(self, tail: str) -> int:
        """Length of the longest suffix of `tail` that some stop string starts with."""
        for k in range(len(tail), 0, -1):
            suffix = tail[-k:]
            if any(s.startswith(suffix) for s in self.stop):
                return k
        return 0


def _byte_to_unicode() -> dict[str, int]:
    """The printable stand-ins byte-level BPE vocabularies use for raw bytes (GPT-2 scheme), inverted."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_OF = _byte_to_unicode()
_SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenTexts:
    """Each token's own text and raw bytes, for logprobs (cached; byte-level and SentencePiece aware)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._hf = getattr(tokenizer, "_tok", None)
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._byte_level = False
        if self._hf is not None:
            try:
                pieces = self._hf.convert_ids_to_tokens(self._hf.encode(" a b", add_special_tokens=False))
                self._byte_level = any("\u0120" in p for p in pieces)  # "Ġ" stands for a space byte
            except Exception:
                self._hf = None

    def get(self, token_id: int) -> tuple[str, list[int]]:
        """(display string, UTF-8 bytes). A token that is not whole UTF-8 shows as "bytes:\\xNN..."."""
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._raw_bytes(token_id)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            hit = self._cache[token_id] = (text, list(raw))
        return hit

    def _raw_bytes(self, token_id: int) -> bytes:
        piece = None
        if self._hf is not None:
            try:
                piece = self._hf.convert_ids_to_tokens(int(token_id))
            except Exception:
                piece = None
        if isinstance(piece, str) and piece:
            if self._byte_level and all(c in _BYTE_OF for c in piece):
                return bytes(_BYTE_OF[c] for c in piece)
            m = _SP_BYTE.fullmatch(piece)
            if m:
                return bytes([int(m.group(1), 16)])
            if not self._byte_level and "\u2581" in piece:  # SentencePiece marks spaces with "▁"
                return piece.replace("\u2581", " ").encode("utf-8")
        text = self._tokenizer.decode([token_id])
        if not text and isinstance(piece, str):
            text = piece  # a special token: show its name rather than nothing
        return text.encode("utf-8")
