"""The same exactness bar on GPUs: NCCL ranks, one GPU each, against transformers on CPU."""
from __future__ import annotations

import pytest
import torch

from tests.checkpoints import TINY, write_llama
from tests.conftest import meshserve, read_jsonl, write_jsonl
from tests.test_exactness import NEW_TOKENS, PROMPTS, hf_reference

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    path = write_llama(tmp_path_factory.mktemp("gpu") / "hf", seed=3, **dict(TINY, eos_token_id=None))
    return path, hf_reference(path, PROMPTS)


@pytest.mark.parametrize("path", ["graphs+kernel", "reference"])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_gpu_layout_matches_transformers(checkpoint, tmp_path, tp, pp, path):
    if torch.cuda.device_count() < tp * pp:
        pytest.skip(f"needs {tp * pp} GPUs")
    hf_dir, reference = checkpoint
    engine = tmp_path / "engine"
    meshserve("build", "--model", hf_dir, "--tp", tp, "--pp", pp, "--dtype", "float32", "--out", engine,
              "--max-seq-len", 128, "--quiet")
    requests = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt_token_ids": ids, "max_tokens": NEW_TOKENS, "temperature": 0, "return_logits": True}
        for ids in PROMPTS])
    meshserve("generate", "--engine", engine, "--input", requests, "--output", tmp_path / "out.jsonl",
              "--quiet", device="cuda",
              env={} if path == "graphs+kernel" else {"MESHSERVE_KERNELS": "reference", "MESHSERVE_CUDA_GRAPHS": "0"})
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [row["index"] for row in rows] == list(range(len(reference))), rows
    for row, (ref_logits, ref_tokens) in zip(rows, reference, strict=True):
        assert (torch.tensor(row["logits"]) - ref_logits).abs().max().item() < 1e-4
        assert row["token_ids"] == ref_tokens
