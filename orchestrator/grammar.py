"""Structured output: the grammar a request's output must follow (a JSON schema, a regular expression,
a list of choices, or a sequence of JSON values with a separator between them, as several tool calls
are), compiled with llguidance, and the per-sequence matcher that gives each step's
allowed tokens.

Where it runs: the grammar state lives on rank 0, next to the scheduler. The front end compiles a
request's grammar before admitting it (off the event loop, with a deadline), so a schema that cannot
compile is a 400 that says why; compiled grammars are cached by their canonical JSON, a bounded
number of them. The engine loop gives each constrained sequence a copy of its cached matcher, fills
the sequence's mask row once its previous token is known (while it builds the step plan, or, when
the step went out ahead of that token, just before the step samples) and advances the matcher with
each sampled token. Masks reach the sampling rank as packed bits, fixed-schema tensors.

llguidance bounds its own work (lexer fuel, parser items, lexer states, grammar size); the deadline
here is the backstop. It refuses the JSON Schema keywords it does not implement instead of ignoring
them, so a grammar never silently allows output the schema forbids.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np

from meshserve.errors import UserError

GUIDED_KINDS = ("json_schema", "regex", "choice", "json_sequence")
MAX_SPEC_CHARS = 64 * 1024   # of a grammar's canonical JSON
MAX_CHOICES = 1024
MAX_SEQUENCE_ITEMS = 1024  # values of a json_sequence
MAX_SEPARATOR_CHARS = 16
COMPILE_TIMEOUT_S = 10.0
CACHE_ENTRIES = 128


class GrammarError(UserError):
    """A grammar that cannot be used; the message says why."""


class GrammarFailed(UserError):
    """A request's grammar that failed while its answer was generated (the matcher ran past one of
    llguidance's limits, or refused a token): the answer cannot be completed, so it is an error, never
    a finished answer."""
    code = "grammar_failed"  # the OpenAI error body's code


def failure_message(reason: str, tokens: int) -> str:
    """GrammarFailed's message: the matcher's `reason`, after `tokens` tokens of the answer."""
    return (f"the grammar failed after {tokens} token{'' if tokens == 1 else 's'} of the answer ({reason}), so "
            "no answer that follows it can be returned; simplify the grammar (fewer or shorter repetitions, "
            "fewer alternatives) and send the request again")


def check_structured(spec) -> None:
    """The shape of SamplingParams.structured (compiling is GrammarCompiler's job)."""
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in GUIDED_KINDS):
        raise UserError(f"structured={_short(spec)} is not allowed: use one of "
                        + ", ".join(f'{{"{k}": ...}}' for k in GUIDED_KINDS))
    kind, value = next(iter(spec.items()))
    if kind == "json_schema" and not isinstance(value, (dict, bool)):
        raise UserError("structured json_schema must be a JSON Schema object")
    if kind == "regex" and not (isinstance(value, str) and value):
        raise UserError("structured regex must be a non-empty string")
    if kind == "choice" and not (isinstance(value, list) and 0 < len(value) <= MAX_CHOICES
                                 and all(isinstance(c, str) and c for c in value)):
        raise UserError(f"structured choice must be a list of 1..{MAX_CHOICES} non-empty strings")
    if kind == "json_sequence":
        _check_sequence(value)
    try:
        size = len(canonical(spec))
    except (RecursionError, ValueError):
        raise UserError("the grammar is nested too deeply to be used") from None
    if size > MAX_SPEC_CHARS:
        raise UserError(f"the grammar is too large ({size} characters as JSON): at most {MAX_SPEC_CHARS} are allowed")


def _check_sequence(value) -> None:
    """{"schema": a JSON Schema object, "separator": text, "max_items": n}: 1 to n JSON values, each
    valid against the schema, with the separator between two of them."""
    if not (isinstance(value, dict) and set(value) == {"schema", "separator", "max_items"}):
        raise UserError('structured json_sequence must be {"schema": {...}, "separator": "...", "max_items": n}')
    sep, most = value["separator"], value["max_items"]
    if not isinstance(value["schema"], dict):
        raise UserError("structured json_sequence schema must be a JSON Schema object")
    if not (isinstance(sep, str) and 0 < len(sep) <= MAX_SEPARATOR_CHARS and sep.isprintable()):
        raise UserError(f"structured json_sequence separator must be 1..{MAX_SEPARATOR_CHARS} printable characters")
    if not (isinstance(most, int) and not isinstance(most, bool) and 0 < most <= MAX_SEQUENCE_ITEMS):
        raise UserError(f"structured json_sequence max_items must be an integer in 1..{MAX_SEQUENCE_ITEMS}")


def canonical(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:60] + "..."


def _grammar_text(spec: dict) -> str:
    """llguidance's grammar for a spec. JSON output is compact: whitespace between tokens is not
    allowed, so a model cannot spend its budget on it."""
    import llguidance
    kind, value = next(iter(spec.items()))
    if kind == "json_schema":
        schema = {"type": "object"} if value is True else value
        if value is False:
            raise GrammarError("the schema `false` allows no value")
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except (ValueError, TypeError) as err:
            raise GrammarError(f"the JSON schema cannot be used: {err}") from None
    if kind == "json_sequence":
        return llguidance.LLMatcher.grammar_from_lark(_sequence_lark(value))
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(value)
    return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))


def _sequence_lark(value: dict) -> str:
    """The Lark grammar (llguidance's dialect) of a json_sequence: the schema as an embedded %json
    item, compact like a json_schema grammar, repeated with the separator between."""
    schema = {**value["schema"], "x-guidance": {"whitespace_flexible": False}}
    more = value["max_items"] - 1
    repeat = f"({json.dumps(value['separator'])} item){{0,{more}}}\n" if more else "\n"
    return f"start: item {repeat}item: %json {json.dumps(schema)}\n"


class GrammarMatcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher, num_words: int):
        self._m, self._num_words = matcher, num_words

    def fill(self, row: np.ndarray) -> None:
        """Write the allowed next tokens into the int32 `row` (token t: bit t % 32 of word t // 32;
        words past the vocabulary's are cleared)."""
        self._m.unsafe_compute_mask_ptr(row.ctypes.data, self._num_words * 4)
        row[self._num_words:] = 0

    def consume(self, token_id: int) -> bool:
        return self._m.consume_token(token_id)

    @property
    def stopped(self) -> bool:
        """Nothing more may follow (the grammar is complete, or the matcher failed)."""
        return self._m.is_stopped() or self._m.is_error()

    @property
    def error(self) -> str | None:
        """Why the matcher failed (its first line: llguidance adds its state), once it has; else None."""
        if not self._m.is_error():
            return None
        lines = _lines(self._m.get_error())
        return lines[0][:300] if lines else "unknown error"


class GrammarCompiler:
    """Compiles and caches grammars for one tokenizer and vocabulary; thread-safe."""

    def __init__(self, hf_tokenizer, vocab_size: int, timeout_s: float = COMPILE_TIMEOUT_S,
                 max_entries: int = CACHE_ENTRIES):
        self._hf, self.vocab_size = hf_tokenizer, max(vocab_size, len(hf_tokenizer))
        self.timeout_s, self.max_entries = timeout_s, max_entries
        self.words = -(-self.vocab_size // 64)  # int64 words per mask row (two int32 words each)
        self._tok = None
        self._executor = None  # llguidance's thread pool for a batch of masks (engine thread only)
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, object] = OrderedDict()  # canonical spec -> pristine LLMatcher
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="meshserve-grammar")

    def _tokenizer(self):
        with self._lock:
            if self._tok is None:
                import llguidance.hf
                self._tok = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size)
            return self._tok

    def _build(self, spec: dict):
        import llguidance
        tok = self._tokenizer()
        text = _grammar_text(spec)
        limits = llguidance.LLParserLimits(max_lexer_states=50_000)
        err = llguidance.LLMatcher.validate_grammar(text, tok, limits=limits)
        if err:
            raise GrammarError(_why(err))
        m = llguidance.LLMatcher(tok, text, log_level=0, limits=limits)
        if m.is_error():
            raise GrammarError(_why(m.get_error()))
        _check_first_step(m)
        return m

    def compile(self, spec: dict):
        """The pristine matcher of `spec` (cached); GrammarError when it cannot compile in time."""
        check_structured(spec)
        key = canonical(spec)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        future = self._pool.submit(self._build, spec)
        try:
            m = future.result(timeout=self.timeout_s)
        except FutureTimeout:
            raise GrammarError(f"the grammar did not compile within {self.timeout_s:g} s; simplify it") from None
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - whatever the library says, it is about the grammar
            raise GrammarError(_why(f"{type(err).__name__}: {err}")) from None
        with self._lock:
            self._cache[key] = m
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return m

    def matcher(self, spec: dict) -> GrammarMatcher:
        return GrammarMatcher(self.compile(spec).deep_copy(), -(-self.vocab_size // 32))

    def masks(self, matchers: list[GrammarMatcher]) -> np.ndarray:
        """The next-token masks of `matchers`, int32 [len, 2 * words] (pairs of int32 words, so the
        array views as int64), computed on llguidance's threads when there are several."""
        n32 = -(-self.vocab_size // 32)
        out = np.zeros((len(matchers), 2 * self.words), dtype=np.int32)
        if len(matchers) == 1:
            matchers[0].fill(out[0])
            return out
        if self._executor is None:
            import llguidance
            self._executor = llguidance.LLExecutor()
        rows = np.empty((len(matchers), n32), dtype=np.int32)
        self._executor.unsafe_compute_mask_ptr([(m._m, i) for i, m in enumerate(matchers)], rows.ctypes.data,
                                               n32 * 4, len(matchers))
        out[:, :n32] = rows
        return out


def _check_first_step(matcher) -> None:
    """Refuse a grammar that compiles but allows no first token (e.g. a schema that only refers to
    itself): run, it would end at once with an empty answer that does not follow it."""
    probe = matcher.deep_copy()
    probe.compute_bitmask()
    if probe.is_error():
        raise GrammarError("the grammar allows no output at all (no token can start an answer that follows it); "
                           "check it for a reference to itself with nothing else in it, or for conditions no "
                           "value can meet")


def _lines(message: str) -> list[str]:
    """An llguidance error's non-blank lines, stripped."""
    return [line.strip() for line in message.splitlines() if line.strip()]


def _why(message: str) -> str:
    lines = _lines(message)[:4]
    return f"the grammar cannot be compiled: {' '.join(lines)[:500] or 'unknown error'}"
