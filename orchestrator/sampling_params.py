"""Per-request generation settings, validated where they enter (JSONL line, Python API or HTTP body).

Every numeric setting has a lower and an upper bound (`BOUNDS`), so nothing a client sends can
overflow a step plan's int64 or float32 fields on a rank; the HTTP schema is made from the same table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from meshserve.errors import UserError


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A finite int or float (bools, NaN and infinities are not numbers here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def has_lone_surrogate(text: str) -> bool:
    """True when `text` holds a lone surrogate code point, which no tokenizer (nor UTF-8) can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


@dataclass(frozen=True)
class Bound:
    """The allowed range of one numeric setting: lo..hi, both included unless lo_open; `zero_or`:
    0 is allowed as well, with lo the smallest value above it."""
    kind: str                 # "integer" | "number"
    lo: int | float
    hi: int | float
    lo_open: bool = False
    zero_or: bool = False

    def ok(self, v) -> bool:
        if not (is_int(v) if self.kind == "integer" else is_number(v)):
            return False
        if self.zero_or and v == 0:
            return True
        return (self.lo < v if self.lo_open else self.lo <= v) and v <= self.hi

    def describe(self) -> str:
        what = "an integer" if self.kind == "integer" else "a number"
        if self.kind == "integer":
            rng = f"in {self.lo}..{self.hi}"
        else:
            rng = f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]"
        return f"0 or {what} {rng}" if self.zero_or else f"{what} {rng}"


MAX_TOP_K = 1 << 20        # at or above the vocabulary size top_k keeps every token
MAX_LOGPROBS = 20
MAX_TOKEN_ID = 2**31 - 1
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024      # entries of logit_bias per request
LOGIT_BIAS_LIMIT = 100.0   # biases are clamped to [-100, 100], as OpenAI documents
MIN_TEMPERATURE = 1e-5     # below this (but above 0) float32 logits / temperature overflow

BOUNDS: dict[str, Bound] = {
    "max_tokens": Bound("integer", 1, MAX_TOKEN_ID),  # the engine's max_seq_len bounds it further
    "temperature": Bound("number", MIN_TEMPERATURE, 100.0, zero_or=True),
    "top_p": Bound("number", 0.0, 1.0, lo_open=True),
    "top_k": Bound("integer", 0, MAX_TOP_K),
    "seed": Bound("integer", -(2**63), 2**64 - 1),
    "min_p": Bound("number", 0.0, 1.0),
    "presence_penalty": Bound("number", -2.0, 2.0),
    "frequency_penalty": Bound("number", -2.0, 2.0),
    "repetition_penalty": Bound("number", 0.01, 100.0),
    "logprobs": Bound("integer", 0, MAX_LOGPROBS),
    "prompt_logprobs": Bound("integer", 0, MAX_LOGPROBS),
}


def shown(v) -> str:
    """A value for an error message, cut short when it is huge (or nested too deeply to show)."""
    try:
        text = repr(v)
    except RecursionError:
        return f"a {type(v).__name__} nested too deeply to show"
    return text if len(text) <= 80 else text[:60] + f"... ({len(text)} characters)"


def _stop_ok(stop) -> bool:
    return (isinstance(stop, list) and len(stop) <= MAX_STOP_STRINGS
            and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS and not has_lone_surrogate(s)
                    for s in stop))


def normalize_logit_bias(bias) -> dict[int, float] | None:
    """{token id: bias} with ids as ints (a JSON round trip turns them into digit strings) and biases
    clamped to [-LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT]; None when it is not such a mapping."""
    if bias is None:
        return {}
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        return None
    out = {}
    for k, v in bias.items():
        if isinstance(k, str) and k.isascii() and k.isdigit() and len(k) <= 10:
            k = int(k)
        if not (is_int(k) and 0 <= k <= MAX_TOKEN_ID and is_number(v)):
            return None
        out[k] = max(-LOGIT_BIAS_LIMIT, min(LOGIT_BIAS_LIMIT, float(v)))
    return out


def _token_ids_ok(ids) -> bool:
    return (isinstance(ids, list) and len(ids) <= MAX_STOP_TOKEN_IDS
            and all(is_int(t) and 0 <= t <= MAX_TOKEN_ID for t in ids))


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
    # the prompt's log-probabilities too (each prompt token after the first, under the tokens before
    # it), with this many top alternatives per position (0..20); None: not computed
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    # A grammar the output must follow, as plain JSON (meshserve.orchestrator.grammar.GUIDED_KINDS):
    # {"json_schema": {...}}, {"regex": "..."} or {"choice": ["...", ...]}; None: free text.
    structured: dict | None = None
    return_logits: bool = False  # debugging aid: the logits that chose the first generated token

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        bias = normalize_logit_bias(self.logit_bias)
        if bias is None:
            raise UserError(f"logit_bias={shown(self.logit_bias)} is not allowed: use a mapping of at most "
                            f"{MAX_LOGIT_BIAS} token ids (0..{MAX_TOKEN_ID}) to finite numbers (clamped to "
                            f"[-{LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}])")
        self.logit_bias = bias
        if self.structured is not None:
            from meshserve.orchestrator.grammar import check_structured
            check_structured(self.structured)
        b = BOUNDS
        checks = [
            ("max_tokens", b["max_tokens"].ok(self.max_tokens), b["max_tokens"].describe()),
            ("temperature", b["temperature"].ok(self.temperature),
             b["temperature"].describe() + " (0 is greedy)"),
            ("top_p", b["top_p"].ok(self.top_p), b["top_p"].describe()),
            ("top_k", b["top_k"].ok(self.top_k), b["top_k"].describe() + " (0 turns it off)"),
            ("seed", self.seed is None or b["seed"].ok(self.seed), b["seed"].describe()),
            ("stop", _stop_ok(self.stop),
             f"a non-empty string (valid Unicode, at most {MAX_STOP_CHARS} characters) or a list of at most "
             f"{MAX_STOP_STRINGS} of them"),
            ("min_p", b["min_p"].ok(self.min_p), b["min_p"].describe()),
            ("presence_penalty", b["presence_penalty"].ok(self.presence_penalty), b["presence_penalty"].describe()),
            ("frequency_penalty", b["frequency_penalty"].ok(self.frequency_penalty),
             b["frequency_penalty"].describe()),
            ("repetition_penalty", b["repetition_penalty"].ok(self.repetition_penalty),
             b["repetition_penalty"].describe() + " (1 turns it off)"),
            ("stop_token_ids", _token_ids_ok(self.stop_token_ids),
             f"a list of at most {MAX_STOP_TOKEN_IDS} token ids, each in 0..{MAX_TOKEN_ID}"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "true or false"),
            ("logprobs", self.logprobs is None or b["logprobs"].ok(self.logprobs), b["logprobs"].describe()),
            ("prompt_logprobs", self.prompt_logprobs is None or b["prompt_logprobs"].ok(self.prompt_logprobs),
             b["prompt_logprobs"].describe() + " (or None: off)"),
            ("return_logits", isinstance(self.return_logits, bool), "true or false"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise UserError(f"{name}={shown(getattr(self, name))} is not allowed: use {allowed}")

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)
