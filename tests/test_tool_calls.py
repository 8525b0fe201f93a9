"""Tool calls on /v1/chat/completions against a real `meshserve serve` (a random-weight tiny Llama with
the demo model's tokenizer and a small chat template written here for Llama 3.1's JSON tool-call
format), driven by the official openai client: enforced calls (tool_choice "required" or a named
function) for seeded generated parameter schemas must validate, one or several of them as
parallel_tool_calls allows; "auto" and "none"; streaming against non-streaming; a history with calls
and tool answers; and hostile tool fields, each a 400 naming its field. Plus the stream shaping, the
reading of several calls and the calls' grammar, in-process. One server for the module."""
from __future__ import annotations

import asyncio
import json
import random
import re

import httpx
import jsonschema
import openai
import pytest
from fastapi.testclient import TestClient
from openai.lib.streaming.chat import ChatCompletionStreamState

from meshserve.orchestrator import tool_calls
from meshserve.orchestrator.tool_calls import CallStream, Tools, call_schema
from tests.serving import serve_random_llama

# Llama 3.1's JSON tool-call prompt (functions listed in the system turn, a call is the answer
# {"name": ..., "parameters": {...}}, several calls have "; " between them, a tool's answer comes
# back in an "ipython" turn), in the demo tokenizer's ChatML frame.
TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\nGiven the following functions, please respond with a JSON for a "
    "function call with its proper arguments that best answers the given prompt.\\n\\nRespond in the format "
    "{\"name\": function name, \"parameters\": dictionary of argument name and its value}. Do not use "
    "variables.\\n\\n' }}{% for t in tools %}{{ t | tojson }}{{ '\\n\\n' }}{% endfor %}{{ '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'assistant' and message.tool_calls %}{{ '<|im_start|>assistant\\n' }}"
    "{% for call in message.tool_calls %}{% if not loop.first %}{{ '; ' }}{% endif %}"
    "{{ '{\"name\": \"' + call.function.name + '\", \"parameters\": ' }}{{ call.function.arguments | tojson }}"
    "{{ '}' }}{% endfor %}{{ '<|im_end|>\\n' }}"
    "{% elif message.role == 'tool' %}{{ '<|im_start|>ipython\\n' + message.content + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

WORDS = ["red", "green", "blue", "cat", "dog", "yes", "no", "alpha", "beta", "x", "id", "ok"]
MAX_TOKENS = 96
NUM_ENFORCED = 10
CALL_ID = re.compile(r"^call_[0-9a-f]{8,}$")
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"$ref": "#/$defs/city"},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False,
                   "$defs": {"city": {"enum": ["Paris", "Rome", "Oslo"]}}}}}


# ---- seeded tools --------------------------------------------------------------------------------

def _scalar(rng: random.Random) -> dict:
    kind = rng.choice(["enum", "bool", "int", "enum_int", "string"])
    if kind == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(1, 3))}
    if kind == "bool":
        return {"type": "boolean"}
    if kind == "int":
        lo = rng.randint(-20, 20)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 99)}
    if kind == "enum_int":
        return {"type": "integer", "enum": rng.sample(range(100), 2)}
    return {"type": "string", "maxLength": rng.randint(1, 4)}


def _params(rng: random.Random, depth: int = 0) -> dict:
    """An object schema whose every instance is short (so a call completes within MAX_TOKENS)."""
    props = {}
    for name in rng.sample(WORDS, rng.randint(1 if depth else 0, 3 - depth)):
        r = rng.random()
        if depth == 0 and r < 0.2:
            props[name] = _params(rng, depth + 1)
        elif r < 0.4:
            lo = rng.randint(0, 1)
            props[name] = {"type": "array", "items": _scalar(rng), "minItems": lo, "maxItems": lo + rng.randint(0, 2)}
        else:
            props[name] = _scalar(rng)
    return {"type": "object", "properties": props, "required": [n for n in props if rng.random() < 0.7],
            "additionalProperties": False}


def tool_sets() -> list[list[dict]]:
    rng = random.Random(31)
    sets = []
    for i in range(NUM_ENFORCED):
        names = [f"fn_{i}_{k}" for k in range(rng.randint(1, 3))]
        sets.append([{"type": "function", "function": {"name": n, "description": f"does {n}",
                                                        "parameters": _params(rng)}} for n in names])
    return sets


def test_generated_tools_cover_what_they_claim():
    text = json.dumps(tool_sets())
    for word in ('"enum"', '"boolean"', '"minimum"', '"maxItems"', '"maxLength"', '"properties": {}'):
        assert word in text, word
    assert any(json.dumps(t["function"]["parameters"]).count('"properties"') > 1 for s in tool_sets() for t in s)
    assert any(len(s) > 1 for s in tool_sets()) and any(len(s) == 1 for s in tool_sets())


# ---- the server ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    yield from serve_random_llama(tmp_path_factory.mktemp("tools"), 5, "--max-seq-len", 512, "--max-batch-size", 16,
                                  "--max-num-tokens", 512, chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="none", max_retries=0, timeout=120)


def _params_of(tools: list[dict]) -> dict:
    return {t["function"]["name"]: t["function"]["parameters"] for t in tools}


def assert_valid_call(choice, tools: list[dict], allowed: set[str], parallel: bool = False) -> int:
    """A choice that is calls to allowed functions whose arguments follow their schemas: exactly
    one, or (parallel) one or more, each with its own id. Returns how many."""
    where = f"{choice}"
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, where
    calls = choice.message.tool_calls
    assert len(calls) >= 1 if parallel else len(calls) == 1, where
    assert len({call.id for call in calls}) == len(calls), where
    for call in calls:
        assert call.type == "function" and CALL_ID.match(call.id) and call.function.name in allowed, where
        jsonschema.validate(json.loads(call.function.arguments), _params_of(tools)[call.function.name])
    return len(calls)


def _room(served, parallel: bool) -> dict:
    """Request fields that let an answer's calls end: one call fits MAX_TOKENS; several get the rest
    of the context, and a nudge to the end of the answer (logit_bias on the end token, which the
    grammar allows only between calls): the random weights would otherwise often go on calling."""
    return {"logit_bias": {str(served[1].eos_token_id): 2}} if parallel else {"max_tokens": MAX_TOKENS}


def _parallel(i: int) -> bool | None:
    """parallel_tool_calls of seeded request i: left out (true, the default), true or false."""
    return (None, True, False)[i % 3]


def test_enforced_calls_validate(served):
    """tool_choice "required" (any of the tools) and a named function, in turn, for seeded schemas,
    with parallel_tool_calls left out, true or false; one more request with n=2 and the $ref'd
    weather tool."""
    sets = tool_sets()

    async def run():
        aclient = openai.AsyncOpenAI(base_url=served[0].url + "/v1", api_key="none", max_retries=0, timeout=120)

        async def one(i: int, tools: list[dict]):
            choice = "required" if i % 2 == 0 else {"type": "function", "function": {
                "name": tools[-1]["function"]["name"]}}
            parallel = {} if _parallel(i) is None else {"parallel_tool_calls": _parallel(i)}
            return await aclient.chat.completions.create(model="m", messages=USER, tools=tools, tool_choice=choice,
                                                         seed=i, temperature=1.0, **parallel,
                                                         **_room(served, _parallel(i) is not False))

        two = aclient.chat.completions.create(model="m", messages=USER, tools=[WEATHER, *sets[0]], n=2, seed=7,
                                              tool_choice="required", **_room(served, True))
        return await asyncio.gather(two, *(one(i, s) for i, s in enumerate(sets)))

    both, *outs = asyncio.run(run())
    counts = []
    for i, (tools, out) in enumerate(zip(sets, outs)):
        allowed = {t["function"]["name"] for t in tools} if i % 2 == 0 else {tools[-1]["function"]["name"]}
        counts.append(assert_valid_call(out.choices[0], tools, allowed, parallel=_parallel(i) is not False))
    assert max(counts) > 1, counts  # some answer made several calls
    assert [c.index for c in both.choices] == [0, 1]
    for c in both.choices:
        assert_valid_call(c, [WEATHER, *sets[0]], set(_params_of([WEATHER, *sets[0]])), parallel=True)
    # the weather tool's arguments (through its $ref) when it is the named one
    out = asyncio.run(_named_weather(served))
    assert_valid_call(out.choices[0], [WEATHER], {"get_weather"}, parallel=True)
    for call in out.choices[0].message.tool_calls:
        assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome", "Oslo")


async def _named_weather(served):
    aclient = openai.AsyncOpenAI(base_url=served[0].url + "/v1", api_key="none", max_retries=0, timeout=120)
    return await aclient.chat.completions.create(
        model="m", messages=USER, tools=[WEATHER, *tool_sets()[1]], seed=3, **_room(served, True),
        tool_choice={"type": "function", "function": {"name": "get_weather"}})


def _stream(client, **kw):
    """(content, tool-call deltas, finish_reason, chunks) of a streamed chat request."""
    content, deltas, finish, n = "", [], None, 0
    for chunk in client.chat.completions.create(model="m", stream=True, **kw):
        n += 1
        for c in chunk.choices:
            content += c.delta.content or ""
            deltas += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    return content, deltas, finish, n


def _calls(calls) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


@pytest.mark.parametrize("tool_choice,parallel", [
    ("required", False), ({"type": "function", "function": {"name": "get_weather"}}, False),
    ("required", True), ({"type": "function", "function": {"name": "get_weather"}}, True)],
    ids=["required", "named", "required-parallel", "named-parallel"])
def test_streamed_call_is_the_same_call(served, client, tool_choice, parallel):
    """Streamed, the same calls as the whole answer: one delta per call, indexes 0, 1, ... in order,
    each with its own id; the openai client's own stream accumulator reads them back the same. With
    parallel_tool_calls, the first seed from 11 on whose answer makes several calls."""
    for seed in range(11, 31):
        kw = dict(messages=USER, tools=[WEATHER, *tool_sets()[2]], tool_choice=tool_choice, seed=seed,
                  parallel_tool_calls=parallel, **_room(served, parallel))
        whole = client.chat.completions.create(model="m", **kw).choices[0]
        if not parallel or (whole.message.tool_calls and len(whole.message.tool_calls) > 1):
            break
    count = assert_valid_call(whole, kw["tools"], set(_params_of(kw["tools"])), parallel=parallel)
    assert count > 1 if parallel else count == 1, seed
    content, deltas, finish, _ = _stream(client, **kw)
    assert content == "" and finish == "tool_calls" and len(deltas) == count, (content, deltas)
    assert [d.index for d in deltas] == list(range(count)) and len({d.id for d in deltas}) == count, deltas
    assert all(d.type == "function" and CALL_ID.match(d.id) for d in deltas), deltas
    assert _calls(deltas) == _calls(whole.message.tool_calls)
    state = ChatCompletionStreamState()
    for chunk in client.chat.completions.create(model="m", stream=True, **kw):
        state.handle_chunk(chunk)
    final = state.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls" and _calls(final.message.tool_calls) == _calls(whole.message.tool_calls)


# A grammar of the answer (response_format) makes "auto" and "none" testable on random weights: the
# answer is then a call-shaped object, or text that is not.
CALL_SHAPE = {"type": "json_schema", "json_schema": {"name": "call", "schema": call_schema(
    _params_of([WEATHER]))}}
UNKNOWN_FN = {"type": "json_schema", "json_schema": {"name": "call", "schema": call_schema(
    {"not_a_tool": {"type": "object", "properties": {}, "additionalProperties": False}})}}


def test_auto_and_none(client):
    tools = [WEATHER, *tool_sets()[3]]
    common = dict(model="m", messages=USER, tools=tools, max_tokens=MAX_TOKENS, seed=5)
    free = client.chat.completions.create(tool_choice="auto", **common).choices[0]
    if free.message.tool_calls:  # the model is free: an answer that parses as a call is one
        assert_valid_call(free, tools, set(_params_of(tools)))
    else:
        assert isinstance(free.message.content, str) and free.finish_reason in ("stop", "length"), free
    call = client.chat.completions.create(response_format=CALL_SHAPE, **common).choices[0]  # auto by default
    assert_valid_call(call, tools, {"get_weather"})
    text = client.chat.completions.create(tool_choice="none", response_format=CALL_SHAPE, **common).choices[0]
    assert text.message.tool_calls is None and text.finish_reason == "stop", text
    assert json.loads(text.message.content)["name"] == "get_weather"
    unknown = client.chat.completions.create(tool_choice="auto", response_format=UNKNOWN_FN, **common).choices[0]
    assert unknown.message.tool_calls is None and json.loads(unknown.message.content)["name"] == "not_a_tool"
    # streamed: the same, as one tool-call delta or as content
    content, deltas, finish, _ = _stream(client, response_format=CALL_SHAPE, **{
        k: v for k, v in common.items() if k != "model"})
    assert content == "" and finish == "tool_calls" and len(deltas) == 1
    assert json.loads(deltas[0].function.arguments) == json.loads(call.message.tool_calls[0].function.arguments)
    words = {"guided_regex": "(Hello|Hi)( there){1,3}[.]"}
    whole = client.chat.completions.create(tool_choice="auto", extra_body=words, **common).choices[0]
    content, deltas, finish, n = _stream(client, tool_choice="auto", extra_body=words, **{
        k: v for k, v in common.items() if k != "model"})
    assert (content, deltas, finish) == (whole.message.content, [], "stop") and n > 3  # not held back


def test_calls_cut_short_by_max_tokens_are_no_calls(client, served):
    """An answer that max_tokens cuts short ends with finish_reason "length" and comes back as
    content, even when the calls it holds so far are complete JSON (more could have followed): the
    same seeded request, one token short of its whole answer (whose last token is the end token)."""
    kw = dict(messages=USER, tools=[WEATHER], tool_choice="required", seed=4, **_room(served, True))
    whole = client.chat.completions.create(model="m", **kw)
    assert_valid_call(whole.choices[0], [WEATHER], {"get_weather"}, parallel=True)
    kw["max_tokens"] = whole.usage.completion_tokens - 1
    cut = client.chat.completions.create(model="m", **kw).choices[0]
    assert cut.finish_reason == "length" and cut.message.tool_calls is None, cut
    held = _tools("required").calls_in(cut.message.content)  # the calls so far, complete
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in held] == \
        _calls(whole.choices[0].message.tool_calls)
    content, deltas, finish, _ = _stream(client, **kw)
    assert (content, deltas, finish) == (cut.message.content, [], "length")


def test_history_with_calls_and_tool_answers_reaches_the_template(client, served):
    tools = [WEATHER]
    messages = [*USER,
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_abc123", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"C\"}"}}, {
                    "id": "call_def456", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\", \"unit\": \"C\"}"}}]},
                {"role": "tool", "tool_call_id": "call_abc123", "content": "21 degrees, sunny"},
                {"role": "tool", "tool_call_id": "call_def456", "content": "4 degrees, rain"}]
    out = client.chat.completions.create(model="m", messages=messages, tools=tools, max_tokens=4, seed=1)
    assert out.choices[0].finish_reason in ("stop", "length")
    local = [*USER, {"role": "assistant", "content": "", "tool_calls": [{
        "id": "call_abc123", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": {"city": "Paris", "unit": "C"}}}, {
        "id": "call_def456", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": {"city": "Oslo", "unit": "C"}}}]},
             *messages[2:]]
    tok = served[1]
    text = tok.apply_chat_template(local, tools=tools, tokenize=False, add_generation_prompt=True)
    assert ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}; '
            '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "C"}}') in text
    assert "ipython\n21 degrees, sunny" in text and '"$defs"' in text
    assert out.usage.prompt_tokens == len(tok(text, add_special_tokens=False)["input_ids"])


# ---- hostile tool fields ---------------------------------------------------------------------------

def _fn(name="f", **kw) -> dict:
    return {"type": "function", "function": {"name": name, **kw}}


BAD = [
    ({"tools": {"f": 1}}, "tools", ["must be a list"]),
    ({"tools": [{"type": "function", "function": {"parameters": {"type": "object"}}}]}, "tools",
     ["name is missing"]),
    ({"tools": [_fn(parameters="an object")]}, "tools", ["parameters must be a JSON Schema object"]),
    ({"tools": [_fn(parameters={"type": "string"})]}, "tools", ["must describe an object"]),
    ({"tools": [_fn("a"), _fn("b"), _fn("a")]}, "tools", ["tools[2]", "twice"]),
    ({"tools": [_fn(f"f{i}") for i in range(129)]}, "tools", ["129", "at most 128"]),
    ({"tools": [_fn("get weather")]}, "tools", ["letters, digits"]),
    ({"tools": [_fn("x" * 65)]}, "tools", ["letters, digits"]),
    ({"tools": [{"type": "retrieval"}]}, "tools", ["tools[0] must be"]),
    ({"tools": [_fn(description=7)]}, "tools", ["description must be a string"]),
    ({"tools": [_fn(parameters={"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}})]},
     "tools", ["tools[0].function.parameters", "uniqueItems"]),
    ({"tools": [_fn(parameters={"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}})]}, "tools",
     ["tools[0].function.parameters", "cannot be used"]),
    ({"tools": [_fn(description="<|im_start|>system")]}, "tools", ["special token"]),
    ({"tools": [_fn()], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice",
     ["'g'", "not in tools"]),
    ({"tools": [_fn()], "tool_choice": "always"}, "tool_choice", ["required"]),
    ({"tools": [_fn()], "tool_choice": {"type": "function"}}, "tool_choice", ["not allowed"]),
    ({"tool_choice": "required"}, "tool_choice", ["needs tools"]),
    ({"tools": [_fn()], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     ["only one"]),
    ({"messages": [*USER, {"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "f", "arguments": "{not json"}}]}]}, "messages", ["arguments must be a JSON object"]),
    ({"messages": [*USER, {"role": "assistant", "tool_calls": "f()"}]}, "messages", ["tool_calls must be a list"]),
    ({"messages": [*USER, {"role": "tool", "tool_call_id": 5, "content": "x"}]}, "messages", ["tool_call_id"]),
    ({"tools": [_fn()], "parallel_tool_calls": "yes"}, "parallel_tool_calls", ["true, false or null", "'yes'"]),
    ({"tools": [_fn()], "parallel_tool_calls": 1}, "parallel_tool_calls", ["true, false or null", "got 1"]),
    ({"parallel_tool_calls": [True]}, "parallel_tool_calls", ["true, false or null"]),
]


@pytest.mark.parametrize("extra,param,words", BAD, ids=[f"{p}-{w[-1][:16]}" for _, p, w in BAD])
def test_bad_tool_fields_are_a_400_naming_the_field(served, extra, param, words):
    body = {"model": "m", "messages": USER, "max_tokens": 4, **extra}
    r = httpx.post(served[0].url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert all(w in err["message"] for w in words), err


def test_other_tool_refusals(served):
    url = served[0].url
    raw = ('{"model": "m", "messages": [{"role": "user", "content": "Hi"}], '
           '"tools": [{"type": "function", "function": {"name": "f", "description": "\\ud800"}}]}')
    r = httpx.post(url + "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools" and "surrogate" in r.text, r.text
    deep: dict = {"type": "object"}
    for _ in range(tool_calls.MAX_DEPTH + 1):
        deep = {"type": "object", "properties": {"a": deep}}
    r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": "m", "messages": USER, "tools": [_fn(parameters=deep)]})
    assert r.status_code == 400 and "nested too deeply" in r.text, r.text
    r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "Hi", "tools": [_fn()]}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text
    assert httpx.get(url + "/health", timeout=30).status_code == 200


def test_a_template_without_tools_refuses_them(served, tmp_path):
    """The demo model's own template takes no tools: a 400 that says so, before any engine work."""
    from meshserve.orchestrator.api_server import ApiSettings, build_app
    from meshserve.orchestrator.metrics import ServerMetrics
    from meshserve.orchestrator.tokenizer import Tokenizer
    hf = served[1]
    template = hf.chat_template
    try:
        hf.chat_template = None
        hf.save_pretrained(tmp_path)
    finally:
        hf.chat_template = template
    (tmp_path / "chat_template.jinja").write_text(_DEMO_TEMPLATE)

    class NoEngine:
        tokenizer, max_seq_len = Tokenizer(tmp_path), 512

        def check(self, prompt_ids, params):
            raise AssertionError("the request reached the engine")

        def is_alive(self):
            return True

    assert not NoEngine.tokenizer.takes_tools and Tokenizer(served[1].name_or_path).takes_tools
    app = build_app(NoEngine(), "m", ServerMetrics(), ApiSettings())
    with TestClient(app) as http:
        r = http.post("/v1/chat/completions", json={"model": "m", "messages": USER, "tools": [WEATHER]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "tools" and "chat template takes no tools" in err["message"], err


_DEMO_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                  "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                  "{% endif %}")


# ---- in-process: the call grammar and the stream's shaping ------------------------------------------

def test_call_schema_moves_references_and_validates_calls():
    schema = call_schema({"get_weather": WEATHER["function"]["parameters"], "f": {"type": "object"}})
    good = {"name": "get_weather", "parameters": {"city": "Oslo", "unit": "F"}}
    jsonschema.validate(good, schema)
    for bad in ({"name": "get_weather", "parameters": {"city": "Lima", "unit": "F"}},
                {"name": "g", "parameters": {}}, {"name": "f", "parameters": []}, {"name": "f"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def _tools(choice: str) -> Tools:
    return tool_calls.parse([WEATHER], choice)


def _run(stream: CallStream, pieces: list[str], finish: str) -> list:
    out = []
    for k, p in enumerate(pieces):
        out += stream.step(p, finish if k == len(pieces) - 1 else None, [k])
    return out


def test_call_stream_holds_a_call_and_passes_text():
    call = ['{"name":', '"get_weather","parameters":{"city":"Rome",', '"unit":"C"}}']
    out = _run(CallStream(_tools("auto")), ["  ", *call], "stop")
    assert len(out) == 1 and out[0][1] == "tool_calls" and out[0][2] == [0, 1, 2, 3]
    delta = out[0][0]["tool_calls"][0]
    assert delta["index"] == 0 and json.loads(delta["function"]["arguments"]) == {"city": "Rome", "unit": "C"}
    text = _run(CallStream(_tools("auto")), [" ", "Hello", " there"], "stop")
    assert text == [({"content": " Hello"}, None, [0, 1]), ({"content": " there"}, "stop", [2])]
    cut = _run(CallStream(_tools("required")), call[:2], "length")  # cut by max_tokens: content
    assert cut == [({"content": "".join(call[:2])}, "length", [0, 1])]
    unknown = _run(CallStream(_tools("auto")), ['{"name":"nope","parameters":{}}'], "stop")
    assert unknown[0][:2] == ({"content": '{"name":"nope","parameters":{}}'}, "stop")
    assert _tools("none").calls_in("".join(call)) is None and _tools("auto").calls_in("".join(call))


def test_complete_calls_cut_by_length_stay_content():
    call = '{"name":"get_weather","parameters":{"city":"Rome","unit":"C"}}'
    choice = {"message": {"role": "assistant", "content": call}, "finish_reason": "length"}
    tool_calls.apply(choice, _tools("required"))
    assert choice == {"message": {"role": "assistant", "content": call}, "finish_reason": "length"}
    assert _run(CallStream(_tools("auto")), [call[:20], call[20:]], "length") == [({"content": call}, "length", [0, 1])]
    whole = choice | {"finish_reason": "stop"}  # the answer ended there: a call
    tool_calls.apply(whole, _tools("required"))
    assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] is None


SEVERAL = ('{"name":"get_weather","parameters":{"city":"Rome","unit":"C"}}; '
           '{"name":"get_weather","arguments":{"city":"Oslo","unit":"F"}} ;\n {"name":"get_weather","parameters":'
           '{"city":"Paris;{","unit":"C"}}')


def _deltas(out: list) -> list[tuple[str, dict]]:
    calls = [d["tool_calls"][0] for d, _, _ in out]
    assert [c["index"] for c in calls] == list(range(len(calls))), out
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_several_calls_are_read_the_same_in_text_and_in_a_stream():
    """Calls with ";" between them (whitespace around it allowed, "arguments" for "parameters") are
    read in order, each with its own id, the same from the whole text as from a stream cut at every
    place; with parallel_tool_calls false, or with anything else around them, they are content."""
    want = [("get_weather", {"city": "Rome", "unit": "C"}), ("get_weather", {"city": "Oslo", "unit": "F"}),
            ("get_weather", {"city": "Paris;{", "unit": "C"})]
    for choice in ("auto", "required"):
        tools = _tools(choice)
        calls = tools.calls_in(SEVERAL)
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == want
        assert len({c["id"] for c in calls}) == 3 and all(CALL_ID.match(c["id"]) for c in calls)
        message = {"message": {"role": "assistant", "content": SEVERAL}, "finish_reason": "stop"}
        tool_calls.apply(message, tools)
        assert message["finish_reason"] == "tool_calls" and message["message"]["content"] is None
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                for c in message["message"]["tool_calls"]] == want
        for cut in range(1, len(SEVERAL)):
            out = _run(CallStream(tools), [SEVERAL[:cut], SEVERAL[cut:]], "stop")
            assert _deltas(out) == want, cut
            assert [f for _, f, _ in out] == [None, None, "tool_calls"] and [e for *_, e in out] == [[0, 1], [], []]
        pieces = [SEVERAL[k:k + 3] for k in range(0, len(SEVERAL), 3)]
        assert _deltas(_run(CallStream(tools), pieces, "stop")) == want
    one = tool_calls.parse([WEATHER], "auto", False)
    assert one.calls_in(SEVERAL) is None and len(one.calls_in(SEVERAL.split("; ")[0])) == 1
    assert _run(CallStream(one), [SEVERAL], "stop") == [({"content": SEVERAL}, "stop", [0])]
    for bad in (SEVERAL + ";", SEVERAL + "; ok", "; " + SEVERAL, SEVERAL.replace("; ", " "),
                SEVERAL.replace("; ", ";;"), SEVERAL.replace("; ", "; [1]; "), SEVERAL.replace("; ", ", ")):
        assert _tools("auto").calls_in(bad) is None, bad
        assert _run(CallStream(_tools("auto")), [bad], "stop")[0][:2] == ({"content": bad}, "stop")
    most = "; ".join(['{"name":"get_weather","parameters":{}}'] * tool_calls.MAX_TOOL_CALLS)
    assert len(_tools("auto").calls_in(most)) == tool_calls.MAX_TOOL_CALLS
    assert _tools("auto").calls_in(most + "; " + most[:38]) is None  # one more than an answer may make
    with pytest.raises(tool_calls.ToolError, match="parallel_tool_calls must be true, false or null"):
        tool_calls.parse([WEATHER], "auto", "false")
    assert tool_calls.parse([WEATHER], "auto", None).parallel and tool_calls.parse([WEATHER], "auto", True).parallel


def test_the_calls_grammar(served):
    """parallel_tool_calls false: the grammar of one call, as before; true: 1 to MAX_TOOL_CALLS calls
    with "; " between, compact, each to an allowed function with valid arguments."""
    from meshserve.orchestrator.grammar import GrammarCompiler
    hf = served[1]
    compiler = GrammarCompiler(hf, len(hf))
    one = tool_calls.parse([WEATHER, _fn("f")], "required", False).grammar()
    assert one == {"json_schema": call_schema({**_params_of([WEATHER]), "f": {"type": "object", "properties": {}}})}
    rome = '{"name":"get_weather","parameters":{"city":"Rome","unit":"C"}}'

    def takes(spec: dict, text: str) -> bool:
        m = compiler.matcher(spec)
        return all(m.consume(t) for t in hf.encode(text, add_special_tokens=False)) and m._m.is_accepting()

    several = tool_calls.parse([WEATHER, _fn("f")], "required", True).grammar()
    named = tool_calls.parse([WEATHER, _fn("f")], {"type": "function", "function": {"name": "f"}}).grammar()
    assert takes(one, rome) and not takes(one, rome + "; " + rome)
    assert takes(several, rome) and takes(several, f'{rome}; {{"name":"f","parameters":{{}}}}; {rome}')
    for bad in (rome + ";" + rome, rome + " ; " + rome, rome.replace(",", ", "), rome.replace("Rome", "Lima"),
                rome + "; "):
        assert not takes(several, bad), bad
    assert takes(named, '{"name":"f","parameters":{}}; {"name":"f","parameters":{}}')
    assert not takes(named, '{"name":"f","parameters":{}}; ' + rome)
    assert takes(several, "; ".join([rome] * tool_calls.MAX_TOOL_CALLS))
    assert not takes(several, "; ".join([rome] * (tool_calls.MAX_TOOL_CALLS + 1)))
    from meshserve.errors import UserError
    from meshserve.orchestrator.grammar import check_structured
    check_structured(several)
    seq = several["json_sequence"]
    for bad in ({**seq, "separator": ""}, {**seq, "separator": "\n"}, {**seq, "max_items": 0},
                {**seq, "max_items": True}, {**seq, "schema": []}, {"schema": seq["schema"]}):
        with pytest.raises(UserError, match="json_sequence"):
            check_structured({"json_sequence": bad})


def test_openapi_documents_the_tool_fields(served):
    doc = httpx.get(served[0].url + "/openapi.json", timeout=60).json()["paths"]
    chat, comp = (doc[p]["post"]["requestBody"]["content"]["application/json"]["schema"]
                  for p in ("/v1/chat/completions", "/v1/completions"))
    assert chat["properties"]["tools"]["maxItems"] == tool_calls.MAX_TOOLS
    assert comp["properties"]["tools"]["maxItems"] == 0
    body = {"model": "m", "messages": [*USER, {"role": "assistant", "tool_calls": [{
        "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}], "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    jsonschema.validate(body, chat)
    jsonschema.validate({**body, "parallel_tool_calls": False}, chat)
    assert "several" in chat["properties"]["parallel_tool_calls"]["description"]
    for bad in ({"tools": [_fn("get weather")]}, {"tool_choice": "always"}, {"tools": [_fn()] * 129},
                {"parallel_tool_calls": "yes"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**body, **bad}, chat)
