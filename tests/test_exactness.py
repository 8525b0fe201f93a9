"""Every TP x PP layout reproduces Hugging Face LlamaForCausalLM on the same random weights."""
from __future__ import annotations

import pytest
import torch

from tests.checkpoints import TINY, write_llama
from tests.conftest import meshserve, read_jsonl, write_jsonl

PROMPTS = [[1, 17, 42, 5, 99, 23, 64, 8, 31, 77, 3, 50, 12, 90, 44, 61, 28, 9, 73, 36, 55],
           [7, 7, 100, 2, 0, 33]]
NEW_TOKENS = 32


def hf_reference(model_dir, prompts):
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            logits = model(x).logits[0, -1]
            gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=None, pad_token_id=None)
            tokens = gen[0, len(ids):].tolist()
            assert len(tokens) == NEW_TOKENS, tokens
            out.append((logits, tokens))
    return out


# GQA, untied, Llama 3 RoPE scaling, a two-file checkpoint; MHA, tied embeddings and explicit head
# dims are drawn by the shape fuzz.
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    name = "gqa_llama3_untied"
    path = write_llama(tmp_path_factory.mktemp(name) / "hf", seed=len(name), shards=2, **dict(TINY, eos_token_id=None))
    return name, path, hf_reference(path, PROMPTS)


# tp 2 and 4 (KV heads split and duplicated) and pp 1-3 (an uneven split of 5 layers); single ranks and
# random shapes and layouts beyond these are in test_shape_fuzz.
LAYOUTS = {"gqa_llama3_untied": [(4, 1), (2, 3)]}


def test_layouts_match_transformers(checkpoint, tmp_path):
    name, hf_dir, reference = checkpoint
    requests = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt_token_ids": ids, "max_tokens": NEW_TOKENS, "temperature": 0, "return_logits": True}
        for ids in PROMPTS])
    failures = []
    for tp, pp in LAYOUTS[name]:
        engine = tmp_path / f"tp{tp}pp{pp}"
        meshserve("build", "--model", hf_dir, "--tp", tp, "--pp", pp, "--dtype", "float32", "--out", engine,
                  "--max-seq-len", 128, "--kv-block-size", 8, "--quiet")
        meshserve("generate", "--engine", engine, "--input", requests, "--output", engine / "out.jsonl",
                  "--quiet")
        rows = read_jsonl(engine / "out.jsonl")
        if [row["index"] for row in rows] != list(range(len(reference))):
            failures.append(f"tp={tp} pp={pp}: output rows {[row['index'] for row in rows]}, "
                            f"expected one per request")
            continue
        for row, (ref_logits, ref_tokens) in zip(rows, reference, strict=True):
            err = (torch.tensor(row["logits"]) - ref_logits).abs().max().item()
            if err > 1e-4 or row["token_ids"] != ref_tokens:
                failures.append(f"tp={tp} pp={pp}: max logit error {err:.2e}, tokens equal: "
                                f"{row['token_ids'] == ref_tokens}")
    assert not failures, "\n".join(failures)


# ---- prompt log-probabilities ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prompt_reference(checkpoint):
    """transformers' log-softmax at every position of each prompt."""
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(checkpoint[1], torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].log_softmax(-1) for ids in PROMPTS]


def prompt_logprob_errors(out, ids, ref, top_n: int) -> list[str]:
    """What differs between a RequestOutput's prompt logprobs and the reference log-softmax `ref`."""
    if out.prompt_logprobs is None or len(out.prompt_logprobs) != len(ids):
        return [f"prompt_logprobs {out.prompt_logprobs!r} for {len(ids)} prompt tokens"]
    bad = []
    if out.prompt_logprobs[0] is not None or out.prompt_top_logprobs[0] is not None:
        bad.append("the first prompt token has a logprob")
    for i in range(1, len(ids)):
        want = ref[i - 1]
        err = abs(out.prompt_logprobs[i] - want[ids[i]].item())
        top = out.prompt_top_logprobs[i]
        top_err = max(abs(lp - want[t].item()) for t, lp in top) if top else 0.0
        order_err = (torch.tensor([lp for _, lp in top]) - want.topk(top_n).values).abs().max().item()
        if len(top) != top_n or max(err, top_err, order_err) > 1e-4:
            bad.append(f"position {i}: logprob error {err:.2e}, top {top} (errors {top_err:.2e}, {order_err:.2e})")
    return bad


@pytest.mark.parametrize("tp, pp, chunk", [(1, 1, None), (1, 1, 8), (2, 1, 8), (1, 2, 8)],
                         ids=["tp1", "tp1-chunked", "tp2-chunked", "pp2-chunked"])
def test_prompt_logprobs_match_transformers(checkpoint, prompt_reference, tmp_path, tp, pp, chunk):
    """With chunk, a step takes at most 8 tokens: the 21-token prompt is prefilled over three steps.
    The second call finds the long prompt's first two blocks in the prefix cache: the request that
    asks for prompt logprobs computes them again."""
    from meshserve import LLM, RuntimeLimits, SamplingParams
    _, hf_dir, reference = checkpoint
    engine = tmp_path / "engine"
    meshserve("build", "--model", hf_dir, "--tp", tp, "--pp", pp, "--dtype", "float32", "--out", engine,
              "--max-seq-len", 128, "--kv-block-size", 8, "--quiet")
    scored = SamplingParams(max_tokens=4, temperature=0, logprobs=1, prompt_logprobs=3)
    plain = SamplingParams(max_tokens=4, temperature=0)
    limits = RuntimeLimits(max_batch_size=4, max_num_tokens=chunk) if chunk else None
    with LLM(engine, tp=tp, pp=pp, limits=limits) as llm:
        first = llm.generate(PROMPTS, scored)
        again = llm.generate(PROMPTS, [scored, plain])
    failures = []
    for out, ids, ref in zip(first, PROMPTS, prompt_reference, strict=True):
        failures += prompt_logprob_errors(out, ids, ref, 3)
    failures += prompt_logprob_errors(again[0], PROMPTS[0], prompt_reference[0], 3)
    assert not failures, "\n".join(failures)
    assert again[1].prompt_logprobs is None
    tokens = [ref_tokens[:4] for _, ref_tokens in reference]
    assert [o.token_ids for o in first] == tokens and [o.token_ids for o in again] == tokens
