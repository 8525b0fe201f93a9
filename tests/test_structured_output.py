"""Structured output against a real `meshserve serve` (a random-weight tiny Llama with the demo
model's tokenizer, pp=2 so the masks cross to the sampling rank in the step plan), driven by the
official openai client: seeded generated JSON schemas whose every completed answer must validate,
bounded schemas that must all complete within 128 tokens, regex and choice grammars, and grammars
the server must refuse with a 400 that says why. Plus the compiler's cache and deadline, in-process."""
from __future__ import annotations

import asyncio
import json
import random
import re
import time

import httpx
import jsonschema
import openai
import pytest

from meshserve.orchestrator.grammar import GrammarCompiler, GrammarError
from tests.checkpoints import write_llama_with_demo_tokenizer
from tests.conftest import meshserve
from tests.serving import serve_random_llama

WORDS = ["red", "green", "blue", "cat", "dog", "yes", "no", "alpha", "beta", "gamma", "x", "id", "ok", "big"]
MAX_TOKENS = 128
NUM_SCHEMAS = 50


# ---- seeded schemas ----------------------------------------------------------------------------------

def _scalar(rng: random.Random, bounded: bool) -> dict:
    kinds = ["enum_str", "enum_int", "bool", "int"] + ([] if bounded else ["number", "string", "nullable"])
    kind = rng.choice(kinds)
    if kind == "enum_str":
        return {"enum": rng.sample(WORDS, rng.randint(1, 4))}
    if kind == "enum_int":
        return {"type": "integer", "enum": rng.sample(range(-20, 300), rng.randint(1, 4))}
    if kind == "bool":
        return {"type": "boolean"}
    if kind == "int":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 200)}
    if kind == "number":
        lo = rng.uniform(-10, 10)
        return {"type": "number", "minimum": round(lo, 2), "maximum": round(lo + rng.uniform(0.5, 50), 2)}
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 10)}
    return {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "null"}]}


def _value(rng: random.Random, bounded: bool, depth: int) -> dict:
    r = rng.random()
    if depth < 2 and r < 0.2:
        return _object(rng, bounded, depth + 1, max_props=3)
    if r < 0.4:
        items = _scalar(rng, bounded) if (bounded or depth > 0) else _value(rng, bounded, depth + 1)
        lo = rng.randint(0, 1)
        return {"type": "array", "items": items, "minItems": lo, "maxItems": lo + rng.randint(0, 2)}
    return _scalar(rng, bounded)


def _object(rng: random.Random, bounded: bool, depth: int = 0, max_props: int = 4) -> dict:
    names = rng.sample(WORDS, rng.randint(1, max_props))
    props = {n: _value(rng, bounded, depth) for n in names}
    required = [n for n in names if rng.random() < 0.7]  # the others are optional
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def schemas() -> list[tuple[dict, bool]]:
    """(schema, bounded) pairs: bounded ones hold only enums, booleans, bounded integers and short
    arrays of them, so every answer has a bounded length."""
    rng = random.Random(20240611)
    return [(_object(rng, bounded), bounded) for bounded in [i % 3 != 2 for i in range(NUM_SCHEMAS)]]


def test_generated_schemas_cover_what_they_claim():
    text = json.dumps([s for s, _ in schemas()])
    for word in ('"enum"', '"boolean"', '"minimum"', '"maxItems"', '"number"', '"anyOf"', '"required": []'):
        assert word in text, word
    assert any(json.dumps(s).count('"properties"') > 1 for s, _ in schemas())  # nested objects


# ---- the server --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    yield from serve_random_llama(tmp_path_factory.mktemp("structured"), 7, "--pp", 2, "--max-seq-len", 256,
                                  "--max-batch-size", 16, "--max-num-tokens", 256)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="none", max_retries=0, timeout=120)


async def _ask(aclient, i: int, schema: dict) -> tuple[str, str, int]:
    """Request i for `schema`: chat and completions, response_format and guided_json, in turn."""
    common = dict(model="m", max_tokens=MAX_TOKENS, temperature=1.0, seed=i)
    if i % 2 == 0:
        out = await aclient.chat.completions.create(
            messages=[{"role": "user", "content": f"Give me JSON number {i}"}],
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}, **common)
        text = out.choices[0].message.content
    else:
        extra = {"guided_json": schema} if i % 4 == 1 else \
            {"response_format": {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}}
        out = await aclient.completions.create(prompt=f"JSON {i}:", extra_body=extra, **common)
        text = out.choices[0].text
    return text, out.choices[0].finish_reason, out.usage.completion_tokens


def test_generated_schemas_validate(served):
    cases = schemas()

    async def run():
        aclient = openai.AsyncOpenAI(base_url=served[0].url + "/v1", api_key="none", max_retries=0, timeout=300)
        return await asyncio.gather(*(_ask(aclient, i, s) for i, (s, _) in enumerate(cases)))

    start = time.monotonic()
    results = asyncio.run(run())
    elapsed = time.monotonic() - start
    completed = 0
    for i, ((schema, bounded), (text, finish, n)) in enumerate(zip(cases, results)):
        where = f"schema {i} {json.dumps(schema)} -> {text!r} ({finish}, {n} tokens)"
        if bounded:
            assert finish == "stop" and n <= MAX_TOKENS, where
        if finish == "stop":
            completed += 1
            jsonschema.validate(json.loads(text), schema)
    assert completed > sum(b for _, b in cases), (completed, elapsed)  # some unbounded ones complete too


def test_streamed_answer_follows_its_schema(client):
    schema, _ = schemas()[0]
    text, finish = "", None
    for chunk in client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "JSON please"}], max_tokens=MAX_TOKENS, seed=1,
            stream=True, response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), schema)


def test_json_object_regex_and_choice(client, served):
    out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=48,
                                         seed=2, response_format={"type": "json_object"})
    assert out.choices[0].message.content.startswith("{")
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    for seed in range(3):
        rx = client.completions.create(model="m", prompt="Code:", max_tokens=20, seed=seed,
                                       extra_body={"guided_regex": "(yes|no)-[0-9]{2}"}).choices[0]
        assert rx.finish_reason == "stop" and re.fullmatch("(yes|no)-[0-9]{2}", rx.text), rx
        # a bias toward a token the grammar forbids does not get past the mask
        the = served[1].encode(" the", add_special_tokens=False)[0]
        pick = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Pick"}],
                                              max_tokens=20, seed=seed, logit_bias={str(the): 100},
                                              extra_body={"guided_choice": ["red", "green", "blue sky"]}).choices[0]
        assert pick.finish_reason == "stop" and pick.message.content in ("red", "green", "blue sky"), pick


@pytest.mark.parametrize("extra,param,words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "u", "schema": {
        "type": "array", "uniqueItems": True}}}}, "response_format", ["uniqueItems"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "integr"}}}},
     "response_format", ["integr"]),
    ({"response_format": {"type": "yaml"}}, "response_format", ["json_object", "json_schema"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": [1]}}}, "response_format",
     ["JSON Schema object"]),
    ({"guided_regex": "(("}, "guided_regex", ["unclosed group"]),
    ({"guided_choice": []}, "guided_choice", ["non-empty list"]),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", ["only one"]),
    ({"guided_json": "{not json"}, "guided_json", ["not valid JSON"]),
    ({"guided_json": {"type": "object", "properties": {"k": {"enum": ["v" * 40000, "w" * 40000]}}}}, "guided_json",
     ["too large"]),
    # compiles, but no token can start an answer: it would end at once, empty, with finish_reason "stop"
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {"$ref": "#"}}}},
     "response_format", ["allows no output"]),
    ({"guided_json": {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}}, "guided_json",
     ["allows no output"]),
])
def test_grammars_that_cannot_be_used_are_a_400_that_says_why(client, served, extra, param, words):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       extra_body=extra)
    body = err.value.body
    assert body["param"] == param and all(w in body["message"] for w in words), body
    assert httpx.get(served[0].url + "/health", timeout=30).status_code == 200


def test_a_grammar_that_fails_mid_generation_is_an_error_not_a_stop(client, served):
    """`a{1000000}` compiles, but its lexer outgrows llguidance's limits once the engine makes the
    masks: the matcher fails, and only the end token would be left. The answer must not pretend to be
    complete: not streamed, a 400 naming the grammar's field (n > 1 too); streamed, an error event.
    The engine goes on serving."""
    bad = {"guided_regex": "a{1000000}"}
    chat = dict(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, seed=1, extra_body=bad)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**chat)
    body = err.value.body
    assert body["param"] == "guided_regex" and body["code"] == "grammar_failed", body
    assert "grammar" in body["message"] and "lexer" in body["message"] and "simplify" in body["message"], body
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="m", prompt="Code:", max_tokens=8, n=2, seed=1, extra_body=bad)
    assert err.value.body["param"] == "guided_regex" and err.value.body["code"] == "grammar_failed"
    with pytest.raises(openai.APIError) as err:
        for _ in client.chat.completions.create(stream=True, **chat):
            pass
    assert err.value.body["code"] == "grammar_failed" and "grammar" in err.value.message, err.value.body
    assert httpx.get(served[0].url + "/health", timeout=30).status_code == 200
    ok = client.completions.create(model="m", prompt="Code:", max_tokens=20, seed=0,
                                   extra_body={"guided_regex": "(yes|no)-[0-9]{2}"}).choices[0]
    assert ok.finish_reason == "stop" and re.fullmatch("(yes|no)-[0-9]{2}", ok.text), ok


def test_the_python_api_reports_a_failed_grammar(tmp_path):
    """The same failure through `LLM` (one rank, in this process): finish_reason "error" with the
    reason, the failing token left out; the request beside it completes."""
    from meshserve import LLM, SamplingParams
    hf = write_llama_with_demo_tokenizer(tmp_path / "hf", seed=7)
    meshserve("build", "--model", hf, "--dtype", "float32", "--max-seq-len", 128, "--out", tmp_path / "engine",
              "--quiet")
    with LLM(str(tmp_path / "engine"), show_progress=False) as llm:
        bad, good = llm.generate(["Hi", "Code:"], [
            SamplingParams(max_tokens=8, seed=1, structured={"regex": "a{1000000}"}),
            SamplingParams(max_tokens=20, seed=0, structured={"regex": "(yes|no)-[0-9]{2}"})])
    assert bad.finish_reason == "error" and f"grammar failed after {len(bad.token_ids)} token" in bad.error, bad
    assert good.finish_reason == "stop" and good.error is None and re.fullmatch("(yes|no)-[0-9]{2}", good.text), good


# ---- the compiler, in-process ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def compiler(served):
    return GrammarCompiler(served[1], len(served[1]), max_entries=2)


def test_compiles_are_cached_and_bounded(compiler):
    a, b, c = ({"choice": [w]} for w in ("one", "two", "three"))
    assert compiler.compile(a) is compiler.compile(dict(a))
    compiler.compile(b)
    compiler.compile(c)
    assert len(compiler._cache) == 2 and compiler.compile(c) is compiler.compile(c)


def test_a_compile_past_its_deadline_is_refused(compiler, monkeypatch):
    slow = GrammarCompiler(compiler._hf, compiler.vocab_size, timeout_s=0.2)
    monkeypatch.setattr(slow, "_build", lambda spec: time.sleep(2))
    with pytest.raises(GrammarError, match="did not compile within 0.2 s"):
        slow.compile({"regex": "a+"})
