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
