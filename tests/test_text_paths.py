"""HTTP (streamed and not) and `meshserve generate` give byte-identical text for the same requests.

The model speaks raw bytes (a byte-level tokenizer with one token per byte), so random outputs break
multi-byte characters mid-stream and at the very end, and stop strings land anywhere in a token run.
"""
from __future__ import annotations

import random

import openai
import pytest

from tests.checkpoints import TINY, write_llama
from tests.conftest import meshserve, read_jsonl, write_jsonl
from tests.serving import Server

EOS = 256
PROMPTS = ["héllo wörld", "日本語のテキスト", "emoji 🙂🙃 and more", "plain ascii text", "ü", "∑ x² ≤ y³"]
STOPS = [None, ["e"], ["a", "o", "\n"], ["xyz", " t"], ["\u00e9", "s"], ["!"]]


def write_byte_tokenizer(path) -> None:
    """One token per byte (ids 0..255, any order: the decoder knows each byte) plus <eos> = 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    assert len(alphabet) == 256
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)} | {"<eos>": EOS}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(path)


def requests() -> list[dict]:
    rng = random.Random(5)
    out = []
    for i in range(24):
        req = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": rng.randint(1, 24), "seed": 1000 + i,
               "temperature": 0.0 if i % 5 == 0 else 1.0}
        if STOPS[i % len(STOPS)]:
            req["stop"] = STOPS[i % len(STOPS)]
        out.append(req)
    return out


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("bytes")
    hf = write_llama(root / "hf", seed=9, **dict(TINY, vocab_size=EOS + 1, bos_token_id=None, eos_token_id=EOS))
    write_byte_tokenizer(hf)
    engine = root / "engine"
    meshserve("build", "--model", hf, "--tp", 1, "--pp", 2, "--dtype", "float32", "--out", engine,
              "--max-seq-len", 128, "--quiet")
    return engine


@pytest.fixture(scope="module")
def offline(engine, tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    meshserve("generate", "--engine", engine, "--input", write_jsonl(root / "in.jsonl", requests()),
              "--output", root / "out.jsonl", "--quiet")
    rows = read_jsonl(root / "out.jsonl")
    assert [r["index"] for r in rows] == list(range(len(requests())))
    return rows


def test_requests_reach_the_hard_cases(offline):
    """Guard: the fixed requests still cut characters, hit stop strings and stop tokens."""
    texts = [r["text"] for r in offline]
    assert any(t.endswith("\ufffd") for t in texts), texts
    assert any("\ufffd" in t.rstrip("\ufffd") for t in texts), texts
    reasons = [r["finish_reason"] for r in offline]
    assert "length" in reasons
    assert any(r == "stop" and row["token_ids"][-1] != EOS for r, row in zip(reasons, offline, strict=True))


def test_http_text_equals_generate(engine, offline):
    server = Server("--engine", engine, "--model-name", "m")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        for i, (req, row) in enumerate(zip(requests(), offline, strict=True)):
            args = dict(model="m", prompt=req["prompt"], max_tokens=req["max_tokens"], seed=req["seed"],
                        temperature=req["temperature"], stop=req.get("stop"))
            if i % 2:
                chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                                        **args))
                text = "".join(c.choices[0].text for c in chunks if c.choices)
                reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
                usage = chunks[-1].usage
            else:
                out = client.completions.create(**args)
                text, reason, usage = out.choices[0].text, out.choices[0].finish_reason, out.usage
            assert text.encode() == row["text"].encode(), f"request {i} ({'streamed' if i % 2 else 'whole'})"
            assert reason == row["finish_reason"], f"request {i}"
            assert usage.completion_tokens == len(row["token_ids"]), f"request {i}"
    finally:
        assert server.stop() == 0
