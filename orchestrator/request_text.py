"""The one owner of a request's output text, on the front-end side of the engine boundary.

The engine decides only token-level stops (end-of-sequence, stop token ids, length). Everything about
text is decided here, the same way for the HTTP server (streamed or not) and for `meshserve generate`:
whole characters only while streaming, stop strings cut out (and the request ends there), a stop
token never shown, and at the end whatever partial character is left written as U+FFFD.
"""
from __future__ import annotations

from dataclasses import dataclass

from meshserve.orchestrator.detokenizer import IncrementalDetokenizer
from meshserve.orchestrator.sampling_params import SamplingParams


@dataclass
class TextDelta:
    text: str                  # text released by this token ("" while a character or stop is pending)
    shown: bool                # False for a stop token (eos or stop_token_ids): it has no text
    finish_reason: str | None  # set on the request's last token: "stop" | "length" (| the engine's)


class RequestText:
    def __init__(self, tokenizer, params: SamplingParams, prompt_ids: list[int]):
        self._detok = IncrementalDetokenizer(tokenizer, params.stop, prompt_ids)
        self._params = params
        self._eos = getattr(tokenizer, "eos_token_id", None)
        self.finish_reason: str | None = None

    @property
    def text(self) -> str:
        """All text released so far."""
        return self._detok.text

    @property
    def offset(self) -> int:
        """Characters decoded so far (the text offset of the next token, for logprobs)."""
        return self._detok.decoded_len

    def _is_stop_token(self, token_id: int, engine_reason: str | None) -> bool:
        p = self._params
        return engine_reason == "stop" and (token_id in p.stop_token_ids
                                            or (token_id == self._eos and not p.ignore_eos))

    def add(self, token_id: int, engine_reason: str | None) -> TextDelta:
        """Take the engine's next token and its finish reason (None while it runs). A stop string
        ends the request here: the caller must then stop the engine's work on it."""
        if self.finish_reason is not None:
            raise RuntimeError("the request already finished")
        shown = not self._is_stop_token(token_id, engine_reason)
        text = self._detok.add(token_id) if shown else ""
        if self._detok.stopped is not None:
            engine_reason = "stop"
        elif engine_reason is not None:
            text += self._detok.flush()
        self.finish_reason = engine_reason
        return TextDelta(text, shown, engine_reason)

    def end(self, reason: str) -> str:
        """The engine ended the request without a last token (an abort): release what is held."""
        self.finish_reason = reason
        return self._detok.flush()
