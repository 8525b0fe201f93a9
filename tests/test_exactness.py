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


# ---- the choices of one request (n > 1): the prompt is prefilled once, its blocks shared -----------

CHOICE_PROMPTS = [PROMPTS[0][:3], PROMPTS[0][:8], PROMPTS[0][:16], PROMPTS[0]]  # block size 8: <, =, 2x, not a multiple


def _choice_params(prompt_logprobs: int | None = None):
    """Four choices as the HTTP front end makes them (choice i seeded seed + i; only the first scores
    the prompt): two greedy-by-temperature rows would tell nothing, so they sample."""
    from meshserve import SamplingParams
    return [SamplingParams(max_tokens=6, temperature=0.9, top_k=20, seed=41 + i, logprobs=1,
                           prompt_logprobs=prompt_logprobs if i == 0 else None) for i in range(4)]


def _choices_rank(env, engine_dir: str, out_dir: str) -> None:
    from meshserve.orchestrator.rank_program import run_on_mesh
    run_on_mesh(env, engine_dir, lambda runner, meta, broadcast: _choices_drive(runner, meta, broadcast, out_dir))


def _choices_drive(runner, meta, broadcast, out_dir: str) -> None:
    """For each prompt: the four choices one at a time (no prefix cache), then all four at once."""
    import json
    from pathlib import Path

    from meshserve.orchestrator.engine_loop import EngineLoop
    copies = []

    def counted(plan):  # the copies every rank is told to make
        copies.append(int(plan.copy_blocks.shape[0]))
        return broadcast(plan)

    def outcome(seq):
        lps = None if seq.prompt_logprobs is None else [None if e is None else e[0] for e in seq.prompt_logprobs]
        return {"ids": seq.output_ids, "finish": seq.finish_reason, "prompt_logprobs": lps}

    rows = []
    for k, prompt in enumerate(CHOICE_PROMPTS):
        scored = 2 if k == len(CHOICE_PROMPTS) - 1 else None
        alone = EngineLoop(runner, meta, broadcast, enable_prefix_caching=False)
        singles = []
        for params in _choice_params(scored):
            singles.append(alone.add_request(prompt, params))
            alone.run_all()
        copies.clear()
        together = EngineLoop(runner, meta, counted)
        seqs = [together.add_request(prompt, p) for p in _choice_params(scored)]
        together.run_all()
        s = together.scheduler
        rows.append({"singles": [outcome(q) for q in singles], "choices": [outcome(q) for q in seqs],
                     "single_prefill": alone.scheduler.prefilled_tokens, "prefilled": s.prefilled_tokens,
                     "forks": s.num_forks, "copies": sum(copies), "free": together.blocks.num_free,
                     "blocks": together.blocks.num_blocks})
    Path(out_dir, "choices.json").write_text(json.dumps(rows))


@pytest.mark.parametrize("tp, pp, ahead", [(1, 1, "0"), (1, 1, "1"), (2, 1, "0"), (1, 2, "0")],
                         ids=["tp1", "tp1-ahead", "tp2", "pp2"])
def test_choices_share_the_prompt_and_equal_separate_requests(checkpoint, tmp_path, monkeypatch, tp, pp, ahead):
    """Four choices of one prompt (shorter than a KV block, exactly one, two, and not a multiple):
    each gives what the same request alone gives, the prompt is prefilled once (the others fork off
    its last position), and three of the four copy the partial last block (on every rank) before
    writing their first token's K/V there. The first choice's prompt logprobs are a single request's."""
    import json

    from meshserve.launch.local_spawn import run_ranks
    monkeypatch.setenv("MESHSERVE_SCHEDULE_AHEAD", ahead)
    engine = tmp_path / "engine"
    meshserve("build", "--model", checkpoint[1], "--tp", tp, "--pp", pp, "--dtype", "float32", "--out", engine,
              "--max-seq-len", 128, "--kv-block-size", 8, "--quiet")
    run_ranks(tp * pp, _choices_rank, str(engine), str(tmp_path), tp=tp)
    rows = json.loads((tmp_path / "choices.json").read_text())
    for prompt, row in zip(CHOICE_PROMPTS, rows, strict=True):
        what = f"prompt of {len(prompt)} tokens"
        assert [c["ids"] for c in row["choices"]] == [c["ids"] for c in row["singles"]], what
        assert [c["finish"] for c in row["choices"]] == [c["finish"] for c in row["singles"]] == ["length"] * 4
        assert len({tuple(c["ids"]) for c in row["choices"]}) > 1, what  # the seeds do draw differently
        assert row["single_prefill"] == 4 * len(prompt) and row["prefilled"] == len(prompt), what
        assert row["forks"] == 3 and row["copies"] == (3 if len(prompt) % 8 else 0), (what, row)
        assert row["free"] == row["blocks"] - 1, what
        mine, alone = row["choices"][0]["prompt_logprobs"], row["singles"][0]["prompt_logprobs"]
        assert (mine is None) == (alone is None) and all(c["prompt_logprobs"] is None for c in row["choices"][1:])
        if mine is not None:
            assert mine[0] is None and max(abs(a - b) for a, b in zip(mine[1:], alone[1:], strict=True)) < 1e-5
    assert rows[-1]["choices"][0]["prompt_logprobs"] is not None
