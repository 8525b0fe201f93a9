"""The OpenAI HTTP layer over a scripted in-test engine: a real uvicorn server on loopback, driven
by the official openai client and raw HTTP; plus detokenizer unit tests."""
from __future__ import annotations

import asyncio
import json
import threading

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

try:
    import httpx
except ImportError:  # the openai client ships its HTTP library under this name
    import httpx2 as httpx

from meshserve.orchestrator.api_server import TokenEvent, build_app, serve_app
from meshserve.orchestrator.detokenizer import IncrementalDetokenizer, TokenTexts
from meshserve.errors import UserError
from meshserve.orchestrator.metrics import ServerMetrics

MODEL = "tiny-llama"
REPLY = "Hello wörld, 中文 🙂 the end."
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


# ---- a tiny real tokenizer, built offline --------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A byte-level BPE with a small vocabulary, so non-ASCII characters split across tokens."""
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from meshserve.orchestrator.tokenizer import Tokenizer
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    corpus = ["Hello world, the quick brown fox jumps over the lazy dog.", "Hello there! the end."] * 20
    raw.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<s>", "</s>"], show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    hf.chat_template = CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("tokenizer")
    hf.save_pretrained(str(path))
    return Tokenizer(path)


class FakeEngine:
    """Implements EngineClient: replies REPLY's tokens then eos (or loops forever, slowly)."""

    def __init__(self, tokenizer, max_seq_len: int = 96):
        self.tokenizer, self.max_seq_len = tokenizer, max_seq_len
        self.reset()

    def reset(self):
        self.alive = True
        self.delay = 0.0
        self.forever = False
        self.fail_after: int | None = None  # raise RuntimeError after this many tokens
        self.calls: list[tuple[list[int], object]] = []
        self.aborted = threading.Event()
        self.completed = 0

    def check(self, prompt_ids, params):
        if not prompt_ids:
            raise UserError("the prompt is empty: send at least one token")
        if len(prompt_ids) + params.max_tokens > self.max_seq_len:
            raise UserError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                            f"max_seq_len {self.max_seq_len}")

    def is_alive(self):
        return self.alive

    async def generate(self, prompt_ids, params):
        self.calls.append((list(prompt_ids), params))
        reply = self.tokenizer.encode(REPLY)
        eos = self.tokenizer.eos_token_id
        script = reply + [eos]
        done = False
        try:
            for i in range(params.max_tokens):
                if self.fail_after is not None and i >= self.fail_after:
                    raise RuntimeError("engine failed: rank 3 is gone")
                if self.delay:
                    await asyncio.sleep(self.delay)
                tid = script[i % len(script)] if (self.forever or params.ignore_eos) else script[i]
                if tid == eos and self.forever:
                    tid = reply[0]
                last = i + 1 == params.max_tokens
                reason = None
                if tid in params.stop_token_ids or (tid == eos and not params.ignore_eos):
                    reason = "stop"
                elif last:
                    reason = "length"
                lp = top = prompt_lps = None
                if params.logprobs is not None:
                    lp = -0.5
                    top = [(tid, -0.5), ((tid + 1) % 300, -1.5), ((tid + 2) % 300, float("-inf"))][: params.logprobs]
                if i == 0 and params.prompt_logprobs is not None:  # token k: -k / 10, the top two after it
                    prompt_lps = [None] + [[-k / 10, [[t, -k / 10], [(t + 1) % 300, -5.0]][: params.prompt_logprobs]]
                                           for k, t in enumerate(prompt_ids) if k]
                yield TokenEvent(tid, lp, top, reason, prompt_lps)
                if reason:
                    break
            done = True
        finally:
            if done:
                self.completed += 1
            else:
                self.aborted.set()


@pytest.fixture(scope="module")
def server(tokenizer):
    engine = FakeEngine(tokenizer)
    metrics = ServerMetrics()
    app = build_app(engine, MODEL, metrics)
    ready = threading.Event()
    thread = threading.Thread(target=serve_app, args=(app, "127.0.0.1", 0, ready),
                              kwargs={"log_level": "warning"}, daemon=True)
    thread.start()
    assert ready.wait(20), "server did not start"
    base = f"http://127.0.0.1:{app.state.port}"
    yield engine, base, metrics
    app.state.server.should_exit = True
    thread.join(10)


@pytest.fixture
def engine(server):
    """The shared fake engine, reset to its defaults for each test."""
    server[0].reset()
    return server[0]


@pytest.fixture
def base(server, engine):
    """The shared server's URL; requesting it resets the engine, so no test sees another's settings."""
    return server[1]


@pytest.fixture
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=20)


def sse_events(text: str) -> list:
    out = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            payload = block[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


# ---- completions and chat ------------------------------------------------------------------------

def test_completion(client, engine, tokenizer):
    out = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=60)
    choice = out.choices[0]
    assert choice.text == REPLY and choice.finish_reason == "stop"
    n_reply = len(tokenizer.encode(REPLY))
    assert out.usage.prompt_tokens == len(tokenizer.encode("Hello there"))
    assert out.usage.completion_tokens == n_reply + 1  # the eos counts, but is not shown
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.object == "text_completion" and out.model == MODEL
    prompt_ids, params = engine.calls[-1]
    assert prompt_ids == tokenizer.encode("Hello there") and params.max_tokens == 60


def test_completion_length_and_params(client, engine):
    out = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=3, temperature=0.5, top_p=0.9,
                                    seed=7, user="someone",
                                    extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1,
                                                "some_future_field": {"x": 1}})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3
    prompt_ids, p = engine.calls[-1]
    assert prompt_ids == [5, 6, 7]
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed, p.repetition_penalty) == (0.5, 0.9, 5, 0.1, 7, 1.1)


def test_completion_stream_usage_in_last_chunk(base, engine):
    with httpx.Client(timeout=20) as http:
        r = http.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 60,
                                                      "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == REPLY and "\ufffd" not in text
    assert all("\ufffd" not in c["choices"][0]["text"] for c in chunks)
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "stop"
    assert last["usage"]["completion_tokens"] == len(engine.tokenizer.encode(REPLY)) + 1
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_completion_stream_openai_client_include_usage(client, tokenizer):
    stream = client.completions.create(model=MODEL, prompt="Hi", max_tokens=60, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == REPLY
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(tokenizer.encode("Hi")),
                                                             len(tokenizer.encode(REPLY)) + 1)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat(client, engine, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=60)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == REPLY and out.choices[0].finish_reason == "stop"
    prompt_ids, params = engine.calls[-1]
    assert prompt_ids == tokenizer.encode_chat(messages) and params.max_tokens == 60
    assert out.usage.prompt_tokens == len(prompt_ids)


def test_chat_default_max_tokens_fills_context(client, engine):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    prompt_ids, params = engine.calls[-1]
    assert params.max_tokens == engine.max_seq_len - len(prompt_ids)
    assert out.choices[0].message.content == REPLY


def test_chat_stream(client, tokenizer):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
        max_tokens=60, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == REPLY
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == len(tokenizer.encode(REPLY)) + 1


def test_stop_string_ends_request_and_aborts_engine(client, engine):
    # "中文" spans several byte-level tokens; nothing from it onwards may appear
    engine.delay = 0.05  # still generating when the stop string shows up
    out = client.completions.create(model=MODEL, prompt="Hi", max_tokens=60, stop=["中文", "zzz"])
    assert out.choices[0].text == "Hello wörld, " and out.choices[0].finish_reason == "stop"
    assert engine.aborted.wait(60), "the engine generator was not closed after the stop string"
    assert engine.completed == 0
    engine.reset()
    engine.delay = 0.05
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                 max_tokens=60, stop="the end", stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "Hello wörld, 中文 🙂 " and chunks[-1].choices[0].finish_reason == "stop"
    assert engine.aborted.wait(60) and engine.completed == 0


def test_stop_token_ids_and_ignore_eos(client, engine, tokenizer):
    reply = tokenizer.encode(REPLY)
    out = client.completions.create(model=MODEL, prompt="Hi", max_tokens=60,
                                    extra_body={"stop_token_ids": [reply[1]]})
    assert out.choices[0].text == tokenizer.decode(reply[:1]) and out.choices[0].finish_reason == "stop"
    out = client.completions.create(model=MODEL, prompt="Hi", max_tokens=len(reply) + 3,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length" and out.choices[0].text.startswith(REPLY)


def test_completion_logprobs(client, tokenizer):
    out = client.completions.create(model=MODEL, prompt="Hi", max_tokens=60, logprobs=2)
    lp = out.choices[0].logprobs
    n = len(tokenizer.encode(REPLY))  # the hidden eos has no entry
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert all(v == -0.5 for v in lp.token_logprobs)
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert any(t.startswith("bytes:") for t in lp.tokens)  # a split multi-byte character


def test_chat_logprobs(client, tokenizer):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=60, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == len(tokenizer.encode(REPLY))
    assert bytes(b for e in content for b in e.bytes).decode("utf-8") == REPLY
    assert [len(e.top_logprobs) for e in content] == [3] * len(content)
    assert content[0].top_logprobs[2].logprob < -1000  # -inf clamped to a finite number
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=60, logprobs=True, stream=True)
    entries = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == len(content) and all(e.top_logprobs == [] for e in entries)


def test_echo_with_logprobs_puts_the_prompts_entries_first(client, engine, tokenizer):
    prompt = "Hello there, the fox"
    ids = tokenizer.encode(prompt)
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=60, logprobs=2)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=60, logprobs=2, echo=True)
    assert engine.calls[-1][1].prompt_logprobs == 2 and engine.calls[-2][1].prompt_logprobs is None
    choice, lp, p = out.choices[0], out.choices[0].logprobs, len(ids)
    assert choice.text == prompt + REPLY == prompt + plain.choices[0].text
    assert lp.tokens[:p] == [TokenTexts(tokenizer).get(t)[0] for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:p] == [-k / 10 for k in range(1, p)]
    assert all(len(t) == 2 and t[lp.tokens[k]] == -k / 10 for k, t in enumerate(lp.top_logprobs[1:p], 1))
    assert "".join(lp.tokens[:p]) == prompt and lp.text_offset[:p] == [len(tokenizer.decode(ids[:k]))
                                                                       for k in range(p)]
    gen = plain.choices[0].logprobs  # the output's entries follow, offsets counted from the echoed prompt
    assert (lp.tokens[p:], lp.token_logprobs[p:], lp.top_logprobs[p:]) == (gen.tokens, gen.token_logprobs,
                                                                           gen.top_logprobs)
    assert lp.text_offset[p:] == [len(prompt) + o for o in gen.text_offset]
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=60, logprobs=2, echo=True,
                                            stream=True))
    assert chunks[0].choices[0].text == prompt and chunks[0].choices[0].logprobs.tokens == lp.tokens[:p]
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    streamed = [(t, v, o) for c in chunks for t, v, o in zip(c.choices[0].logprobs.tokens,
                                                               c.choices[0].logprobs.token_logprobs,
                                                               c.choices[0].logprobs.text_offset)]
    assert streamed == list(zip(lp.tokens, lp.token_logprobs, lp.text_offset))


def test_echo_with_logprobs_and_n_choices(client, engine, tokenizer):
    prompt = "Hello there"
    p = len(tokenizer.encode(prompt))
    one = client.completions.create(model=MODEL, prompt=prompt, max_tokens=60, logprobs=1, echo=True)
    engine.reset()
    many = client.completions.create(model=MODEL, prompt=prompt, max_tokens=60, logprobs=1, echo=True, n=3)
    assert sorted(c[1].prompt_logprobs is not None for c in engine.calls) == [False, False, True]  # computed once
    for c in many.choices:
        assert c.text == one.choices[0].text and c.logprobs.tokens == one.choices[0].logprobs.tokens
        assert c.logprobs.token_logprobs[:p] == one.choices[0].logprobs.token_logprobs[:p]
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=60, logprobs=1, echo=True,
                                            n=2, stream=True))
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert mine[0].text == prompt and mine[0].logprobs.token_logprobs == one.choices[0].logprobs.token_logprobs[:p]
        assert "".join(c.text for c in mine) == one.choices[0].text


class GroupEngine(FakeEngine):
    """A FakeEngine that also takes the choices of a request together (generate_group)."""

    def reset(self):
        super().reset()
        self.groups: list[list] = []

    def generate_group(self, prompt_ids, params):
        self.groups.append(list(params))
        return [self.generate(prompt_ids, p) for p in params]


def test_choices_reach_an_engine_that_takes_groups_together(tokenizer):
    """All the choices go to the engine in one call (so it prefills the prompt once), seeded seed + i,
    only the first scoring the prompt; a streamed echo with logprobs still gives every choice the
    first choice's prompt entries."""
    engine = GroupEngine(tokenizer)
    app = build_app(engine, MODEL, ServerMetrics())
    ready = threading.Event()
    thread = threading.Thread(target=serve_app, args=(app, "127.0.0.1", 0, ready),
                              kwargs={"log_level": "warning"}, daemon=True)
    thread.start()
    assert ready.wait(20), "server did not start"
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{app.state.port}/v1", api_key="x", max_retries=0, timeout=20)
    try:
        prompt = "Hello there"
        p = len(tokenizer.encode(prompt))
        one = client.completions.create(model=MODEL, prompt=prompt, max_tokens=60, logprobs=1, echo=True)
        assert engine.groups == []
        many = client.completions.create(model=MODEL, prompt=prompt, max_tokens=60, logprobs=1, echo=True, n=3,
                                         seed=5)
        (group,) = engine.groups
        assert [g.seed for g in group] == [5, 6, 7] and [g.prompt_logprobs is not None for g in group] == [True] + [False] * 2
        assert [c.index for c in many.choices] == [0, 1, 2]
        for c in many.choices:
            assert c.text == one.choices[0].text and c.logprobs.token_logprobs[:p] == one.choices[0].logprobs.token_logprobs[:p]
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=60, logprobs=1, echo=True,
                                                n=2, stream=True))
        assert len(engine.groups) == 2
        for i in range(2):
            mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
            assert mine[0].text == prompt and mine[0].logprobs.token_logprobs == one.choices[0].logprobs.token_logprobs[:p]
            assert "".join(c.text for c in mine) == one.choices[0].text
        engine.completed, engine.forever, engine.delay = 0, True, 0.01
        engine.fail_after = 2  # the choices fail: the request says so, and none is left running
        with pytest.raises(openai.InternalServerError):
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=60, n=4)
        assert len(engine.groups) == 3 and engine.completed == 0
    finally:
        app.state.server.should_exit = True
        thread.join(10)


# ---- errors --------------------------------------------------------------------------------------

def _post(base, path, body):
    with httpx.Client(timeout=20) as http:
        return http.post(f"{base}{path}", json=body) if not isinstance(body, bytes) else \
            http.post(f"{base}{path}", content=body, headers={"content-type": "application/json"})


def assert_400(r, param):
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] is None and err["param"] == param, err
    assert err["message"]
    return err


def test_bad_temperature_openai_client(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="Hi", temperature=-1)
    assert info.value.status_code == 400
    assert info.value.body["param"] == "temperature" and "temperature" in info.value.body["message"]


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "Hi", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "Hi", "n": 17}, "n"),
    ("/v1/completions", {"prompt": "Hi", "n": 3, "best_of": 2}, "best_of"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "Hi", "suffix": "!"}, "suffix"),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": {"x": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "response_format": {"type": "yaml"}},
     "response_format"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "Hi", "stop": [1]}, "stop"),
    ("/v1/completions", {"prompt": "Hi", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "Hi", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"max_tokens": 5}, "prompt"),
    ("/v1/completions", {"prompt": "word " * 200}, "prompt"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 500}, "max_tokens"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "n": 0}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 0},
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 500},
     "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2},
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True,
                              "top_logprobs": 30}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "presence_penalty": 3},
     "presence_penalty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 200}]}, "messages"),
])
def test_bad_requests_name_the_field(base, engine, path, body, param):
    err = assert_400(_post(base, path, dict(body, model=MODEL)), param)
    if param in ("max_tokens", "prompt") and "max_seq_len" in err["message"]:
        assert "96" in err["message"]
    assert not engine.calls  # nothing reached the engine


def test_invalid_json_and_unknown_route(base):
    r = _post(base, "/v1/completions", b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with httpx.Client(timeout=20) as http:
        r = http.get(f"{base}/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_engine_failure_is_reported(base, engine):
    engine.fail_after = 2
    r = _post(base, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 20})
    assert r.status_code == 500 and "rank 3 is gone" in r.json()["error"]["message"]
    engine.alive = False
    r = _post(base, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 20})
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
    r = _post(base, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                            "max_tokens": 20, "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and "rank 3 is gone" in events[-2]["error"]["message"]


# ---- models, health, metrics ---------------------------------------------------------------------

def test_models(client):
    assert [m.id for m in client.models.list()] == [MODEL]


def test_health(base, engine):
    with httpx.Client(timeout=20) as http:
        r = http.get(f"{base}/health")
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        engine.alive = False
        assert http.get(f"{base}/health").status_code == 503


def _samples(base) -> dict:
    with httpx.Client(timeout=20) as http:
        r = http.get(f"{base}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics(client, base, server, tokenizer):
    metrics = server[2]
    metrics.set_scheduler_state(3, 2, 10, 100, 0.25)
    before = _samples(base)
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=4)
    after = _samples(base)
    key = ("meshserve_requests_total", (("finish_reason", "length"),))
    assert after[key] == before.get(key, 0) + 1
    gen = ("meshserve_generation_tokens_total", ())
    assert after[gen] == before[gen] + 4
    prompt = ("meshserve_prompt_tokens_total", ())
    assert after[prompt] == before[prompt] + len(tokenizer.encode("Hi"))
    for h in ("time_to_first_token", "time_per_output_token", "e2e_request_latency"):
        k = (f"meshserve_{h}_seconds_count", ())
        assert after[k] == before.get(k, 0) + 1
    assert after[("meshserve_requests_running", ())] == 3
    assert after[("meshserve_requests_waiting", ())] == 2
    assert after[("meshserve_kv_blocks_used", ())] == 10
    assert after[("meshserve_kv_blocks_total", ())] == 100
    assert after[("meshserve_prefix_cache_hit_rate", ())] == 0.25


# ---- clients that hang up ------------------------------------------------------------------------

def test_stream_disconnect_aborts_engine(base, engine):
    engine.forever, engine.delay = True, 0.2  # 80 tokens take 16 s: the client leaves long before
    with httpx.Client(timeout=20) as http:
        with http.stream("POST", f"{base}/v1/completions",
                         json={"model": MODEL, "prompt": "Hi", "max_tokens": 80, "stream": True}) as r:
            assert r.status_code == 200
            got = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got += 1
                    if got == 3:
                        break
    assert engine.aborted.wait(60), "the engine generator was not closed after the client left"
    assert engine.completed == 0


def test_nonstream_disconnect_aborts_engine(base, engine):
    engine.forever, engine.delay = True, 0.5  # 60 tokens take 30 s: the client gives up after 0.4 s
    with httpx.Client(timeout=0.4) as http:
        with pytest.raises(httpx.TimeoutException):
            http.post(f"{base}/v1/chat/completions",
                      json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 60})
    assert engine.aborted.wait(60) and engine.completed == 0


def test_serve_app_prints_bound_port(tokenizer, capfd):
    app = build_app(FakeEngine(tokenizer), MODEL, ServerMetrics())
    ready = threading.Event()
    thread = threading.Thread(target=serve_app, args=(app, "127.0.0.1", 0, ready),
                              kwargs={"log_level": "warning"}, daemon=True)
    thread.start()
    assert ready.wait(20)
    port = app.state.port
    assert port > 0
    assert f"meshserve: serving on http://127.0.0.1:{port}" in capfd.readouterr().out
    with httpx.Client(timeout=20) as http:
        assert http.get(f"http://127.0.0.1:{port}/health").status_code == 200
    app.state.server.should_exit = True
    thread.join(10)
    assert not thread.is_alive()
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(UserError, match="cannot listen"):
            serve_app(app, "127.0.0.1", busy.getsockname()[1])


# ---- detokenizer ---------------------------------------------------------------------------------

class ByteTokenizer:
    """Each id is a fixed byte string; decode joins them and replaces broken UTF-8, as HF does."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces
        self.longest_window = 0

    def decode(self, ids):
        self.longest_window = max(self.longest_window, len(ids))
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def feed(detok, ids):
    return [detok.add(i) for i in ids]


def test_detok_multibyte_split_across_tokens():
    tok = ByteTokenizer([b"a", b"\xe4", b"\xb8", b"\xad", b"b", b"\xf0\x9f", b"\x99\x82"])
    d = IncrementalDetokenizer(tok)
    assert feed(d, [0, 1, 2, 3, 4, 5, 6]) == ["a", "", "", "中", "b", "", "🙂"]
    assert d.text == "a中b🙂"


def test_detok_real_tokenizer_never_shows_partial_characters(tokenizer):
    ids = tokenizer.encode(REPLY)
    d = IncrementalDetokenizer(tokenizer, prompt_ids=tokenizer.encode("Hello"))
    deltas = feed(d, ids) + [d.flush()]
    assert "".join(deltas) == REPLY and all("\ufffd" not in x for x in deltas)
    assert "" in deltas  # some token ended mid-character and was held back


def test_detok_stop_string_spanning_tokens():
    tok = ByteTokenizer([b"He", b"llo", b" ST", b"OP", b" more"])
    d = IncrementalDetokenizer(tok, stop=["STOP"])
    assert feed(d, [0, 1, 2]) == ["He", "llo", " "]  # "ST" may start the stop string: held back
    assert d.add(3) == "" and d.stopped == "STOP"
    assert d.add(4) == "" and d.flush() == "" and d.text == "Hello "


def test_detok_hold_back_is_released_when_it_is_not_a_stop():
    tok = ByteTokenizer([b"a S", b"x", b"b ST"])
    d = IncrementalDetokenizer(tok, stop=["STOP"])
    assert d.add(0) == "a " and d.add(1) == "Sx"
    assert d.add(2) == "b " and d.flush() == "ST" and d.stopped is None
    assert d.text == "a Sxb ST"


def test_detok_earliest_stop_wins_and_stop_inside_one_token():
    tok = ByteTokenizer([b"abc##def!!gh"])
    d = IncrementalDetokenizer(tok, stop=["!!", "##"])
    assert d.add(0) == "abc" and d.stopped == "##"


def test_detok_stop_across_multibyte_characters():
    tok = ByteTokenizer([b"x", b"\xe4\xb8", b"\xad\xe6", b"\x96\x87", b"y"])
    d = IncrementalDetokenizer(tok, stop=["中文"])
    out = feed(d, [0, 1, 2, 3, 4])
    assert "".join(out) == "x" and d.stopped == "中文"


def test_detok_flush_shows_dangling_partial_character_as_replacement():
    """As a decode of the whole output shows it, so every path gives the same text."""
    tok = ByteTokenizer([b"ok", b"\xe4\xb8"])
    d = IncrementalDetokenizer(tok)
    assert feed(d, [0, 1]) == ["ok", ""] and d.flush() == "\ufffd" and d.text == "ok\ufffd"
    assert d.text == tok.decode([0, 1])


def test_detok_window_stays_bounded():
    tok = ByteTokenizer([b"word ", b"\xc3", b"\xa9"])
    d = IncrementalDetokenizer(tok, stop=["never"], prompt_ids=[0] * 50)
    out = feed(d, [0, 1, 2] * 300)
    assert "".join(out) + d.flush() == "word é" * 300
    assert tok.longest_window <= 8


def test_token_texts_byte_level(tokenizer):
    texts = TokenTexts(tokenizer)
    ids = tokenizer.encode("中文 ok")
    raw = b"".join(bytes(texts.get(i)[1]) for i in ids)
    assert raw == "中文 ok".encode("utf-8")
    assert texts.get(ids[0])[0].startswith("bytes:\\x")
    assert texts.get(tokenizer.eos_token_id)[0] == "</s>"
