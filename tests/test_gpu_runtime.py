"""The GPU runtime (paged-attention kernel, decode CUDA graphs) in bfloat16 against transformers in
float32 on the same weights: teacher-forced top-1 agreement over >= 512 output positions, counted
where the reference's top-2 margin exceeds twice bf16's error on those two logits (measured as
transformers in bfloat16 against float32 at that position): random weights give near-ties that any
bf16 model may break either way. The batches mix prefill and decode rows, prompts cross block boundaries,
share prefixes (prefix-cache hits) and, with a small KV pool, get preempted and recomputed; with
many requests live, two steps are in flight at once (EngineLoop's overlap on one GPU)."""
from __future__ import annotations

import random

import pytest
import torch

from tests.checkpoints import write_llama
from tests.conftest import meshserve, read_jsonl, write_jsonl

pytestmark = pytest.mark.gpu

SHAPES = {
    "head_dim128": dict(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=128),
    "head_dim64": dict(vocab_size=512, hidden_size=512, intermediate_size=768, num_hidden_layers=3,
                       num_attention_heads=8, num_key_value_heads=2, head_dim=64),
}
OUTPUT_TOKENS = 64


def prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, 500) for _ in range(40)]
    lengths = [1, 15, 16, 17, 33, 100] + [rng.randint(2, 120) for _ in range(15)]  # around 16-token blocks
    out = [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]
    return out + [shared + [7], shared + [9, 11], shared[:32]]  # prefix-cache hits, one at a block end


def agreement(hf_dir, rows, prompts_, half=torch.bfloat16, output_tokens=OUTPUT_TOKENS) -> tuple[float, int]:
    """Fraction of confident positions where the engine's token (computed in `half`) is transformers'
    top 1."""
    from transformers import LlamaForCausalLM
    fp32, bf16 = (LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=dt).cuda().eval()
                  for dt in (torch.float32, half))
    agree = counted = 0
    with torch.no_grad():
        for row, prompt in zip(rows, prompts_, strict=True):
            out = row["token_ids"]
            assert len(out) == output_tokens, row
            ids = torch.tensor([prompt + out], device="cuda")
            span = slice(len(prompt) - 1, len(prompt) - 1 + len(out))
            logits, rounded = fp32(ids).logits[0, span], bf16(ids).logits[0, span].float()
            top = logits.topk(2, dim=-1)
            error = (rounded - logits).gather(1, top.indices).abs().sum(-1)
            confident = (top.values[:, 0] - top.values[:, 1]) > 2 * error
            hit = top.indices[:, 0].cpu() == torch.tensor(out)
            agree += int((hit & confident.cpu()).sum())
            counted += int(confident.sum())
    return agree / max(1, counted), counted


@pytest.mark.parametrize("limits", [[], ["--num-kv-blocks", "24"], ["--max-batch-size", "256", "many"]],
                         ids=["roomy", "preempting", "overlapped"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("path", ["graphs+kernel", "reference"])
def test_bf16_agrees_with_transformers(tmp_path, shape, path, limits):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    hf = write_llama(tmp_path / "hf", seed=7, **dict(SHAPES[shape], max_position_embeddings=512, eos_token_id=None,
                                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    engine = tmp_path / "engine"
    meshserve("build", "--model", hf, "--dtype", "bfloat16", "--out", engine, "--max-seq-len", 256,
              "--kv-block-size", 16, "--quiet")
    ps = prompts(len(shape))
    if "many" in limits:  # enough live requests for two steps in flight (OVERLAP_MIN_BATCH each)
        limits = limits[:-1]
        rng = random.Random(1)
        ps = ps + [[rng.randrange(3, 500) for _ in range(rng.randint(2, 40))] for _ in range(300)]
    requests = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt_token_ids": p, "max_tokens": OUTPUT_TOKENS, "temperature": 0} for p in ps])
    env = {} if path == "graphs+kernel" else {"MESHSERVE_KERNELS": "reference", "MESHSERVE_CUDA_GRAPHS": "0"}
    meshserve("generate", "--engine", engine, "--input", requests, "--output", tmp_path / "out.jsonl", "--quiet",
              "--max-batch-size", 8, *limits, device="cuda", env=env)  # a later --max-batch-size wins
    ratio, counted = agreement(hf, read_jsonl(tmp_path / "out.jsonl"), ps)
    assert counted >= 512, f"only {counted} confident positions: the margin is too strict to test anything"
    assert ratio >= 0.99, f"{path}: top-1 agreement {ratio:.4f} over {counted} positions"


def test_dependent_launch_changes_no_bit(tmp_path):
    """Programmatic dependent launch lets a kernel start before the one it reads from has finished
    (each waits before touching its inputs): a missed wait would read stale activations. With it on
    and off, the same requests (greedy, and seeded sampling, which random weights' near-ties make
    sensitive to any change of the logits) give the same tokens (on a GPU without PDL, both runs
    take the plain launches and agree trivially)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from meshserve.workers.runtime import pdl
    assert pdl.enabled(torch.device("cuda")) == (torch.cuda.get_device_capability()[0] >= 9)
    hf = write_llama(tmp_path / "hf", seed=11, **dict(SHAPES["head_dim128"], max_position_embeddings=512,
                                                      eos_token_id=None))
    engine = tmp_path / "engine"
    meshserve("build", "--model", hf, "--dtype", "bfloat16", "--out", engine, "--max-seq-len", 256, "--quiet")
    ps = prompts(3)
    requests = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt_token_ids": p, "max_tokens": OUTPUT_TOKENS, "temperature": t, "seed": i}
        for t in (0, 1) for i, p in enumerate(ps)])
    outputs = {}
    for flag in ("1", "0"):
        out = tmp_path / f"out-{flag}.jsonl"
        meshserve("generate", "--engine", engine, "--input", requests, "--output", out, "--quiet",
                  "--max-batch-size", 4, device="cuda", env={"MESHSERVE_PDL": flag})
        outputs[flag] = read_jsonl(out)
    assert len(outputs["1"]) == 2 * len(ps)
    for on, off in zip(outputs["1"], outputs["0"], strict=True):
        assert on["token_ids"] == off["token_ids"], on["index"]
