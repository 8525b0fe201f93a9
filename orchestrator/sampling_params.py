"""Per-request generation settings, validated where they enter (JSONL line or HTTP body)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from meshserve.errors import UserError


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A finite int or float (bools, NaN and infinities are not numbers here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # how many top alternatives to report with each token (0..20)
    return_logits: bool = False  # debugging aid: the logits that chose the first generated token

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            ("max_tokens", is_int(self.max_tokens) and self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", is_number(self.temperature) and self.temperature >= 0, "a number >= 0"),
            ("top_p", is_number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("top_k", is_int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 turns it off)"),
            ("seed", self.seed is None or is_int(self.seed), "an integer"),
            ("stop", isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
             "a non-empty string or a list of them"),
            ("min_p", is_number(self.min_p) and 0 <= self.min_p <= 1, "a number in [0, 1]"),
            ("presence_penalty", is_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             "a number in [-2, 2]"),
            ("frequency_penalty", is_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "a number in [-2, 2]"),
            ("repetition_penalty", is_number(self.repetition_penalty) and self.repetition_penalty > 0,
             "a number > 0 (1 turns it off)"),
            ("stop_token_ids", isinstance(self.stop_token_ids, list)
             and all(is_int(t) and t >= 0 for t in self.stop_token_ids), "a list of token ids"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "true or false"),
            ("logprobs", self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= 20),
             "an integer in 0..20"),
            ("return_logits", isinstance(self.return_logits, bool), "true or false"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise UserError(f"{name}={getattr(self, name)!r} is not allowed: use {allowed}")

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)
