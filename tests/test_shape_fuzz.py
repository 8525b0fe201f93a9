"""Any Llama shape, any layout: `meshserve build` either refuses it in one line or the engine reproduces
`transformers` (fp32) on the same random weights. Shapes and layouts are drawn at random (see
tests/shape_fuzz.py for the knobs that explore more than the fixed CI draw)."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import meshserve, read_jsonl, write_jsonl
from tests.shape_fuzz import (ShapeCase, agreed_prefix, fuzz_cases, randomize_weights, reference,
                              store_distinct_head)

NEW_TOKENS = 8
TOLERANCE = 1e-4
# Found by a user: tp=6 does not divide intermediate_size=320 (the MLP was once cut short there).
TP6_INTERMEDIATE_320 = ShapeCase(seed=6, heads=6, kv_heads=2, head_dim=32, hidden=192, intermediate=320, vocab=300,
                                 layers=2, tied=False, rope="none", tp=6, pp=1, kv_block_size=16,
                                 prompt=tuple(range(3, 62)))


def write_checkpoint(case, path):
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(**case.hf_config())).float().eval()
    randomize_weights(model, case.seed)
    model.save_pretrained(path, safe_serialization=True)
    if not case.stored_head:
        return model
    store_distinct_head(path, case.seed)  # what transformers makes of it is the reference
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("case", [TP6_INTERMEDIATE_320, *fuzz_cases()], ids=lambda c: c.name)
def test_shape_is_exact_or_refused(case, tmp_path):
    model = write_checkpoint(case, tmp_path / "hf")
    engine = tmp_path / "engines" / "e"
    build = meshserve("build", "--model", tmp_path / "hf", "--tp", case.tp, "--pp", case.pp, "--dtype", "float32",
                      "--out", engine, "--max-seq-len", 128, "--kv-block-size", case.kv_block_size, "--quiet",
                      check=False)
    if not case.must_build:
        said = (build.stdout + build.stderr).strip()
        assert build.returncode != 0, f"tp={case.tp} cannot split this model, yet the build succeeded"
        assert len(said.splitlines()) == 1 and said.startswith("meshserve: error:"), said
        assert "num_attention_heads" in said or "num_key_value_heads" in said, said
        assert "tp values that work" in said, said
        assert not (tmp_path / "engines").exists() or not any((tmp_path / "engines").iterdir())
        return
    assert build.returncode == 0, f"a layout that must build was refused:\n{build.stdout}{build.stderr}"

    requests = write_jsonl(tmp_path / "in.jsonl", [{"prompt_token_ids": list(case.prompt), "max_tokens": NEW_TOKENS,
                                                    "temperature": 0, "return_logits": True}])
    meshserve("generate", "--engine", engine, "--input", requests, "--output", tmp_path / "out.jsonl", "--quiet")
    (row,) = read_jsonl(tmp_path / "out.jsonl")
    ref_logits, ref_tokens, margins = reference(model, list(case.prompt), NEW_TOKENS)
    logits = torch.tensor(row["logits"])
    assert logits.shape == ref_logits.shape, "padded vocabulary ids must never reach a client"
    err = (logits - ref_logits).abs().max().item()
    assert err <= TOLERANCE, f"last-position logits differ from transformers by {err:.2e}"
    assert len(row["token_ids"]) == NEW_TOKENS
    n = agreed_prefix(margins, TOLERANCE)
    assert row["token_ids"][:n] == ref_tokens[:n], f"greedy tokens differ (margins {margins})"
