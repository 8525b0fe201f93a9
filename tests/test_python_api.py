"""The Python API: `LLM(...).generate/chat` against transformers, its errors, and rank failures."""
from __future__ import annotations

import json
import os
import time

import psutil
import pytest
import torch

from meshserve.errors import UserError
from meshserve.orchestrator.llm import LLM
from meshserve.orchestrator.sampling_params import SamplingParams
from tests.checkpoints import TINY, write_llama, write_llama_with_demo_tokenizer
from tests.conftest import meshserve

PROMPTS = [[1, 17, 42, 5, 99, 23, 64, 8], [7, 7, 100, 2, 0, 33, 12, 90, 44, 61, 28]]
NEW = 6


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return write_llama(tmp_path_factory.mktemp("api") / "hf", seed=4, **dict(TINY, eos_token_id=None))


@pytest.fixture(scope="module")
def reference(hf):
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in PROMPTS:
            x = torch.tensor([ids])
            gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False,
                                 eos_token_id=None, pad_token_id=None)
            out.append(gen[0, len(ids):].tolist())
    return out


def build(hf, out, tp, pp):
    meshserve("build", "--model", hf, "--tp", tp, "--pp", pp, "--dtype", "float32", "--out", out,
              "--max-seq-len", 64, "--kv-block-size", 4, "--quiet")
    return out


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 2)], ids=["in-process", "tp2pp2-spawned"])
def test_generate_matches_transformers(hf, reference, tmp_path, tp, pp):
    engine = build(hf, tmp_path / "engine", tp, pp)
    params = SamplingParams(max_tokens=NEW, temperature=0, logprobs=2)
    with LLM(engine, tp=tp, pp=pp) as llm:
        outs = llm.generate(PROMPTS, params)
        again = llm.generate([PROMPTS[1]], params)  # the same LLM serves more calls
        ranks = llm._ranks.procs if llm._ranks is not None else []
    assert [o.token_ids for o in outs] == reference
    assert [o.index for o in outs] == [0, 1] and [o.prompt_token_ids for o in outs] == PROMPTS
    assert all(o.finish_reason == "length" and o.text is None for o in outs)
    assert again[0].token_ids == reference[1]
    for o in outs:
        assert len(o.logprobs) == NEW and all(lp <= 0 for lp in o.logprobs)
        assert [len(t) for t in o.top_logprobs] == [2] * NEW
        assert all(t[0][0] == tok for t, tok in zip(o.top_logprobs, o.token_ids, strict=True))  # greedy: top 1
    assert all(not p.is_alive() for p in ranks)


def test_chat_and_text(tmp_path):
    hf = write_llama_with_demo_tokenizer(tmp_path / "hf", seed=2)
    engine = build(hf, tmp_path / "engine", 1, 2)
    with LLM(engine) as llm:
        (out,) = llm.chat([{"role": "user", "content": "Hello there"}], SamplingParams(max_tokens=5, temperature=0))
        (same,) = llm.generate([llm.tokenizer.encode_chat([{"role": "user", "content": "Hello there"}])],
                               SamplingParams(max_tokens=5, temperature=0))
        (text,) = llm.generate("Once upon a time", SamplingParams(max_tokens=3, temperature=0))
    assert out.token_ids == same.token_ids and out.text == same.text and isinstance(out.text, str)
    assert len(text.token_ids) <= 3 and text.prompt_token_ids == llm.tokenizer.encode("Once upon a time")


def test_bad_calls_name_the_problem(hf, tmp_path):
    engine = build(hf, tmp_path / "engine", 1, 1)
    with pytest.raises(UserError, match=r"tp=2 was asked, but engine .* is built for tp=1"):
        LLM(engine, tp=2)
    with LLM(engine) as llm:
        with pytest.raises(UserError, match=r"prompt 1: .*max_seq_len 64"):
            llm.generate_ids([[1, 2], [3] * 60], SamplingParams(max_tokens=10))
        with pytest.raises(UserError, match="no tokenizer"):
            llm.generate("text")
        with pytest.raises(UserError, match="2 SamplingParams for 1 prompts"):
            llm.generate_ids([[1, 2]], [SamplingParams(), SamplingParams()])
        assert llm.generate_ids([[1, 2]], SamplingParams(max_tokens=2))[0].token_ids  # still works
    with pytest.raises(UserError, match="closed"):
        llm.generate_ids([[1, 2]])


def test_a_dead_rank_is_named(hf, tmp_path):
    engine = build(hf, tmp_path / "engine", 2, 1)
    llm = LLM(engine)
    try:
        llm._ranks.procs[1].kill()
        deadline = time.monotonic() + 120
        with pytest.raises(UserError, match=r"rank 1 of 2 exited"):
            while time.monotonic() < deadline:
                llm.generate_ids([[1, 2, 3]], SamplingParams(max_tokens=4))
    finally:
        with pytest.raises(UserError):
            llm.close()
    assert llm._ranks is None


def test_a_plain_script_that_never_closes_exits(hf, tmp_path):
    """No `if __name__ == "__main__"` guard and no close(): the ranks must not re-run the script, and
    the script must still exit, leaving no rank behind."""
    import subprocess
    import sys
    engine = build(hf, tmp_path / "engine", 2, 1)
    script = tmp_path / "plain.py"
    script.write_text("from meshserve import LLM, SamplingParams\n"
                      f"llm = LLM({str(engine)!r})\n"
                      "print([p.pid for p in llm._ranks.procs])\n"
                      "print(llm.generate_ids([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0))[0].token_ids)\n")
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "MESHSERVE_DEVICE": "cpu"})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    pids, tokens = (json.loads(line) for line in out.strip().splitlines()[-2:])
    assert len(pids) == 2 and len(tokens) == 3, out
    _, alive = psutil.wait_procs([p for p in map(_process, pids) if p is not None], timeout=30)
    assert not alive


def _process(pid: int):
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None
