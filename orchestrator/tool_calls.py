"""OpenAI tool calls on /v1/chat/completions, for models whose chat template takes `tools` (Llama
3.1's JSON format: the model calls a function by answering with one JSON object,
`{"name": NAME, "parameters": {...}}`; several calls, when `parallel_tool_calls` allows them, are
such objects with "; " between them, as vLLM's and SGLang's Llama 3 JSON parsers read them).

Here: reading and checking `tools`, `tool_choice`, `parallel_tool_calls` and the tool fields of the
message history (every mistake is a ToolError naming its field); the grammar that enforces the
calls (tool_choice "required" or one named function): a JSON Schema of one call, or a sequence of
such calls, for the existing grammar engine; reading the calls back out of an answer; the answer's
message and stream deltas in OpenAI's shape; and the JSON Schema of the tool fields for
/openapi.json. Nothing here talks to the engine or the network.
"""
from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass

from meshserve.errors import UserError
from meshserve.orchestrator.sampling_params import has_lone_surrogate, shown

MAX_TOOLS = 128         # functions in one request
MAX_TOOL_CALLS = 128    # calls in one assistant message of the history, and in one answer
SEPARATOR = "; "        # between two calls of an answer (the grammar writes it; reading takes ";"
                        # with any whitespace around it)
MAX_DEPTH = 64          # nesting of a parameters schema or of a call's arguments
NAME_PATTERN = "^[a-zA-Z0-9_-]{1,64}$"
CHOICES = ("none", "auto", "required")
_NAME = re.compile(NAME_PATTERN)
_DATA_KEYWORDS = ("const", "enum", "default", "examples")  # values here are data, never schemas
_CHOICE_FORMS = '"none", "auto", "required" or {"type": "function", "function": {"name": ...}}'


class ToolError(UserError):
    """A request whose tool fields cannot be used; `param` is the request field to name."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


# ---- the request's tools ------------------------------------------------------------------------

@dataclass(frozen=True)
class Tools:
    """A request's validated tools and what it asks of them."""
    specs: list           # what the chat template gets: [{"type": "function", "function": {...}}, ...]
    params: dict          # function name -> its parameters schema, in the request's order
    choice: str           # "none", "auto", "required" or "function" (the one in `allowed`)
    allowed: tuple        # the functions a call may name
    parallel: bool = True  # whether an answer may make several calls (else at most one)

    @property
    def parses(self) -> bool:
        """Whether an answer may become a tool call ("none": never)."""
        return self.choice != "none"

    @property
    def enforced(self) -> bool:
        """Whether the answer is constrained to a call (required, or a named function)."""
        return self.choice in ("required", "function")

    @property
    def field(self) -> str:
        """The request field that set the call's grammar (for errors)."""
        return "tool_choice" if self.choice == "function" else "tools"

    def grammar(self) -> dict | None:
        """SamplingParams.structured of enforced calls: one call, or (parallel) 1 to MAX_TOOL_CALLS
        of them with SEPARATOR between; None when the answer is free."""
        if not self.enforced:
            return None
        one = call_schema({name: self.params[name] for name in self.allowed})
        if not self.parallel:
            return {"json_schema": one}
        return {"json_sequence": {"schema": one, "separator": SEPARATOR, "max_items": MAX_TOOL_CALLS}}

    def check_schemas(self, compiler) -> None:
        """Compile each function's call grammar with a (caching) GrammarCompiler, so a parameters
        schema the grammar engine cannot use is a ToolError naming it, whatever tool_choice is. All
        of them within the compiler's deadline (each one alone is bounded by it too)."""
        start = time.monotonic()
        for i, (name, params) in enumerate(self.params.items()):
            if time.monotonic() - start > compiler.timeout_s:
                raise ToolError(f"the tools' parameters schemas did not compile within {compiler.timeout_s:g} s "
                                f"(stopped at tools[{i}]); send fewer or simpler ones", "tools")
            try:
                compiler.compile({"json_schema": call_schema({name: params})})
            except UserError as err:
                raise ToolError(f"tools[{i}].function.parameters (function {name!r}) cannot be used: {err}; "
                                "change or simplify that schema", "tools") from None

    def calls_in(self, text: str) -> list[dict] | None:
        """The tool calls an answer makes, in OpenAI's shape and in order, or None when it is not
        calls: the answer must be JSON objects {"name": an allowed function, "parameters": {...}}
        ("arguments" is taken for "parameters" too), one of them, or (parallel) up to
        MAX_TOOL_CALLS with ";" between two (whitespace around each is allowed). Anything else
        anywhere (a trailing ";", text, an object that is not a call) makes it no call at all."""
        if not self.parses:
            return None
        objs = _objects(text, MAX_TOOL_CALLS if self.parallel else 1)
        if objs is None:
            return None
        calls = []
        for obj in objs:
            if not (isinstance(obj, dict) and len(obj) == 2 and obj.get("name") in self.allowed):
                return None
            args = obj.get("parameters", obj.get("arguments"))
            if not isinstance(args, dict):
                return None
            try:
                arguments = json.dumps(args, ensure_ascii=False)
            except RecursionError:
                return None
            calls.append({"id": "call_" + secrets.token_hex(12), "type": "function",
                          "function": {"name": obj["name"], "arguments": arguments}})
        return calls


_DECODER = json.JSONDecoder()
_BLANKS = " \t\n\r"  # JSON's whitespace


def _objects(text: str, most: int) -> list | None:
    """The JSON values of `text` when it is 1 to `most` of them with ";" between two (and JSON
    whitespace around any of them); None otherwise."""
    out, at, end = [], 0, len(text)
    while True:
        while at < end and text[at] in _BLANKS:
            at += 1
        try:
            value, at = _DECODER.raw_decode(text, at)
        except (ValueError, RecursionError):
            return None
        out.append(value)
        while at < end and text[at] in _BLANKS:
            at += 1
        if at == end:
            return out
        if text[at] != ";" or len(out) >= most:
            return None
        at += 1


def parse(tools, tool_choice, parallel_tool_calls=None) -> Tools | None:
    """Check a chat request's `tools`, `tool_choice` and `parallel_tool_calls` (null: true, OpenAI's
    default); None when it gives no tools."""
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise ToolError(f"parallel_tool_calls must be true, false or null, got {shown(parallel_tool_calls)}",
                        "parallel_tool_calls")
    if tools is None or tools == []:
        if tool_choice is None or tool_choice == "none":
            return None
        raise ToolError(f"tool_choice {shown(tool_choice)} needs tools: give the functions in tools, or "
                        "leave tool_choice out", "tool_choice")
    if not isinstance(tools, list):
        raise ToolError(f"tools must be a list of {{\"type\": \"function\", \"function\": {{...}}}} objects, got "
                        f"{shown(tools)}", "tools")
    if len(tools) > MAX_TOOLS:
        raise ToolError(f"tools has {len(tools)} functions: at most {MAX_TOOLS} are allowed", "tools")
    specs, params = [], {}
    for i, tool in enumerate(tools):
        spec, schema = _tool(tool, i)
        name = spec["function"]["name"]
        if name in params:
            raise ToolError(f"tools[{i}].function.name {name!r} is given twice: function names must be unique",
                            "tools")
        specs.append(spec)
        params[name] = schema
    choice, allowed = _choice(tool_choice, params)
    return Tools(specs, params, choice, allowed, parallel_tool_calls is not False)


def _tool(tool, i: int) -> tuple[dict, dict]:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise ToolError(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\": ..., \"parameters\": "
                        f"{{...}}}}}}, got {shown(tool)}", "tools")
    fn = tool["function"]
    name = fn.get("name")
    if name is None:
        raise ToolError(f"{where}.function.name is missing: every function needs a name", "tools")
    if not (isinstance(name, str) and _NAME.match(name)):
        raise ToolError(f"{where}.function.name {shown(name)} is not allowed: use 1 to 64 letters, digits, "
                        "underscores or dashes", "tools")
    out = {"name": name}
    description = fn.get("description")
    if description is not None:
        if not isinstance(description, str):
            raise ToolError(f"{where}.function.description must be a string, got {shown(description)}", "tools")
        out["description"] = _checked(description, f"{where}.function.description", "tools")
    schema = fn.get("parameters")
    if schema is None:  # a function without arguments
        schema = {"type": "object", "properties": {}}
    if not isinstance(schema, dict):
        raise ToolError(f"{where}.function.parameters must be a JSON Schema object, got {shown(schema)}", "tools")
    if "type" in schema and schema["type"] != "object":
        raise ToolError(f"{where}.function.parameters must describe an object (the call's arguments), but its "
                        f"type is {shown(schema['type'])}; use \"type\": \"object\"", "tools")
    out["parameters"] = _checked(schema, f"{where}.function.parameters", "tools")
    return {"type": "function", "function": out}, schema


def _choice(tool_choice, params: dict) -> tuple[str, tuple]:
    names = tuple(params)
    if tool_choice is None:
        return "auto", names
    if isinstance(tool_choice, str):
        if tool_choice not in CHOICES:
            raise ToolError(f"tool_choice {shown(tool_choice)} is not allowed: use {_CHOICE_FORMS}", "tool_choice")
        return tool_choice, names
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not (isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and isinstance(fn, dict)
            and isinstance(fn.get("name"), str)):
        raise ToolError(f"tool_choice {shown(tool_choice)} is not allowed: use {_CHOICE_FORMS}", "tool_choice")
    if fn["name"] not in params:
        raise ToolError(f"tool_choice names the function {shown(fn['name'])}, which is not in tools (they are "
                        f"{', '.join(names[:8])}{', ...' if len(names) > 8 else ''}); name one of them",
                        "tool_choice")
    return "function", (fn["name"],)


def _checked(value, where: str, param: str, depth: int = 0):
    """`value` (client JSON), refused when it nests deeper than MAX_DEPTH or holds a lone surrogate."""
    if depth > MAX_DEPTH:
        raise ToolError(f"{where} is nested too deeply: at most {MAX_DEPTH} levels are allowed", param)
    if isinstance(value, str):
        if has_lone_surrogate(value):
            raise ToolError(f"{where} holds a lone surrogate, which is not valid Unicode; send UTF-8 text", param)
    elif isinstance(value, dict):
        for k, v in value.items():
            _checked(k, where, param, depth + 1)
            _checked(v, where, param, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _checked(v, where, param, depth + 1)
    return value


# ---- the history: assistant calls and tool answers ----------------------------------------------

def history_fields(message: dict, i: int) -> dict:
    """The tool fields of messages[i] as the chat template gets them: a tool answer's `tool_call_id`,
    an assistant's `tool_calls` (arguments as an object, as Hugging Face templates expect)."""
    where = f"messages[{i}]"
    if message.get("role") == "tool" and message.get("tool_call_id") is not None:
        call_id = message["tool_call_id"]
        if not isinstance(call_id, str):
            raise ToolError(f"{where}.tool_call_id must be a string, got {shown(call_id)}", "messages")
        return {"tool_call_id": _checked(call_id, f"{where}.tool_call_id", "messages")}
    calls = message.get("tool_calls")
    if message.get("role") != "assistant" or calls is None:
        return {}
    if not isinstance(calls, list) or len(calls) > MAX_TOOL_CALLS:
        raise ToolError(f"{where}.tool_calls must be a list of at most {MAX_TOOL_CALLS} calls, got {shown(calls)}",
                        "messages")
    return {"tool_calls": [_history_call(call, f"{where}.tool_calls[{k}]") for k, call in enumerate(calls)]}


def _history_call(call, where: str) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not (isinstance(fn, dict) and call.get("type", "function") == "function"
            and isinstance(fn.get("name"), str) and isinstance(fn.get("arguments"), (str, dict))):
        raise ToolError(f"{where} must be {{\"id\": ..., \"type\": \"function\", \"function\": {{\"name\": ..., "
                        f"\"arguments\": \"{{...}}\"}}}}, got {shown(call)}", "messages")
    args = fn["arguments"]
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            args = None
        if not isinstance(args, dict):
            raise ToolError(f"{where}.function.arguments must be a JSON object as text, got "
                            f"{shown(fn['arguments'])}", "messages")
    out = {"type": "function", "function": {"name": _checked(fn["name"], f"{where}.function.name", "messages"),
                                            "arguments": _checked(args, f"{where}.function.arguments",
                                                                  "messages")}}
    if call.get("id") is not None:
        if not isinstance(call["id"], str):
            raise ToolError(f"{where}.id must be a string, got {shown(call['id'])}", "messages")
        out["id"] = _checked(call["id"], f"{where}.id", "messages")
    return out


def check_for_template(tokenizer, tools: Tools | None, messages: list[dict],
                       special_tokens_in_content: bool) -> list | None:
    """The `tools` argument of the tokenizer's chat template. Refused when the template takes no tools,
    and (unless special_tokens_in_content) when a tool definition or a history call spells one of the
    tokenizer's special tokens: the template writes them as they are, so they would become control
    tokens (message content and tool_call_id stay plain text by the tokenizer's own framing)."""
    if tools is not None and not getattr(tokenizer, "takes_tools", False):
        raise ToolError("tools cannot be used with this model: its chat template takes no tools, so the model "
                        "is never shown the functions; leave tools out", "tools")
    if not special_tokens_in_content:
        texts = getattr(tokenizer, "special_texts", ())
        if tools is not None and _spells(tools.specs, texts):
            raise ToolError(f"tools hold the text of a special token (one of {', '.join(texts[:5])}...), which "
                            "the chat template would turn into a control token; remove it", "tools")
        for i, m in enumerate(messages):
            if _spells(m.get("tool_calls"), texts):
                raise ToolError(f"messages[{i}].tool_calls hold the text of a special token (one of "
                                f"{', '.join(texts[:5])}...); remove it", "messages")
    return None if tools is None else tools.specs


def _spells(value, texts) -> bool:
    if isinstance(value, str):
        return any(t in value for t in texts)
    if isinstance(value, dict):
        return any(_spells(k, texts) or _spells(v, texts) for k, v in value.items())
    if isinstance(value, list):
        return any(_spells(v, texts) for v in value)
    return False


# ---- the call's grammar --------------------------------------------------------------------------

def call_schema(functions: dict) -> dict:
    """The JSON Schema of one call to any of `functions` (name -> parameters schema): an object
    {"name": NAME, "parameters": ARGS} whose ARGS follow NAME's schema. Each schema moves inside the
    call's, so its local references ("#/$defs/...", "#/properties/...") are rewritten to point there."""
    branches = []
    for k, (name, params) in enumerate(functions.items()):
        at = "#/properties/parameters" if len(functions) == 1 else f"#/anyOf/{k}/properties/parameters"
        params = {key: v for key, v in params.items() if key not in ("$schema", "$id")}
        params.setdefault("type", "object")
        branches.append({"type": "object", "properties": {"name": {"const": name},
                                                          "parameters": _moved(params, at)},
                         "required": ["name", "parameters"], "additionalProperties": False})
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


def _moved(schema, at: str):
    if isinstance(schema, list):
        return [_moved(v, at) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, v in schema.items():
        if key == "$ref" and isinstance(v, str) and v.startswith("#"):
            out[key] = at + v[1:]
        elif key in _DATA_KEYWORDS:
            out[key] = v
        else:
            out[key] = _moved(v, at)
    return out


# ---- JSON Schema of the tool fields (for /openapi.json), from the bounds the parsers check ------

def request_schema() -> dict:
    """The JSON Schema of the tool fields of a chat request body (for /openapi.json)."""
    name = {"type": "string", "pattern": NAME_PATTERN}
    function = {"type": "object", "required": ["name"], "properties": {
        "name": name, "description": {"type": ["string", "null"]},
        "parameters": {"type": ["object", "null"], "description": "a JSON Schema of an object: the call's arguments "
                                                                  "(null: none)"},
        "strict": {"type": ["boolean", "null"]}}}
    tool = {"type": "object", "required": ["type", "function"],
            "properties": {"type": {"enum": ["function"]}, "function": function}}
    named = {"type": "object", "required": ["type", "function"], "properties": {
        "type": {"enum": ["function"]}, "function": {"type": "object", "required": ["name"],
                                                     "properties": {"name": name}}}}
    return {
        "tools": {"type": ["array", "null"], "maxItems": MAX_TOOLS, "items": tool,
                  "description": "functions the model may call, with unique names (only when the model's chat "
                                 "template takes tools)"},
        "tool_choice": {"anyOf": [{"enum": list(CHOICES)}, named, {"type": "null"}],
                        "description": "needs tools (but \"none\"); a named function must be one of them"},
        "parallel_tool_calls": {"type": ["boolean", "null"], "description": "whether an answer may make several "
                                                                            "calls (true or null, the default) or "
                                                                            "at most one (false)"},
    }


def history_schema() -> dict:
    """The JSON Schema of a message's tool fields."""
    call = {"type": "object", "required": ["function"], "properties": {
        "id": {"type": "string"}, "type": {"enum": ["function"]},
        "function": {"type": "object", "required": ["name", "arguments"],
                     "properties": {"name": {"type": "string"},
                                    "arguments": {"type": "string", "description": "a JSON object as text"}}}}}
    return {"tool_calls": {"type": ["array", "null"], "maxItems": MAX_TOOL_CALLS, "items": call,
                           "description": "an assistant's calls"},
            "tool_call_id": {"type": ["string", "null"], "description": "a tool's answer: the call it answers"}}


# ---- the answer ----------------------------------------------------------------------------------

def apply(choice: dict, tools: Tools | None) -> None:
    """Turn a chat response's choice whose answer is calls into OpenAI's tool-call message, in
    place: content null, the calls in tool_calls, finish_reason "tool_calls". An answer that is not
    calls (a free answer under "auto"), or that did not end by itself (cut short by max_tokens, even
    where the calls so far are complete JSON: more could have followed), stays content with its own
    finish_reason."""
    if tools is None or choice.get("finish_reason") != "stop":
        return
    calls = tools.calls_in(choice["message"]["content"] or "")
    if calls is not None:
        choice["message"] = {"role": "assistant", "content": None, "tool_calls": calls}
        choice["finish_reason"] = "tool_calls"


class CallStream:
    """One streamed choice's deltas when its answer may be calls. Text that may be calls is held:
    all of it when calls are enforced, and under "auto" from a first non-blank "{" on (text that
    starts otherwise streams as content at once). At the end the held text goes out: as one delta
    per call, in order, each {"tool_calls": [{"index": i, "id", "type", "function": {"name",
    "arguments"}}]} (the first one with the held log probabilities, the last one with
    finish_reason "tool_calls"), or as one content delta when it is not calls. Log probabilities
    travel with the text they belong to."""

    def __init__(self, tools: Tools):
        self.tools = tools
        self._mode = "hold" if tools.enforced else "wait"  # wait: nothing but blanks seen yet
        self._held: list[str] = []
        self._entries: list = []

    def step(self, text: str, finish: str | None, entries: list) -> list[tuple[dict, str | None, list]]:
        """(delta, finish_reason, logprob entries) of the chunks to send for this step."""
        if self._mode == "pass":
            return [({"content": text} if text else {}, finish, entries)]
        self._held.append(text)
        self._entries += entries
        held = "".join(self._held)
        if self._mode == "wait" and held.strip() and not held.lstrip().startswith("{"):
            self._mode = "pass"
            return [self._release({"content": held}, finish)]
        if finish is None:
            return []
        calls = self.tools.calls_in(held) if finish == "stop" else None  # "length": cut short, no call
        if calls is not None:
            last = len(calls) - 1
            return [self._release({"tool_calls": [{"index": i, **call}]}, "tool_calls" if i == last else None)
                    for i, call in enumerate(calls)]
        return [self._release({"content": held} if held else {}, finish)]

    def _release(self, delta: dict, finish: str | None) -> tuple[dict, str | None, list]:
        entries, self._held, self._entries = self._entries, [], []
        return delta, finish, entries
