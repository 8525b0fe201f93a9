"""The OpenAI wire format: request parsing and validation, response and stream-chunk builders.

Parsing is hand-written so every mistake becomes an HTTP 4xx in OpenAI's error shape that names
the field (and, for numbers, the value and the allowed range). Unknown fields are ignored (clients
send extras); known fields of the wrong type are refused. `request_schema` describes the same rules
as JSON Schema, from the same bounds, for /openapi.json. Nothing here talks to the engine or the
network.
"""
from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field

from meshserve.errors import UserError
from meshserve.orchestrator import tool_calls
from meshserve.orchestrator.grammar import GrammarFailed
from meshserve.orchestrator.sampling_params import (BOUNDS, LOGIT_BIAS_LIMIT, MAX_LOGIT_BIAS, MAX_STOP_CHARS,
                                                    MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, MAX_TOKEN_ID, MAX_TOP_K,
                                                    Bound, SamplingParams, has_lone_surrogate, is_int, is_number,
                                                    normalize_logit_bias, shown)


class RequestError(Exception):
    """A request the server refuses; rendered as OpenAI's {"error": {...}} body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 err_type: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.err_type, self.code = message, param, status, err_type, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.err_type, self.param, self.code)


def error_body(message: str, err_type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


# ---- field readers ------------------------------------------------------------------------------

# The HTTP spelling of the numeric sampling fields: top_k also takes -1 (off), as other servers do.
HTTP_BOUNDS: dict[str, Bound] = dict(BOUNDS, top_k=Bound("integer", -1, MAX_TOP_K))
_NOTES = {"top_k": " (-1 or 0 turn it off)", "temperature": " (0 is greedy)", "repetition_penalty": " (1 is off)"}


def _out_of_range(name: str, v, bound: Bound, note: str = "") -> RequestError:
    return RequestError(f"{name}={shown(v)} is not allowed: use {bound.describe()}{note}", name)


def _int(body: dict, name: str, default=None, bound: Bound | None = None, note: str = ""):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not is_int(v):
        raise RequestError(f"{name} must be an integer, got {shown(v)}", name)
    if bound is not None and not bound.ok(v):
        raise _out_of_range(name, v, bound, note)
    return v


def _number(body: dict, name: str, default=None, bound: Bound | None = None, note: str = ""):
    v = body.get(name)
    if v is None:
        return default
    if not is_number(v):
        raise RequestError(f"{name} must be a finite number, got {shown(v)}", name)
    if bound is not None and not bound.ok(v):
        raise _out_of_range(name, v, bound, note)
    return v


def _sampling_number(body: dict, name: str, default):
    read = _int if HTTP_BOUNDS[name].kind == "integer" else _number
    return read(body, name, default, HTTP_BOUNDS[name], _NOTES.get(name, ""))


def _bool(body: dict, name: str, default=None):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise RequestError(f"{name} must be true or false, got {shown(v)}", name)
    return v


def _text(v: str, param: str, where: str | None = None) -> str:
    """A client string, refused when it holds a lone surrogate (no tokenizer can take it)."""
    if has_lone_surrogate(v):
        at = next(i for i, c in enumerate(v) if 0xD800 <= ord(c) <= 0xDFFF)
        raise RequestError(f"{where or param} holds a lone surrogate (U+{ord(v[at]):04X} at character {at}), "
                           "which is not valid Unicode; send UTF-8 text", param)
    return v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not (isinstance(v, list) and all(isinstance(s, str) for s in v)):
        raise RequestError(f"stop must be a string or a list of strings, got {shown(v)}", "stop")
    if len(v) > MAX_STOP_STRINGS:
        raise RequestError(f"stop has {len(v)} strings: at most {MAX_STOP_STRINGS} are allowed", "stop")
    if any(not s for s in v):
        raise RequestError("stop strings must not be empty", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in v):
        raise RequestError(f"stop strings must be at most {MAX_STOP_CHARS} characters long", "stop")
    return [_text(s, "stop") for s in v]


def _as_ints(v):
    """A list with its integral floats (1.0) as ints, as single integer fields take them."""
    if not isinstance(v, list):
        return v
    return [int(t) if isinstance(t, float) and t.is_integer() else t for t in v]


def _token_ids(body: dict, name: str, max_len: int) -> list[int]:
    v = _as_ints(body.get(name))
    if v is None:
        return []
    if not (isinstance(v, list) and all(is_int(t) and 0 <= t <= MAX_TOKEN_ID for t in v)):
        raise RequestError(f"{name} must be a list of token ids (integers in 0..{MAX_TOKEN_ID}), got {shown(v)}",
                           name)
    if len(v) > max_len:
        raise RequestError(f"{name} has {len(v)} entries: at most {max_len} are allowed", name)
    return v


MAX_CHOICES = 16  # n and best_of: sequences one request may run


def _choices(body: dict, stream: bool) -> tuple[int, int]:
    """(n, best_of): choices returned, sequences run (best_of >= n; the best n by log-probability)."""
    bound = Bound("integer", 1, MAX_CHOICES)
    n = _int(body, "n", 1, bound)
    best_of = _int(body, "best_of", None, bound)
    if best_of is None:
        return n, n
    if best_of < n:
        raise RequestError(f"best_of={best_of} must be at least n={n}", "best_of")
    if best_of > n and stream:
        raise RequestError("best_of > n cannot be streamed (the best choices are known only at the end); "
                           "set stream=false or best_of=n", "best_of")
    return n, best_of


_LEGACY_FIELDS = {
    "functions": ("tools", '[{"type": "function", "function": {"name": ..., "parameters": {...}}}]'),
    "function_call": ("tool_choice", '"none", "auto", "required" or {"type": "function", "function": {"name": ...}}'),
}


def _legacy_functions(body: dict) -> None:
    """OpenAI's deprecated function-calling fields, refused with their replacement named: ignored,
    the answer would silently never call."""
    for name, (instead, form) in _LEGACY_FIELDS.items():
        if body.get(name) is not None:
            raise RequestError(f"{name} is deprecated and not supported: send {instead} instead ({form}, on "
                               "/v1/chat/completions)", name)


def unknown_model(model: str, served_name: str) -> RequestError:
    """The 404 for a model this server does not serve."""
    return RequestError(f"the model {shown(model)} does not exist: this server serves {served_name!r}", "model",
                        status=404, code="model_not_found")


def model_card(name: str, created: int, max_model_len: int) -> dict:
    """The served model as /v1/models lists it and /v1/models/{id} returns it."""
    return {"id": name, "object": "model", "created": created, "owned_by": "meshserve", "max_model_len": max_model_len}


def _unsupported(body: dict) -> None:
    """Known OpenAI fields that would silently change the answer if ignored (completions)."""
    if body.get("tools"):
        raise RequestError("tools are only for /v1/chat/completions; leave them out", "tools")


def _tools(body: dict, sampling: dict, grammar_field: str | None) -> tuple[tool_calls.Tools | None, str | None]:
    """The chat request's tools and the grammar field: enforced calls (tool_choice "required" or a
    named function) set sampling["structured"] to the calls' grammar (one call, or several when
    parallel_tool_calls allows them)."""
    try:
        tools = tool_calls.parse(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"))
    except tool_calls.ToolError as err:
        raise RequestError(str(err), err.param) from None
    if tools is None or not tools.enforced:
        return tools, grammar_field
    if sampling["structured"] is not None:
        raise RequestError(f"tool_choice {shown(body['tool_choice'])} makes the answer a call, and "
                           f"{grammar_field} sets another grammar: send only one of them", "tool_choice")
    sampling["structured"] = tools.grammar()
    return tools, tools.field


def _logit_bias(body: dict) -> dict[int, float]:
    """{"token id": bias} (keys are strings in JSON); biases are clamped to [-100, 100]."""
    v = body.get("logit_bias")
    bias = normalize_logit_bias(v)
    if bias is None:
        raise RequestError(f"logit_bias must be an object of at most {MAX_LOGIT_BIAS} entries mapping token ids "
                           f"(\"0\"..\"{MAX_TOKEN_ID}\") to finite numbers (clamped to [-{LOGIT_BIAS_LIMIT:g}, "
                           f"{LOGIT_BIAS_LIMIT:g}]), got {shown(v)}", "logit_bias")
    return bias


_GUIDED = ("guided_json", "guided_regex", "guided_choice")


def structured_output(body: dict) -> tuple[dict | None, str | None]:
    """The grammar the output must follow, as SamplingParams.structured, and the field it came from:
    response_format (json_object or json_schema) or one of vLLM's guided_json / guided_regex /
    guided_choice."""
    given = [name for name in ("response_format", *_GUIDED) if body.get(name) is not None]
    fmt = body.get("response_format")
    if fmt is not None and isinstance(fmt, dict) and fmt.get("type") in (None, "text"):
        given.remove("response_format")
    if not given:
        return None, None
    if len(given) > 1:
        raise RequestError(f"{' and '.join(given)} each set a grammar: send only one of them", given[1])
    name = given[0]
    v = body[name]
    if name == "response_format":
        kinds = '{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}'
        if not isinstance(fmt, dict) or fmt.get("type") not in ("json_object", "json_schema"):
            raise RequestError(f"response_format must be one of {kinds}, got {shown(fmt)}", name)
        if fmt["type"] == "json_object":
            return {"json_schema": {"type": "object"}}, name
        js = fmt.get("json_schema")
        if not isinstance(js, dict):
            raise RequestError("response_format.json_schema must be an object: {\"name\": ..., \"schema\": {...}}",
                               name)
        schema = js.get("schema", {"type": "object"})
        if not isinstance(schema, (dict, bool)):
            raise RequestError(f"response_format.json_schema.schema must be a JSON Schema object, got "
                               f"{shown(schema)}", name)
        return {"json_schema": schema}, name
    if name == "guided_json":
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except ValueError as err:
                raise RequestError(f"guided_json is not valid JSON ({err})", name) from None
        if not isinstance(v, (dict, bool)):
            raise RequestError(f"guided_json must be a JSON Schema object, got {shown(v)}", name)
        return {"json_schema": v}, name
    if name == "guided_regex":
        if not (isinstance(v, str) and v):
            raise RequestError(f"guided_regex must be a non-empty string, got {shown(v)}", name)
        return {"regex": _text(v, name)}, name
    if not (isinstance(v, list) and v and all(isinstance(c, str) and c for c in v)):
        raise RequestError(f"guided_choice must be a non-empty list of non-empty strings, got {shown(v)}", name)
    return {"choice": [_text(c, name) for c in v]}, name


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
    grammar_field: str | None = None    # the field that set sampling["structured"]
    tools: tool_calls.Tools | None = None  # chat: the functions the model may call
    n: int = 1                          # choices returned
    best_of: int = 1                    # sequences run (the n best are returned)
    echo: bool = False                  # completions: the prompt's text (and, with logprobs, its tokens'
                                        # logprobs) comes before the output
    echo_only: bool = False             # echo with max_tokens 0: the prompt alone (the engine runs one
                                        # token for it, which the answer leaves out)
    field_names: dict = field(default_factory=dict)  # SamplingParams field -> request field, for errors

    def param_name(self, sampling_field: str) -> str:
        if sampling_field == "structured" and self.grammar_field:
            return self.grammar_field
        return self.field_names.get(sampling_field, sampling_field)


@dataclass(frozen=True)
class Served:
    """What the server serves, which bounds some fields: the model's name (None: any name is
    taken) and the engine's max_seq_len (None: no bound beyond SamplingParams')."""
    model_name: str | None = None
    max_seq_len: int | None = None

    def max_tokens_bound(self) -> Bound:
        hi = self.max_seq_len if self.max_seq_len is not None else BOUNDS["max_tokens"].hi
        return Bound("integer", 1, hi)


def _common(body: dict, served: Served) -> tuple[dict, bool, bool]:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise RequestError(f"model must be a string, got {shown(model)}", "model")
        if served.model_name is not None and model != served.model_name:
            raise unknown_model(model, served.model_name)
    top_k = _sampling_number(body, "top_k", 0)
    sampling = dict(
        temperature=_sampling_number(body, "temperature", 1.0),
        top_p=_sampling_number(body, "top_p", 1.0),
        top_k=0 if top_k == -1 else top_k,  # -1 is the common "off" spelling
        min_p=_sampling_number(body, "min_p", 0.0),
        seed=_sampling_number(body, "seed", None),
        stop=_stop(body),
        stop_token_ids=_token_ids(body, "stop_token_ids", MAX_STOP_TOKEN_IDS),
        presence_penalty=_sampling_number(body, "presence_penalty", 0.0),
        frequency_penalty=_sampling_number(body, "frequency_penalty", 0.0),
        repetition_penalty=_sampling_number(body, "repetition_penalty", 1.0),
        ignore_eos=_bool(body, "ignore_eos", False),
        logit_bias=_logit_bias(body),
    )
    sampling["structured"], grammar_field = structured_output(body)
    stream = _bool(body, "stream", False)
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise RequestError(f"stream_options must be an object, got {shown(opts)}", "stream_options")
        v = opts.get("include_usage")
        if v is not None and not isinstance(v, bool):
            raise RequestError(f"stream_options.include_usage must be true or false, got {shown(v)}",
                               "stream_options.include_usage")
        if not stream:
            raise RequestError("stream_options is only allowed with stream=true: set stream to true, or leave "
                               "stream_options out", "stream_options")
        include_usage = bool(v)
    _legacy_functions(body)
    return sampling, stream, include_usage, grammar_field


_ZERO_WITH_ECHO = "; 0 only with echo=true, which returns the prompt alone"


def _max_tokens(body: dict, name: str, default, served: Served, more: str = ""):
    note = "" if served.max_seq_len is None else \
        f" (prompt + max_tokens must fit in the engine's max_seq_len {served.max_seq_len}{more})"
    return _int(body, name, default, served.max_tokens_bound(), note)


def parse_completion_request(body: dict, served: Served = Served()) -> ParsedRequest:
    """POST /v1/completions."""
    sampling, stream, include_usage, grammar_field = _common(body, served)
    _unsupported(body)
    if "prompt" not in body:
        raise RequestError("prompt is required: a string or a list of token ids", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        prompt = _as_ints(prompt)
        if prompt and all(isinstance(p, (str, list)) for p in prompt):
            raise RequestError("batched prompts are not supported: send one prompt per request", "prompt")
        if not prompt or not all(is_int(t) for t in prompt):
            raise RequestError("prompt must be a string or a non-empty list of token ids", "prompt")
        bad = next((t for t in prompt if not 0 <= t <= MAX_TOKEN_ID), None)
        if bad is not None:
            raise RequestError(f"prompt token {shown(bad)} is not allowed: token ids are in 0..{MAX_TOKEN_ID}",
                               "prompt")
    elif isinstance(prompt, str):
        _text(prompt, "prompt")
    else:
        raise RequestError(f"prompt must be a string or a list of token ids, got {shown(prompt)}", "prompt")
    echo = _bool(body, "echo", False)
    if body.get("suffix") is not None:
        raise RequestError("suffix is not supported: this model has no infill (fill-in-the-middle) template; "
                           "leave suffix out", "suffix")
    logprobs = _int(body, "logprobs", None, BOUNDS["logprobs"])
    echo_only = echo and _int(body, "max_tokens") == 0  # score the prompt, generate nothing
    sampling["max_tokens"] = 1 if echo_only else _max_tokens(body, "max_tokens", 16, served, _ZERO_WITH_ECHO)
    sampling["logprobs"] = logprobs
    if echo and logprobs is not None:  # the echoed prompt's tokens come with their logprobs too
        sampling["prompt_logprobs"] = logprobs
    n, best_of = _choices(body, stream)
    return ParsedRequest(chat=False, prompt=prompt, sampling=sampling, stream=stream,
                         include_usage=include_usage, logprobs=logprobs, grammar_field=grammar_field, echo=echo,
                         echo_only=echo_only, n=n, best_of=best_of)


_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def _message_text(content, i: int) -> str:
    where = f"messages[{i}].content"
    if content is None or isinstance(content, str):
        return _text(content or "", "messages", where)
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RequestError(f"{where}: only text parts are supported, got {shown(kind)}", "messages")
        return _text("".join(parts), "messages", where)
    raise RequestError(f"{where} must be a string or a list of text parts", "messages")


def parse_chat_request(body: dict, served: Served = Served()) -> ParsedRequest:
    """POST /v1/chat/completions."""
    sampling, stream, include_usage, grammar_field = _common(body, served)
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string \"role\"", "messages")
        if m["role"] not in _ROLES:
            raise RequestError(f"messages[{i}].role {shown(m['role'])} is not one of {', '.join(_ROLES)}",
                               "messages")
        msg = {"role": m["role"], "content": _message_text(m.get("content"), i)}
        if isinstance(m.get("name"), str):
            msg["name"] = _text(m["name"], "messages", f"messages[{i}].name")
        try:
            msg.update(tool_calls.history_fields(m, i))
        except tool_calls.ToolError as err:
            raise RequestError(str(err), err.param) from None
        messages.append(msg)
    tools, grammar_field = _tools(body, sampling, grammar_field)
    want = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", None, BOUNDS["logprobs"])
    if top and not want:
        raise RequestError("top_logprobs needs logprobs=true", "top_logprobs")
    logprobs = (top or 0) if want else None
    n, best_of = _choices(body, stream)
    max_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    sampling["max_tokens"] = _max_tokens(body, max_field, None, served)  # None: up to the end of the context
    sampling["logprobs"] = logprobs
    return ParsedRequest(chat=True, prompt=messages, sampling=sampling, stream=stream,
                         include_usage=include_usage, logprobs=logprobs, prompt_field="messages",
                         max_tokens_field=max_field, grammar_field=grammar_field, tools=tools, n=n,
                         best_of=best_of, field_names={"max_tokens": max_field, "logprobs": "top_logprobs"})


def tokenize(req: ParsedRequest, tokenizer, special_tokens_in_content: bool = False) -> list[int]:
    """Prompt token ids for a parsed request (chat goes through the tokenizer's chat template; the
    messages' text stays text unless special_tokens_in_content)."""
    try:
        if req.chat:
            tools = tool_calls.check_for_template(tokenizer, req.tools, req.prompt, special_tokens_in_content)
            extra = {} if tools is None else {"tools": tools}
            if special_tokens_in_content:
                return list(tokenizer.encode_chat(req.prompt, special_tokens_in_content=True, **extra))
            return list(tokenizer.encode_chat(req.prompt, **extra))
        if isinstance(req.prompt, str):
            return list(tokenizer.encode(req.prompt))
        return list(req.prompt)
    except tool_calls.ToolError as err:
        raise RequestError(str(err), err.param) from None
    except UserError as err:
        raise RequestError(str(err), req.prompt_field) from None


def check_prompt_size(req: ParsedRequest, tokenizer, max_seq_len: int) -> None:
    """Refuse, before tokenizing it, prompt text too long for max_seq_len tokens whatever its tokens
    (more characters than max_seq_len tokens can stand for): such text would hold up every request
    queued for the tokenizer while it is read to the end."""
    per = getattr(tokenizer, "max_token_chars", None)
    if per is None or not (req.chat or isinstance(req.prompt, str)):
        return
    chars = sum(len(m["content"]) for m in req.prompt) if req.chat else len(req.prompt)
    if chars > max_seq_len * per:
        what = "the messages' content" if req.chat else "the prompt"
        raise RequestError(f"{what} is too long: {chars} characters need more tokens than the engine's max_seq_len "
                           f"{max_seq_len} (a token stands for at most {per} characters here); shorten it",
                           req.prompt_field)


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
        if param is None and kwargs.get("structured") is not None and ("structured" in str(err)
                                                                      or "grammar" in str(err)):
            param = req.grammar_field
        raise RequestError(f"{err}{_call_hint(req, param)}", param) from None


def _call_hint(req: ParsedRequest, param: str | None) -> str:
    """What to do when the grammar of a call to any of the tools cannot be used."""
    return "; name one function in tool_choice, or send fewer tools" if param == "tools" and req.tools else ""


def engine_refusal(req: ParsedRequest, err: UserError) -> RequestError:
    """A UserError that ended a request in the engine, as a 400: a grammar that failed on the way
    names the grammar's field (code grammar_failed); anything else the prompt's."""
    if isinstance(err, GrammarFailed):
        return RequestError(str(err), req.grammar_field, code=GrammarFailed.code)
    return RequestError(str(err), req.prompt_field)


def check_with_engine(engine, req: ParsedRequest, prompt_ids: list[int], params: SamplingParams) -> None:
    """engine.check, with its UserError turned into a 400 on the prompt or max_tokens field."""
    try:
        engine.check(prompt_ids, params)
    except UserError as err:
        fits = len(prompt_ids) < engine.max_seq_len
        too_long = len(prompt_ids) + params.max_tokens > engine.max_seq_len
        param = req.max_tokens_field if (fits and too_long and req.sampling.get("max_tokens") is not None) \
            else req.prompt_field
        if str(err).startswith("logit_bias"):
            param = "logit_bias"
        raise RequestError(str(err), param) from None


def compile_grammar(compiler, req: ParsedRequest, params: SamplingParams) -> None:
    """Compile the request's grammar with a (caching) GrammarCompiler, so a grammar that cannot be
    used is a 400 naming its field before the request is admitted; so are the tools' parameters
    schemas, whatever tool_choice is. Blocks: run it off the event loop."""
    if req.tools is not None:
        try:
            req.tools.check_schemas(compiler)
        except tool_calls.ToolError as err:
            raise RequestError(str(err), err.param) from None
    if params.structured is None:
        return
    try:
        compiler.compile(params.structured)
    except UserError as err:
        raise RequestError(f"{err}{_call_hint(req, req.grammar_field)}", req.grammar_field) from None


# ---- JSON Schema of the request bodies (for /openapi.json), from the bounds the parsers check ------

def _bound_schema(bound: Bound, description: str | None = None) -> dict:
    s: dict = {"type": [bound.kind, "null"]}
    if bound.zero_or:
        s = {"anyOf": [{"type": bound.kind, "enum": [0]},
                       {"type": bound.kind, "minimum": bound.lo, "maximum": bound.hi}, {"type": "null"}]}
    else:
        s["exclusiveMinimum" if bound.lo_open else "minimum"] = bound.lo
        s["maximum"] = bound.hi
    if description:
        s["description"] = description
    return s


def _stop_schema() -> dict:
    one = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
    return {"anyOf": [one, {"type": "array", "items": one, "maxItems": MAX_STOP_STRINGS}, {"type": "null"}]}


def request_schema(chat: bool, served: Served) -> dict:
    """The JSON Schema of a /v1/chat/completions (chat) or /v1/completions body: what the parsers
    above take (unknown fields are ignored, so any others are allowed)."""
    props: dict = {
        "model": {"type": ["string", "null"], "description": "the served model's name",
                  **({"enum": [served.model_name, None]} if served.model_name is not None else {})},
        "temperature": _bound_schema(HTTP_BOUNDS["temperature"], "0 is greedy"),
        "top_p": _bound_schema(HTTP_BOUNDS["top_p"]),
        "top_k": _bound_schema(HTTP_BOUNDS["top_k"], "-1 or 0: off"),
        "min_p": _bound_schema(HTTP_BOUNDS["min_p"]),
        "seed": _bound_schema(HTTP_BOUNDS["seed"]),
        "presence_penalty": _bound_schema(HTTP_BOUNDS["presence_penalty"]),
        "frequency_penalty": _bound_schema(HTTP_BOUNDS["frequency_penalty"]),
        "repetition_penalty": _bound_schema(HTTP_BOUNDS["repetition_penalty"], "1 is off"),
        "stop": _stop_schema(),
        "stop_token_ids": {"type": ["array", "null"], "maxItems": MAX_STOP_TOKEN_IDS,
                           "items": {"type": "integer", "minimum": 0, "maximum": MAX_TOKEN_ID}},
        "ignore_eos": {"type": ["boolean", "null"]},
        "stream": {"type": ["boolean", "null"]},
        "stream_options": {"type": ["object", "null"], "description": "only with stream=true",
                           "properties": {"include_usage": {"type": ["boolean", "null"]}}},
        "functions": {"type": "null", "description": "deprecated, not supported: use tools"},
        "function_call": {"type": "null", "description": "deprecated, not supported: use tool_choice"},
        "n": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_CHOICES, "description": "choices returned"},
        "best_of": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_CHOICES,
                    "description": "sequences run, at least n; the n most likely are returned (not streamed)"},
        "logit_bias": {"type": ["object", "null"], "maxProperties": MAX_LOGIT_BIAS,
                       "propertyNames": {"pattern": "^[0-9]{1,10}$"},
                       "additionalProperties": {"type": "number", "minimum": -1e6, "maximum": 1e6},
                       "description": f"token id -> bias, clamped to [-{LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}]; "
                                      "ids must be in the model's vocabulary"},
        "response_format": {"type": ["object", "null"], "required": ["type"], "properties": {
            "type": {"enum": ["text", "json_object", "json_schema"]},
            "json_schema": {"type": "object", "properties": {"name": {"type": "string"},
                                                             "schema": {"type": "object"},
                                                             "strict": {"type": ["boolean", "null"]}}}}},
        "guided_json": {"type": ["object", "null"], "description": "a JSON Schema the output must follow"},
        "guided_regex": {"type": ["string", "null"], "minLength": 1,
                         "description": "a regular expression the output must match"},
        "guided_choice": {"type": ["array", "null"], "minItems": 1, "items": {"type": "string", "minLength": 1},
                          "description": "the output is one of these strings"},
        "tools": {"type": ["array", "null"], "maxItems": 0, "description": "only for /v1/chat/completions"},
        "max_tokens": _bound_schema(served.max_tokens_bound()),
    }
    required: list[str] = []
    if chat:
        text_part = {"type": "object", "required": ["type", "text"],
                     "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}}}
        message = {"type": "object", "required": ["role"], "properties": {
            "role": {"enum": list(_ROLES)},
            "content": {"anyOf": [{"type": "string"}, {"type": "null"},
                                  {"type": "array", "items": {"anyOf": [{"type": "string"}, text_part]}}]},
            "name": {"type": "string"},
            **tool_calls.history_schema()}}
        props.update({
            "messages": {"type": "array", "minItems": 1, "items": message},
            **tool_calls.request_schema(),
            "max_completion_tokens": _bound_schema(served.max_tokens_bound()),
            "logprobs": {"type": ["boolean", "null"]},
            "top_logprobs": _bound_schema(BOUNDS["logprobs"], "needs logprobs=true"),
        })
        required.append("messages")
    else:
        ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": MAX_TOKEN_ID}}
        props.update({
            "prompt": {"anyOf": [{"type": "string", "minLength": 1}, ids,
                                 {"type": "array", "minItems": 1, "maxItems": 1,
                                  "items": {"type": "string", "minLength": 1}},
                                 {"type": "array", "minItems": 1, "maxItems": 1, "items": ids}]},
            "logprobs": _bound_schema(BOUNDS["logprobs"]),
            "max_tokens": _bound_schema(served.max_tokens_bound(), "also 0 with echo=true: the prompt alone"),
            "echo": {"type": ["boolean", "null"], "description": "the prompt's text before the output (with "
                                                                 "logprobs: its tokens' logprobs first too)"},
            "suffix": {"type": "null", "description": "not supported: the model has no infill template"},
        })
        required.append("prompt")
    return {"type": "object", "required": required, "properties": props}


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
    """One token with its log-probability and the top alternatives (already as text). An echoed
    prompt's first token has logprob None (nothing comes before it)."""
    token: str
    bytes: list[int]
    logprob: float | None
    top: list[tuple[str, list[int], float]] | None
    text_offset: int


def completion_logprobs(entries: list[TokenLogprob]) -> dict:
    """Legacy completions format: parallel lists (null for an echoed prompt's first token)."""
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [None if e.logprob is None else _finite(e.logprob) for e in entries],
        "top_logprobs": [None if e.logprob is None else {t: _finite(lp) for t, _, lp in (e.top or [])}
                         for e in entries],
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
