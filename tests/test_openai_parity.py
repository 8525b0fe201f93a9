"""OpenAI parameters beyond sampling: logit_bias (in the batched sampler, unit and end to end), echo
(with logprobs: the prompt's, against transformers), suffix, n and best_of, against a real one-rank `meshserve serve` driven by the official openai client (the
structured-output tests run pp=2, where bias and masks cross to the sampling rank in the plan)."""
from __future__ import annotations

import asyncio

import numpy as np
import openai
import pytest
import torch

from meshserve.workers.runtime.sampler import apply_logit_bias, apply_token_mask, sample
from tests.serving import serve_random_llama

PROMPT = "Once upon a time"


# ---- the sampler: bias and masks on some rows of a batch -------------------------------------------

def _packed(allowed: list[set[int]], vocab: int) -> torch.Tensor:
    """Masks as the engine sends them: int32 bit words in pairs, viewed as int64."""
    words = -(-vocab // 64) * 2
    bits = np.zeros((len(allowed), words * 32), dtype=np.uint8)
    for r, ids in enumerate(allowed):
        bits[r, sorted(ids)] = 1
    return torch.from_numpy(np.packbits(bits, axis=1, bitorder="little").view(np.int64).copy())


def test_bias_and_mask_apply_only_to_their_rows():
    torch.manual_seed(0)
    b, vocab = 6, 300
    logits = torch.randn(b, vocab) * 3
    temp = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.7, 0.0])
    top_k, top_p, seeds = torch.zeros(b, dtype=torch.int64), torch.ones(b), torch.arange(b, dtype=torch.int64) + 7
    plain = sample(logits, temp, top_k, top_p, seeds)
    biased = apply_logit_bias(logits, torch.tensor([0, 1, 1]), torch.tensor([5, 17, 4]),
                              torch.tensor([100.0, 100.0, -100.0]))
    allowed = [{3, 250, 299}, {1}]
    masked = apply_token_mask(biased, torch.tensor([2, 4]), _packed(allowed, vocab))
    got = sample(masked, temp, top_k, top_p, seeds)
    assert got[0] == 5 and got[1] == 17                        # +100 forces the token, greedy or sampled
    assert int(got[2]) in allowed[0] and got[4] == 1           # the grammar's tokens only
    assert got[3] == plain[3] and got[5] == plain[5]           # rows without either: as before
    assert torch.equal(logits[3], masked[3]) and not torch.equal(logits[0], masked[0])
    assert masked[2].isfinite().sum() == 3


def test_mask_bits_follow_token_ids_past_32():
    vocab = 200
    ids = {0, 31, 32, 63, 64, 127, 128, 199}
    out = apply_token_mask(torch.zeros(1, vocab), torch.tensor([0]), _packed([ids], vocab))
    assert set(out[0].isfinite().nonzero()[:, 0].tolist()) == ids


# ---- a real server -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def parity_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("parity")


@pytest.fixture(scope="module")
def served(parity_dir):
    yield from serve_random_llama(parity_dir, 3, "--max-seq-len", 256, "--max-batch-size", 8,
                                  "--max-num-tokens", 128)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_logit_bias_forces_and_bans_tokens_in_a_shared_batch(served):
    server, tok = served
    the = tok.encode(" the", add_special_tokens=False)[0]
    plain = dict(temperature=0, extra_body={"ignore_eos": True})

    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)

        async def one(**kw):
            out = await aclient.completions.create(model="m", prompt=PROMPT, max_tokens=6, **kw)
            return out.choices[0].text

        greedy = await one(**plain)
        together = await asyncio.gather(one(**plain), one(temperature=1.0, seed=5, logit_bias={str(the): 100}),
                                        one(**plain), one(temperature=0, logit_bias={str(the): 1e9}))
        first = tok.encode(greedy, add_special_tokens=False)[0]
        banned = await one(logit_bias={str(first): -100}, **plain)
        return greedy, together, first, banned

    greedy, (plain1, forced, plain2, forced_clamped), first, banned = asyncio.run(run())
    assert forced == forced_clamped == " the" * 6
    assert plain1 == plain2 == greedy                        # unbiased rows in the same batches: unchanged
    assert tok.encode(banned, add_special_tokens=False)[0] != first


def test_logit_bias_on_chat(client, served):
    the = served[1].encode(" the", add_special_tokens=False)[0]
    out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                         logit_bias={str(the): 100})
    assert out.choices[0].message.content == " the" * 3


@pytest.mark.parametrize("bias,words", [({"49152": 5}, ["outside the vocabulary", "0..49151"]),
                                        ({"-1": 5}, ["token ids"]), ({"7": "high"}, ["finite numbers"]),
                                        ({str(i): 1 for i in range(1025)}, ["at most 1024"])])
def test_bad_logit_bias_is_a_400_naming_it(client, bias, words):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="m", prompt=PROMPT, max_tokens=2, logit_bias=bias)
    assert err.value.body["param"] == "logit_bias"
    assert all(w in err.value.body["message"] for w in words), err.value.body


def test_echo_returns_the_prompt(client, served):
    plain = client.completions.create(model="m", prompt=PROMPT, max_tokens=5, temperature=0).choices[0].text
    echoed = client.completions.create(model="m", prompt=PROMPT, max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain
    ids = served[1].encode("Hello there", add_special_tokens=False)
    by_ids = client.completions.create(model="m", prompt=ids, max_tokens=3, temperature=0, echo=True)
    assert by_ids.choices[0].text.startswith("Hello there")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="m", prompt=PROMPT, max_tokens=5, temperature=0, echo=True, stream=True) if c.choices)
    assert streamed == PROMPT + plain


def test_echo_with_logprobs_scores_the_prompt(client, served, parity_dir):
    """The prompt's tokens come first, each with its logprob under the tokens before it (transformers'
    log-softmax; the first has none), then the output's entries, which echo does not change. A
    prompt of 150 tokens takes two prefill steps (128 tokens a step)."""
    from transformers import LlamaForCausalLM
    tok = served[1]
    model = LlamaForCausalLM.from_pretrained(parity_dir / "hf", dtype=torch.float32).eval()
    long_prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
    for prompt in (PROMPT, long_prompt):
        kw = dict(model="m", prompt=prompt, max_tokens=5, temperature=0, logprobs=2)
        plain = client.completions.create(**kw)
        out = client.completions.create(echo=True, **kw)
        choice, lp = out.choices[0], out.choices[0].logprobs
        ids = tok(prompt)["input_ids"]
        p = len(ids)
        assert out.usage.prompt_tokens == p and (prompt is PROMPT or p > 128)
        assert choice.text == prompt + plain.choices[0].text
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        want = [ref[i - 1, ids[i]].item() for i in range(1, p)]
        assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:p], want, strict=True)) < 1e-4
        for i in range(1, p):
            top = ref[i - 1].topk(2)
            assert len(lp.top_logprobs[i]) == 2 and sorted(lp.top_logprobs[i].values(), reverse=True) == \
                pytest.approx(top.values.tolist(), abs=1e-4)
        gen = plain.choices[0].logprobs  # the generated tokens: as without echo, offsets after the prompt
        assert lp.tokens[p:] == gen.tokens and lp.token_logprobs[p:] == pytest.approx(gen.token_logprobs, abs=1e-5)
        assert lp.text_offset[p:] == [len(prompt) + o for o in gen.text_offset]
    stream = client.completions.create(model="m", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=1, echo=True,
                                       stream=True)
    first = next(iter(stream))
    stream.close()
    assert first.choices[0].text == PROMPT and first.choices[0].logprobs.token_logprobs[0] is None
    assert len(first.choices[0].logprobs.tokens) == len(tok(PROMPT)["input_ids"])


def test_echo_with_max_tokens_0_scores_the_prompt_alone(client):
    """As OpenAI's legacy API and vLLM answer it (how evaluation harnesses score a text): the prompt
    with its logprobs, nothing generated; the same streamed and with n > 1. Without echo, 0 is a 400."""
    kw = dict(model="m", prompt=PROMPT, temperature=0, logprobs=1, echo=True)
    scored = client.completions.create(max_tokens=3, **kw).choices[0].logprobs
    out = client.completions.create(max_tokens=0, n=2, **kw)
    p = out.usage.prompt_tokens
    assert (out.usage.completion_tokens, out.usage.total_tokens) == (0, p)
    for choice in out.choices:
        assert choice.text == PROMPT and choice.finish_reason == "length"
        assert choice.logprobs.tokens == scored.tokens[:p] and choice.logprobs.token_logprobs[0] is None
        assert choice.logprobs.token_logprobs[1:] == pytest.approx(scored.token_logprobs[1:p], abs=1e-5)
    chunks = list(client.completions.create(max_tokens=0, stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == PROMPT and chunks[-1].choices[0].finish_reason == "length"
    assert sum(len(c.choices[0].logprobs.tokens) for c in chunks) == p and chunks[-1].usage.completion_tokens == 0
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="m", prompt=PROMPT, max_tokens=0)
    assert err.value.body["param"] == "max_tokens" and "0 only with echo" in err.value.body["message"]


@pytest.mark.parametrize("extra,param,words", [
    (dict(suffix="The end."), "suffix", ["infill"]),
    (dict(n=17), "n", ["1..16"]),
    (dict(n=3, best_of=2), "best_of", ["at least n=3"]),
    (dict(n=2, best_of=3, stream=True), "best_of", ["cannot be streamed"]),
])
def test_unsupported_combinations_say_why(client, extra, param, words):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="m", prompt=PROMPT, max_tokens=2, **extra)
    assert err.value.body["param"] == param and all(w in err.value.body["message"] for w in words)


def test_n_choices_equal_single_requests_with_derived_seeds(client):
    kw = dict(model="m", prompt=PROMPT, max_tokens=8, temperature=1.0)
    many = client.completions.create(n=4, seed=2**64 - 2, **kw)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    seeds = [2**64 - 2, 2**64 - 1, 0, 1]  # seed + i, wrapped (mod 2**64) into the seed's range
    singles = [client.completions.create(seed=s, **kw).choices[0] for s in seeds]
    assert [(c.text, c.finish_reason) for c in many.choices] == [(c.text, c.finish_reason) for c in singles]
    assert len({c.text for c in many.choices}) > 1
    assert many.usage.completion_tokens == sum(
        client.completions.create(seed=s, **kw).usage.completion_tokens for s in seeds)


def test_n_choices_stream_interleaved_by_index(client):
    kw = dict(model="m", messages=[{"role": "user", "content": "Tell me"}], max_tokens=6, seed=11, n=3)
    whole = client.chat.completions.create(**kw)
    texts, finishes, order = ["", "", ""], [None] * 3, []
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finishes[c.index] = c.finish_reason or finishes[c.index]
            order.append(c.index)
        usage = chunk.usage or None
    assert texts == [c.message.content for c in whole.choices]
    assert finishes == [c.finish_reason for c in whole.choices]
    assert sorted(set(order)) == [0, 1, 2] and usage.completion_tokens == whole.usage.completion_tokens


def test_best_of_returns_the_most_likely_choices(client):
    kw = dict(model="m", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=21)
    every = client.completions.create(n=4, logprobs=0, **kw).choices
    score = {c.text: sum(c.logprobs.token_logprobs) for c in every}
    best = client.completions.create(n=2, best_of=4, **kw)
    assert [c.index for c in best.choices] == [0, 1]
    assert [c.text for c in best.choices] == sorted(score, key=score.get, reverse=True)[:2]
    assert best.choices[0].logprobs is None and best.usage.completion_tokens >= 4
