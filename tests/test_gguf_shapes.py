"""A GGUF source with an intermediate size the tp does not divide builds into an engine that matches
`transformers` loading the same GGUF file."""
from __future__ import annotations

import numpy as np
import torch

from tests.conftest import meshserve, read_jsonl, write_jsonl
from tests.shape_fuzz import randomize_weights

SHAPE = dict(vocab_size=97, hidden_size=48, intermediate_size=100, num_hidden_layers=3, num_attention_heads=6,
             num_key_value_heads=3, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=None,
             eos_token_id=None, pad_token_id=None)
TP, PP = 3, 2  # 100 % 3 != 0: the MLP is padded
_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
               "post_attention_layernorm": "ffn_norm"}


def llama_cpp_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: per head, the two rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path) -> None:
    from gguf import GGUFWriter
    cfg = model.config
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(cfg.vocab_size)
    for name, p in model.state_dict().items():
        w = p.detach().float().numpy().copy()
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            gguf_name = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            part = rest.rsplit(".", 1)[0]
            gguf_name = f"blk.{layer}.{_GGUF_NAMES[part]}.weight"
            if part == "self_attn.q_proj":
                w = llama_cpp_rows(w, cfg.num_attention_heads)
            elif part == "self_attn.k_proj":
                w = llama_cpp_rows(w, cfg.num_key_value_heads)
        writer.add_tensor(gguf_name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_with_padded_intermediate_matches_transformers(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    assert SHAPE["intermediate_size"] % TP
    source = LlamaForCausalLM(LlamaConfig(**SHAPE)).float().eval()
    randomize_weights(source, seed=11)
    gguf = tmp_path / "random.gguf"
    write_gguf(source, gguf)
    reference = LlamaForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf.name, dtype=torch.float32).eval()

    engine = tmp_path / "engine"
    meshserve("build", "--model", gguf, "--tp", TP, "--pp", PP, "--dtype", "float32", "--out", engine,
              "--max-seq-len", 64, "--quiet")
    prompt = [5, 9, 13, 2, 77, 40, 41, 8, 96, 0, 31]
    requests = write_jsonl(tmp_path / "in.jsonl", [{"prompt_token_ids": prompt, "max_tokens": 1, "temperature": 0,
                                                    "return_logits": True}])
    meshserve("generate", "--engine", engine, "--input", requests, "--output", tmp_path / "out.jsonl", "--quiet")
    (row,) = read_jsonl(tmp_path / "out.jsonl")
    with torch.no_grad():
        want = reference(torch.tensor([prompt])).logits[0, -1]
    got = torch.tensor(row["logits"])
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4
