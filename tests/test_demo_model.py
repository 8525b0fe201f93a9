"""SmolLM2-135M-Instruct from its GGUF file answers a chat prompt exactly like transformers."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import meshserve, read_jsonl, write_jsonl

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def demo_file():
    from meshserve.orchestrator.demo_model import demo_gguf_path
    return demo_gguf_path()


@pytest.fixture(scope="module")
def reference(demo_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(demo_file.parent, gguf_file=demo_file.name)
    model = AutoModelForCausalLM.from_pretrained(demo_file.parent, gguf_file=demo_file.name,
                                                 torch_dtype=torch.float32).eval()
    text = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False)
    generated = out[0, ids.shape[1]:].tolist()
    return generated, tok.decode(generated, skip_special_tokens=True)


@pytest.mark.parametrize("tp,pp", [(3, 1), (1, 2)])
def test_demo_chat_matches_transformers(demo_file, reference, tmp_path, tp, pp):
    ref_ids, ref_text = reference
    assert "Paris" in ref_text
    engine = tmp_path / "engine"
    meshserve("build", "--model", demo_file, "--tp", tp, "--pp", pp, "--dtype", "float32", "--out", engine,
              "--max-seq-len", 512, "--quiet")
    requests = write_jsonl(tmp_path / "in.jsonl",
                           [{"messages": QUESTION, "max_tokens": NEW_TOKENS, "temperature": 0}])
    meshserve("generate", "--engine", engine, "--input", requests, "--output", tmp_path / "out.jsonl", "--quiet")
    (row,) = read_jsonl(tmp_path / "out.jsonl")
    n = len(row["token_ids"])
    assert row["token_ids"] == ref_ids[:n] and (n == len(ref_ids) or row["finish_reason"] == "stop"), \
        (row, ref_ids)
    assert row["text"] == ref_text
