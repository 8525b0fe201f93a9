"""Batch and memory limits are run-time settings: engine.json holds defaults; flags (or a config's
engine section) override them without a rebuild, and the engine cache does not depend on them."""
from __future__ import annotations

import pytest

from meshserve.errors import UserError
from meshserve.orchestrator.config import load_config
from meshserve.orchestrator.engine_resolve import engine_path
from meshserve.orchestrator.llm import LLM
from meshserve.orchestrator.sampling_params import SamplingParams
from meshserve.workers.engine_files import RuntimeLimits, read_engine_meta
from tests.checkpoints import TINY, write_llama
from tests.conftest import meshserve, read_jsonl, write_jsonl

PROMPT = list(range(3, 43))  # 40 tokens


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    hf = write_llama(root / "hf", seed=8, **dict(TINY, eos_token_id=None))
    small, roomy = root / "small", root / "roomy"
    meshserve("build", "--model", hf, "--tp", 1, "--pp", 2, "--dtype", "float32", "--out", small,
              "--max-seq-len", 32, "--max-batch-size", 2, "--max-num-tokens", 16, "--kv-block-size", 4, "--quiet")
    meshserve("build", "--model", hf, "--tp", 1, "--pp", 2, "--dtype", "float32", "--out", roomy,
              "--max-seq-len", 128, "--quiet")
    return small, roomy


def test_flags_lift_the_built_limits_without_a_rebuild(engines, tmp_path):
    small, roomy = engines
    requests = write_jsonl(tmp_path / "in.jsonl", [{"prompt_token_ids": PROMPT, "max_tokens": 10, "temperature": 0}] * 3)
    refused = meshserve("generate", "--engine", small, "--input", requests, "--output", tmp_path / "x.jsonl",
                        check=False)
    assert refused.returncode == 2 and "max_seq_len 32" in refused.stderr, refused.stderr
    meshserve("generate", "--engine", small, "--input", requests, "--output", tmp_path / "small.jsonl", "--quiet",
              "--max-seq-len", 64, "--max-batch-size", 3, "--max-num-tokens", 64, "--kv-block-size", 8)
    meshserve("generate", "--engine", roomy, "--input", requests, "--output", tmp_path / "roomy.jsonl", "--quiet")
    got, want = read_jsonl(tmp_path / "small.jsonl"), read_jsonl(tmp_path / "roomy.jsonl")
    assert [r["token_ids"] for r in got] == [r["token_ids"] for r in want] and len(got) == 3


def test_kv_block_count_is_a_run_time_setting(engines):
    small, _ = engines
    limits = RuntimeLimits(max_seq_len=64, kv_block_size=4, num_kv_blocks=8)  # 7 usable blocks of 4 tokens
    with LLM(small, limits=limits) as llm:
        assert llm.generate_ids([PROMPT[:20]], SamplingParams(max_tokens=4, temperature=0))[0].token_ids
        with pytest.raises(UserError, match="needs more KV blocks than the pool holds"):
            llm.generate_ids([PROMPT], SamplingParams(max_tokens=4))


@pytest.mark.parametrize("flags, message", [
    (["--max-batch-size", 0], "max_batch_size=0 is not allowed"),
    (["--max-seq-len", 100000], "exceeds the model's max_position_embeddings 256"),
    (["--max-batch-size", 32, "--max-num-tokens", 8], "max_num_tokens=8 is below max_batch_size=32"),
    (["--num-kv-blocks", 1], "num_kv_blocks=1 is too few"),
])
def test_bad_limits_are_refused_in_one_line(engines, tmp_path, flags, message):
    requests = write_jsonl(tmp_path / "in.jsonl", [{"prompt_token_ids": [1, 2], "max_tokens": 2}])
    proc = meshserve("generate", "--engine", engines[0], "--input", requests, *flags, check=False)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_engine_cache_ignores_run_time_limits(tmp_path):
    def config(batch: int, tp: int = 1):
        path = tmp_path / f"c{batch}-{tp}.yaml"
        path.write_text(f"model: {{source: demo}}\nparallel: {{tp: {tp}}}\nengine: {{max_batch_size: {batch}, "
                        f"max_num_tokens: 64, dtype: float32}}\n")
        return load_config(path)
    assert engine_path(config(2)) == engine_path(config(8))
    assert engine_path(config(2)) != engine_path(config(2, tp=3))


def test_config_limits_reach_the_engine(engines, tmp_path):
    small, _ = engines
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{engine_dir: {small}}}\nengine: {{max_batch_size: 5, max_num_tokens: 40, "
                   "max_seq_len: 100000, kv_block_size: 8}\n")
    with LLM(cfg) as llm:
        m = llm.meta
        assert (m.max_batch_size, m.max_num_tokens, m.kv_block_size) == (5, 40, 8)
        assert m.max_seq_len == 256  # a config's wish above the model's limit is lowered, as a build does
    assert read_engine_meta(small).max_batch_size == 2  # engine.json itself is untouched


def test_gpu_memory_fraction_is_a_share_of_free_memory():
    from meshserve.errors import UserError
    from meshserve.workers.engine_files import RuntimeLimits
    for bad in (0, 1.5, -0.1, True, "0.5", float("nan")):
        with pytest.raises(UserError, match=r"gpu_memory_fraction=.* is not allowed: use a number in \(0, 1\]"):
            RuntimeLimits(gpu_memory_fraction=bad)
    assert RuntimeLimits(gpu_memory_fraction=0.5).gpu_memory_fraction == 0.5
    proc = meshserve("generate", "--engine", "nowhere", "--gpu-memory-fraction", "2", "--chat", "hi", check=False)
    assert proc.returncode != 0 and "gpu_memory_fraction=2.0 is not allowed" in proc.stderr, proc.stderr
