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


PATH_ENV = {"graphs+kernel": {}, "reference": {"MESHSERVE_KERNELS": "reference", "MESHSERVE_CUDA_GRAPHS": "0"},
            "graphs+nccl-allreduce": {"MESHSERVE_P2P_ALLREDUCE": "0"}}


@pytest.mark.parametrize("path", list(PATH_ENV))
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_gpu_layout_matches_transformers(checkpoint, tmp_path, tp, pp, path):
    if torch.cuda.device_count() < tp * pp:
        pytest.skip(f"needs {tp * pp} GPUs")
    if path == "graphs+nccl-allreduce" and tp == 1:
        pytest.skip("the all-reduce path is chosen for TP groups only")
    hf_dir, reference = checkpoint
    engine = tmp_path / "engine"
    meshserve("build", "--model", hf_dir, "--tp", tp, "--pp", pp, "--dtype", "float32", "--out", engine,
              "--max-seq-len", 128, "--quiet")
    requests = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt_token_ids": ids, "max_tokens": NEW_TOKENS, "temperature": 0, "return_logits": True}
        for ids in PROMPTS])
    meshserve("generate", "--engine", engine, "--input", requests, "--output", tmp_path / "out.jsonl",
              "--quiet", device="cuda", env=PATH_ENV[path])
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [row["index"] for row in rows] == list(range(len(reference))), rows
    for row, (ref_logits, ref_tokens) in zip(rows, reference, strict=True):
        assert (torch.tensor(row["logits"]) - ref_logits).abs().max().item() < 1e-4
        assert row["token_ids"] == ref_tokens


def test_p2p_allreduce_paths_agree_with_nccl(tmp_path):
    """Every path of the TP all-reduce gives NCCL's sums (two ranks: one rounding each, so equal),
    eager and inside a CUDA graph; `meshserve bench allreduce` checks and times them."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    import json
    out = tmp_path / "allreduce.json"
    meshserve("bench", "allreduce", "--tp", 2, "--out", out, device="cuda")
    rows = json.loads(out.read_text())["rows"]
    assert [r["bytes"] for r in rows][0] == 8 << 10
    for row in rows:
        for path in ("one_shot", "two_shot"):
            assert row[f"{path}_max_abs_diff"] == 0, row
            assert row[f"{path}_graph_us"] > 0, row
