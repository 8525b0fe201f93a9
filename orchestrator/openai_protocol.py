"""The OpenAI wire format: request parsing and validation, response and stream-chunk builders.

Parsing is hand-written so every mistake becomes an HTTP 400 in OpenAI's error shape that names
the field. Unknown fields are ignored (clients send extras); known fields of the wrong type are
refused. Nothing here talks to the engine or the network.
"""
from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field

from meshserve.errors import UserError
from meshserve.orchestrator.sampling_params import SamplingParams, is_int, is_number

MAX_LOGPROBS = 20


class RequestError(Exception):
    """A request the server refuses; rendered as OpenAI's {"error": {...}} body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 err_type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.err_type, self.code = message, param, status, err_type, code

    def body(self) -> dict:
        return error_body(self.message, self.err_type, self.param, self.code)


def error_body(message: str, err_type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


# ---- field readers ------------------------------------------------------------------------------

def _int(body: dict, name: str, default=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not is_int(v):
        raise RequestError(f"{name} must be an integer, got {v!r}", name)
    return v


def _number(body: dict, name: str, default=None):
    v = body.get(name)
    if v is None:
        return default
    if not is_number(v):
        raise RequestError(f"{name} must be a number, got {v!r}", name)
    return v


def _bool(body: dict, name: str, default=None):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise RequestError(f"{name} must be true or false, got {v!r}", name)
    return v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not (isinstance(v, list) and all(isinstance(s, str) for s in v)):
        raise RequestError(f"stop must be a string or a list of strings, got {v!r}", "stop")
    if any(not s for s in v):
        raise RequestError("stop strings must not be empty", "stop")
    return v


def _token_ids(body: dict, name: str) -> list[int]:
    v = body.get(name)
    if v is None:
        return []
    if not (isinstance(v, list) and all(is_int(t) and t >= 0 for t in v)):
        raise RequestError(f"{name} must be a list of token ids (integers >= 0), got {v!r}", name)
    return v


def _unsupported(body: dict) -> None:
    """Known OpenAI fields that would silently change the answer if ignored."""
    n = _int(body, "n", 1)
    if n != 1:
        raise RequestError(f"n={n} is not supported: this server returns one choice per request; "
                           "send n=1 (or leave it out) and repeat the request for more", "n")
    best_of = _int(body, "best_of", 1)
    if best_of != 1:
        raise RequestError(f"best_of={best_of} is not supported; leave it out", "best_of")
    if body.get("logit_bias"):
        raise RequestError("logit_bias is not supported; leave it out", "logit_bias")


# ---- parsed requests ---------------------------------------------------------------------------

@dataclass
class ParsedRequest:
    """A validated request, before tokenization. `prompt` is text, token ids, or chat messages."""
    chat: bool
    prompt: str | list[int] | list[dict]
    sampling: dict                      # SamplingParams keyword arguments (max_tokens None: fill to context)
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None         # top alternatives per token when logprobs are wanted; None: off
    prompt_field: str = "prompt"
    max_tokens_field: str = "max_tokens"
    field_names: dict = field(default_factory=dict)  # SamplingParams field -> request field, for errors

    def param_name(self, sampling_field: str) -> str:
        return self.field_names.get(sampling_field, sampling_field)


def _common(body: dict) -> tuple[dict, bool, bool]:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(f"model must be a string, got {model!r}", "model")
    _unsupported(body)
    top_k = _int(body, "top_k", 0)
    sampling = dict(
        temperature=_number(body, "temperature", 1.0),
        top_p=_number(body, "top_p", 1.0),
        top_k=0 if top_k == -1 else top_k,  # -1 is the common "off" spelling
        min_p=_number(body, "min_p", 0.0),
        seed=_int(body, "seed"),
        stop=_stop(body),
        stop_token_ids=_token_ids(body, "stop_token_ids"),
        presence_penalty=_number(body, "presence_penalty", 0.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0),
        ignore_eos=_bool(body, "ignore_eos", False),
    )
    stream = _bool(body, "stream", False)
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise RequestError(f"stream_options must be an object, got {opts!r}", "stream_options")
        v = opts.get("include_usage")
        if v is not None and not isinstance(v, bool):
            raise RequestError(f"stream_options.include_usage must be true or false, got {v!r}",
                               "stream_options.include_usage")
        include_usage = bool(v)
    return sampling, stream, include_usage


def parse_completion_request(body: dict) -> ParsedRequest:
    """POST /v1/completions."""
    sampling, stream, include_usage = _common(body)
    if "prompt" not in body:
        raise RequestError("prompt is required: a string or a list of token ids", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if prompt and all(isinstance(p, (str, list)) for p in prompt):
            raise RequestError("batched prompts are not supported: send one prompt per request", "prompt")
        if not prompt or not all(is_int(t) for t in prompt):
            raise RequestError("prompt must be a string or a non-empty list of token ids", "prompt")
    elif not isinstance(prompt, str):
        raise RequestError(f"prompt must be a string or a list of token ids, got {prompt!r}", "prompt")
    if _bool(body, "echo", False):
        raise RequestError("echo=true is not supported; leave it out", "echo")
    if body.get("suffix"):
        raise RequestError("suffix is not supported; leave it out", "suffix")
    logprobs = _int(body, "logprobs")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise RequestError(f"logprobs={logprobs} is not allowed: use an integer in 0..{MAX_LOGPROBS}", "logprobs")
    sampling["max_tokens"] = _int(body, "max_tokens", 16)
    sampling["logprobs"] = logprobs
    return ParsedRequest(chat=False, prompt=prompt, sampling=sampling, stream=stream,
                         include_usage=include_usage, logprobs=logprobs)


_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def _message_text(content, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RequestError(f"messages[{i}].content: only text parts are supported, got {kind!r}",
                                   "messages")
        return "".join(parts)
    raise RequestError(f"messages[{i}].content must be a string or a list of text parts", "messages")


def parse_chat_request(body: dict) -> ParsedRequest:
    """POST /v1/chat/completions."""
    sampling, stream, include_usage = _common(body)
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string \"role\"", "messages")
        if m["role"] not in _ROLES:
            raise RequestError(f"messages[{i}].role {m['role']!r} is not one of {', '.join(_ROLES)}", "messages")
        msg = {"role": m["role"], "content": _message_text(m.get("content"), i)}
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        messages.append(msg)
    if body.get("tools"):
        raise RequestError("tools are not supported; leave them out", "tools")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") in (None, "text")):
        raise RequestError("response_format other than {\"type\": \"text\"} is not supported", "response_format")
    want = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs")
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise RequestError(f"top_logprobs={top} is not allowed: use an integer in 0..{MAX_LOGPROBS}",
                           "top_logprobs")
    if top and not want:
        raise RequestError("top_logprobs needs logprobs=true", "top_logprobs")
    logprobs = (top or 0) if want else None
    max_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    sampling["max_tokens"] = _int(body, max_field)  # None: up to the end of the context window
    sampling["logprobs"] = logprobs
    return ParsedRequest(chat=True, prompt=messages, sampling=sampling, stream=stream,
                         include_usage=include_usage, logprobs=logprobs, prompt_field="messages",
                         max_tokens_field=max_field,
                         field_names={"max_tokens": max_field, "logprobs": "top_logprobs"})


def tokenize(req: ParsedRequest, tokenizer) -> list[int]:
    """Prompt token ids for a parsed request (chat goes through the tokenizer's chat template)."""
    try:
        if req.chat:
            return list(tokenizer.encode_chat(req.prompt))
        if isinstance(req.prompt, str):
            return list(tokenizer.encode(req.prompt))
        return list(req.prompt)
    except UserError as err:
        raise RequestError(str(err), req.prompt_field) from None


_FIELD_IN_MESSAGE = re.compile(r"^(\w+)=")


def sampling_params(req: ParsedRequest, prompt_len: int, max_seq_len: int) -> SamplingParams:
    """Build SamplingParams; their validation errors become 400s naming the request field."""
    kwargs = dict(req.sampling)
    if kwargs.get("max_tokens") is None:
        kwargs["max_tokens"] = max(1, max_seq_len - prompt_len)
    try:
        return SamplingParams(**kwargs)
    except UserError as err:
        m = _FIELD_IN_MESSAGE.match(str(err))
        param = req.param_name(m.group(1)) if m else None
        raise RequestError(str(err), param) from None


def check_with_engine(engine, req: ParsedRequest, prompt_ids: list[int], params: SamplingParams) -> None:
    """engine.check, with its UserError turned into a 400 on the prompt or max_tokens field."""
    try:
        engine.check(prompt_ids, params)
    except UserError as err:
        fits = len(prompt_ids) < engine.max_seq_len
        too_long = len(prompt_ids) + params.max_tokens > engine.max_seq_len
        param = req.max_tokens_field if (fits and too_long and req.sampling.get("max_tokens") is not None) \
            else req.prompt_field
        raise RequestError(str(err), param) from None


# ---- responses -----------------------------------------------------------------------------------

def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _finite(x: float) -> float:
    """JSON has no infinities: clamp -inf (an impossible token) to a very negative number."""
    x = float(x)
    if math.isnan(x):
        return -9999.0
    return max(x, -9999.0)


@dataclass
class TokenLogprob:
    """One generated token with its log-probability and the top alternatives (already as text)."""
    token: str
    bytes: list[int]
    logprob: float
    top: list[tuple[str, list[int], float]] | None
    text_offset: int


def completion_logprobs(entries: list[TokenLogprob]) -> dict:
    """Legacy completions format: parallel lists."""
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [_finite(e.logprob) for e in entries],
        "top_logprobs": [{t: _finite(lp) for t, _, lp in (e.top or [])} for e in entries],
        "text_offset": [e.text_offset for e in entries],
    }


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    return {"content": [
        {"token": e.token, "logprob": _finite(e.logprob), "bytes": e.bytes,
         "top_logprobs": [{"token": t, "logprob": _finite(lp), "bytes": b} for t, b, lp in (e.top or [])]}
        for e in entries]}


def completion_response(rid: str, created: int, model: str, text: str, finish_reason: str,
                        prompt_tokens: int, completion_tokens: int, logprobs: dict | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_response(rid: str, created: int, model: str, text: str, finish_reason: str,
                  prompt_tokens: int, completion_tokens: int, logprobs: dict | None) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": logprobs, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(rid: str, created: int, model: str, text: str, finish_reason: str | None = None,
                     logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


def chat_chunk(rid: str, created: int, model: str, delta: dict, finish_reason: str | None = None,
               logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, created: int, model: str, chat: bool, prompt_tokens: int,
                completion_tokens: int) -> dict:
    """The extra chunk OpenAI sends with stream_options.include_usage: no choices, just usage."""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
