"""Random Llama shapes through the GPU runtime (Triton kernels, decode CUDA graphs) in half precision,
against transformers in float32 on the same weights: head dims that are no power of two, one to many
KV heads, odd hidden, MLP and vocabulary sizes, tied or not, every RoPE kind, several KV block sizes.
Agreement is counted as in test_gpu_runtime (confident positions only). A failing case names its seed."""
from __future__ import annotations

import random

import pytest
import torch

from tests.checkpoints import write_llama
from tests.conftest import meshserve, read_jsonl, write_jsonl
from tests.test_gpu_runtime import agreement

pytestmark = pytest.mark.gpu

HEAD_DIMS = (24, 40, 64, 80, 96, 112, 128, 160, 256)
OUTPUT_TOKENS = 32


def draw(seed: int) -> tuple[dict, dict]:
    """One random checkpoint config and the engine options for it."""
    rng = random.Random(seed)
    heads = rng.randint(1, 16)
    kv_heads = rng.choice([k for k in range(1, heads + 1) if heads % k == 0])
    rope = rng.choice([{"rope_type": "default", "rope_theta": 10000.0},
                       {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
                       {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
    cfg = dict(vocab_size=rng.randint(520, 3000), hidden_size=heads * 2 * rng.randint(2, 48),
               intermediate_size=rng.randint(16, 1500), num_hidden_layers=rng.randint(1, 3),
               num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=rng.choice(HEAD_DIMS),
               tie_word_embeddings=rng.random() < 0.5, rope_parameters=rope, max_position_embeddings=512,
               bos_token_id=None, eos_token_id=None, pad_token_id=None)
    opts = dict(dtype=rng.choice(["bfloat16", "float16"]), block=rng.choice([8, 16, 32]),
                batch=rng.choice([1, 3, 8]))
    return cfg, opts


def prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in [1, 17, 64] + [rng.randint(2, 150) for _ in range(9)]]


@pytest.mark.parametrize("seed", range(8))
def test_random_shape_agrees_with_transformers(tmp_path, seed):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cfg, opts = draw(seed)
    hf = write_llama(tmp_path / "hf", seed=seed, **cfg)
    engine = tmp_path / "engine"
    meshserve("build", "--model", hf, "--dtype", opts["dtype"], "--out", engine, "--max-seq-len", 256,
              "--kv-block-size", opts["block"], "--quiet")
    ps = prompts(seed)
    requests = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt_token_ids": p, "max_tokens": OUTPUT_TOKENS, "temperature": 0} for p in ps])
    meshserve("generate", "--engine", engine, "--input", requests, "--output", tmp_path / "out.jsonl", "--quiet",
              "--max-batch-size", opts["batch"], device="cuda")
    half = getattr(torch, opts["dtype"])
    ratio, counted = agreement(hf, read_jsonl(tmp_path / "out.jsonl"), ps, half=half, output_tokens=OUTPUT_TOKENS)
    assert counted >= 64, f"{cfg} {opts}: only {counted} confident positions"
    assert ratio >= 0.98, f"{cfg} {opts}: top-1 agreement {ratio:.4f} over {counted} positions"
