"""A real `meshserve serve` on loopback, driven by the official openai client (tp=2 and pp=2)."""
from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.checkpoints import write_llama_with_demo_tokenizer
from tests.conftest import meshserve, read_jsonl, write_jsonl
from tests.serving import Server

WORDS = "the quick brown fox jumps over a lazy dog while seven wise owls watch".split()
PROMPTS = [" ".join(WORDS[: 2 + i % 13]) * (1 + i % 3) for i in range(32)]
MAX_TOKENS = [4 + (i * 7) % 21 for i in range(32)]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_llama_with_demo_tokenizer(tmp_path_factory.mktemp("served") / "hf")


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=60).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels or sample.name.endswith("_total"):
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


async def run_all(url: str) -> list[tuple[str, str, int]]:
    """The 32 prompts at once, odd ones streamed: (text, finish_reason, completion_tokens) each."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)

    async def one(i: int):
        kwargs = dict(model="m", prompt=PROMPTS[i], max_tokens=MAX_TOKENS[i], temperature=0)
        if i % 2:
            text, usage, finish = "", None, None
            async for chunk in await client.completions.create(stream=True, **kwargs):
                if chunk.choices:
                    text += chunk.choices[0].text
                    finish = chunk.choices[0].finish_reason or finish
                usage = chunk.usage or usage
            assert usage is not None, "no usage in the last chunk"
            return text, finish, usage.completion_tokens
        out = await client.completions.create(**kwargs)
        return out.choices[0].text, out.choices[0].finish_reason, out.usage.completion_tokens

    return await asyncio.gather(*(one(i) for i in range(32)))


CHAT = [{"role": "user", "content": "Hi there"}]


@pytest.mark.parametrize("tp,pp", [(2, 1)])  # pp=2: tests/test_text_paths.py (HTTP against generate, byte for byte)
def test_serve_matches_generate(hf_dir, tmp_path, tp, pp):
    from transformers import AutoTokenizer
    engine = tmp_path / "engine"
    meshserve("build", "--model", hf_dir, "--tp", tp, "--pp", pp, "--dtype", "float32", "--out", engine,
              "--max-seq-len", 256, "--max-batch-size", 8, "--max-num-tokens", 48, "--kv-block-size", 8,
              "--quiet")
    requests = write_jsonl(tmp_path / "in.jsonl", [{"prompt": p, "max_tokens": m, "temperature": 0}
                                                    for p, m in zip(PROMPTS, MAX_TOKENS)]
                           + [{"messages": CHAT, "max_tokens": 8, "temperature": 0}])
    meshserve("generate", "--engine", engine, "--input", requests, "--output", tmp_path / "out.jsonl", "--quiet")
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert len(rows) == 33
    expected = [(row["text"], row["finish_reason"], len(row["token_ids"])) for row in rows[:32]]
    chat_row = rows[32]
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    prompt_tokens = sum(len(tokenizer(p)["input_ids"]) for p in PROMPTS)

    server = Server("--engine", engine, "--model-name", "m")
    try:
        before = metrics(server.url)
        results = asyncio.run(run_all(server.url))
        after = metrics(server.url)
        assert results == expected
        generated = sum(n for _, _, n in expected)
        assert after["meshserve_generation_tokens_total"] - before.get("meshserve_generation_tokens_total", 0) \
            == generated
        assert after["meshserve_prompt_tokens_total"] - before.get("meshserve_prompt_tokens_total", 0) \
            == prompt_tokens

        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
        assert [m.id for m in client.models.list().data] == ["m"]
        chat = client.chat.completions.create(model="m", messages=CHAT, max_tokens=8, temperature=0)
        assert chat.choices[0].message.role == "assistant"
        assert (chat.choices[0].message.content, chat.choices[0].finish_reason, chat.usage.completion_tokens) \
            == (chat_row["text"], chat_row["finish_reason"], len(chat_row["token_ids"]))
        seeded = [client.completions.create(model="m", prompt="Once upon", max_tokens=12, temperature=1.0,
                                            seed=1234).choices[0].text for _ in range(2)]
        assert seeded[0] == seeded[1]
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="m", prompt="x", max_tokens=1000)
        assert err.value.body["param"] == "max_tokens" and "max_seq_len 256" in err.value.body["message"]

        # A client that walks away mid-stream: its request is aborted and its blocks come back.
        with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                          json={"model": "m", "prompt": "walk away", "max_tokens": 200, "stream": True,
                                "temperature": 0, "ignore_eos": True}) as resp:
            for n, _ in enumerate(resp.iter_lines()):
                if n >= 3:
                    break
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            m = metrics(server.url)
            if m["meshserve_kv_blocks_used"] == 0 and m["meshserve_requests_running"] == 0:
                break
            time.sleep(0.5)
        assert m["meshserve_kv_blocks_used"] == 0 and m["meshserve_requests_running"] == 0, m
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        code = server.stop()
    assert code == 0, server.output
