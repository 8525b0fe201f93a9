"""Property-based fuzzing of a real `meshserve serve` (a tiny random Llama with the demo model's
tokenizer, one CPU rank) from its own /openapi.json: schemathesis generates bodies that follow the
request schemas and bodies that break them, a bounded and seeded number of each. No answer may be a
5xx, and afterwards the server is alive and gives the same greedy output as before."""
from __future__ import annotations

import httpx
import openai
import pytest
import requests

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from meshserve.orchestrator.sampling_params import MAX_TOP_K  # noqa: E402
from tests.checkpoints import write_llama_with_demo_tokenizer  # noqa: E402
from tests.conftest import meshserve  # noqa: E402
from tests.serving import Server  # noqa: E402

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_SEQ_LEN = 40
GREEDY = dict(model="m", prompt="Once upon a time", max_tokens=10, temperature=0)
EXAMPLES = {("POST", "/v1/completions"): 45, ("POST", "/v1/chat/completions"): 45,
            ("GET", "/v1/models"): 5, ("GET", "/health"): 5}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    hf = write_llama_with_demo_tokenizer(tmp / "hf", seed=1)
    meshserve("build", "--model", hf, "--dtype", "float32", "--max-seq-len", MAX_SEQ_LEN, "--max-batch-size", 4,
              "--out", tmp / "engine", "--quiet")
    server = Server("--engine", tmp / "engine", "--model-name", "m", "--api-key", KEY)
    try:
        yield server, greedy(server.url)
    finally:
        assert server.stop() == 0, server.output


def greedy(url: str) -> tuple[str, str]:
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    out = client.completions.create(**GREEDY)
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                          temperature=0)
    return out.choices[0].text, chat.choices[0].message.content


@pytest.fixture(scope="module")
def openapi(served):
    r = httpx.get(served[0].url + "/openapi.json", headers=AUTH, timeout=60)
    assert r.status_code == 200
    return r.json()


def body_schema(doc: dict, path: str) -> dict:
    return doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]


def test_openapi_documents_the_bounds_that_are_enforced(openapi, served):
    comp, chat = body_schema(openapi, "/v1/completions"), body_schema(openapi, "/v1/chat/completions")
    assert comp["required"] == ["prompt"] and chat["required"] == ["messages"]
    for schema in (comp, chat):
        props = schema["properties"]
        assert props["top_k"]["maximum"] == MAX_TOP_K and props["max_tokens"]["maximum"] == MAX_SEQ_LEN
        assert props["seed"]["maximum"] == 2**64 - 1 and props["model"]["enum"] == ["m", None]
    # one bound past the documented maximum is refused, naming the field
    url = served[0].url
    for field, top in (("top_k", MAX_TOP_K), ("max_tokens", MAX_SEQ_LEN)):
        r = httpx.post(url + "/v1/completions", headers=AUTH, timeout=60,
                       json={"model": "m", "prompt": "Hi", "max_tokens": 1, field: top + 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_fuzz_no_server_errors(openapi, served, mode):
    server = served[0]
    schema = schemathesis.openapi.from_dict(openapi)
    seen: dict[int, int] = {}
    with requests.Session() as session:
        for (method, path), n in EXAMPLES.items():
            if method == "GET" and mode == GenerationMode.NEGATIVE:
                continue  # no parameters to break
            strategy = schema[path][method].as_strategy(generation_mode=mode)

            @settings(max_examples=n, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def one(case):
                r = case.call(base_url=server.url, session=session, headers=AUTH, timeout=120)
                seen[r.status_code] = seen.get(r.status_code, 0) + 1
                sent = r.request.body
                assert r.status_code < 500, f"{method} {path} {sent!r:.2000} -> {r.status_code} {r.text[:500]}"
                if r.status_code >= 400:
                    err = r.json()["error"]
                    assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text

            one()
    print(mode, seen)
    assert sum(seen.values()) >= 40, seen
    if mode == GenerationMode.POSITIVE:
        assert seen.get(200, 0) >= 15, seen  # many valid bodies were served
    else:
        assert any(400 <= s < 500 for s in seen), seen


def test_alive_and_same_output_after_fuzzing(served):
    server, reference = served
    assert httpx.get(server.url + "/health", timeout=60).status_code == 200
    assert greedy(server.url) == reference
    assert server.proc.poll() is None
