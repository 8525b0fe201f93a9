"""A checkpoint that disagrees with its own config, or that meshserve cannot reproduce, is refused when it
is opened, with a message naming what is wrong: never built into an engine that answers wrongly."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from meshserve.errors import UserError
from meshserve.workers.build.checkpoint_source import open_source
from meshserve.workers.model_spec import LlamaSpec

CONFIG = dict(model_type="llama", vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=4, max_position_embeddings=64,
              rms_norm_eps=1e-5, tie_word_embeddings=False, rope_parameters={"rope_type": "default",
                                                                               "rope_theta": 10000.0})


def hf_tensors(vocab=50, hidden=16, inter=24, q=16, kv=8, layers=2) -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face Llama of these sizes (written out here, not taken from meshserve)."""
    out = {"model.embed_tokens.weight": torch.randn(vocab, hidden), "model.norm.weight": torch.ones(hidden),
           "lm_head.weight": torch.randn(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": torch.ones(hidden), p + "post_attention_layernorm.weight":
                torch.ones(hidden), p + "self_attn.q_proj.weight": torch.randn(q, hidden),
                p + "self_attn.k_proj.weight": torch.randn(kv, hidden),
                p + "self_attn.v_proj.weight": torch.randn(kv, hidden),
                p + "self_attn.o_proj.weight": torch.randn(hidden, q),
                p + "mlp.gate_proj.weight": torch.randn(inter, hidden), p + "mlp.up_proj.weight":
                torch.randn(inter, hidden), p + "mlp.down_proj.weight": torch.randn(hidden, inter)}
    return out


def write(path, tensors, **config):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(CONFIG | config))
    save_file(tensors, str(path / "model.safetensors"))
    return path


def refusal(path) -> str:
    with pytest.raises(UserError) as err:
        open_source(path)
    return str(err.value)


def test_a_consistent_checkpoint_opens(tmp_path):
    assert open_source(write(tmp_path / "hf", hf_tensors())).spec.intermediate_size == 24


@pytest.mark.parametrize("config, tensors, said", [
    ({"intermediate_size": 20}, {}, ["model.layers.0.mlp.gate_proj.weight", "[24, 16]", "intermediate_size=20",
                                     "[20, 16]"]),
    ({"head_dim": 2}, {}, ["self_attn.q_proj.weight", "num_attention_heads=4", "head_dim=2", "[8, 16]"]),
    ({"vocab_size": 40}, {}, ["model.embed_tokens.weight", "vocab_size=40"]),
    ({}, {"inter": 30}, ["mlp.gate_proj.weight", "[30, 16]", "intermediate_size=24"]),
], ids=["intermediate", "head_dim", "vocab", "tensors-larger"])
def test_tensors_of_another_shape_than_the_config_are_refused(tmp_path, config, tensors, said):
    message = refusal(write(tmp_path / "hf", hf_tensors(**tensors), **config))
    assert all(s in message for s in said), message


def test_a_missing_tensor_is_named(tmp_path):
    tensors = hf_tensors()
    del tensors["model.layers.0.self_attn.v_proj.weight"]
    assert "model.layers.0.self_attn.v_proj.weight is missing" in refusal(write(tmp_path / "hf", tensors))


def test_an_index_naming_the_wrong_file_is_refused(tmp_path):
    hf = write(tmp_path / "hf", hf_tensors())
    save_file({"extra": torch.zeros(1)}, str(hf / "other.safetensors"))
    weight_map = {n: "model.safetensors" for n in hf_tensors()} | {"model.norm.weight": "other.safetensors"}
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    message = refusal(hf)
    assert "other.safetensors" in message and "model.norm.weight" in message, message


def test_quantized_weights_are_refused(tmp_path):
    tensors = hf_tensors()
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"].to(torch.int8)
    message = refusal(write(tmp_path / "hf", tensors))
    assert "model.layers.1.mlp.up_proj.weight is stored as I8" in message, message
    message = refusal(write(tmp_path / "q", hf_tensors(), quantization_config={"quant_method": "fp8"}))
    assert "quantization_config" in message and "'fp8'" in message, message


def test_a_stored_lm_head_is_used_even_when_tied(tmp_path):
    """transformers scores with the checkpoint's own lm_head.weight: the build must read that one."""
    from meshserve.workers.engine_layout import rank_tensors
    spec = open_source(write(tmp_path / "hf", hf_tensors(), tie_word_embeddings=True)).spec
    (head,) = [t for t in rank_tensors(spec, 1, 1, 0) if t.name == "lm_head.weight"]
    assert head.pieces[0].source == "lm_head.weight"
    tensors = hf_tensors()
    del tensors["lm_head.weight"]
    spec = open_source(write(tmp_path / "tied", tensors, tie_word_embeddings=True)).spec
    (head,) = [t for t in rank_tensors(spec, 1, 1, 0) if t.name == "lm_head.weight"]
    assert head.pieces[0].source == "model.embed_tokens.weight"


@pytest.mark.parametrize("change, said", [
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}}, "low_freq_factor is required"),
    ({"rope_parameters": {"rope_type": "linear", "factor": "2"}}, "factor='2' is not allowed"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_type='yarn' is not supported"),
    ({"rms_norm_eps": None}, "rms_norm_eps=None is not allowed"),
    ({"max_position_embeddings": 0}, "max_position_embeddings=0 is not allowed"),
    ({"head_dim": 5}, "head_dim=5 is odd"),
    ({"num_attention_heads": 0, "head_dim": None}, "num_heads=0"),
], ids=["llama3-incomplete", "factor-text", "yarn", "eps-null", "max-positions", "odd-head-dim", "no-heads"])
def test_config_values_meshserve_cannot_reproduce_are_refused(change, said):
    with pytest.raises(UserError) as err:
        LlamaSpec.from_hf_config(CONFIG | change)
    assert said in str(err.value), str(err.value)


def test_gguf_tensors_of_another_shape_than_the_metadata_are_refused(tmp_path):
    from gguf import GGUFWriter
    path = tmp_path / "m.gguf"
    writer = GGUFWriter(str(path), "llama")
    for add, value in (("context_length", 64), ("embedding_length", 16), ("block_count", 2),
                       ("feed_forward_length", 20), ("head_count", 4), ("head_count_kv", 2)):
        getattr(writer, f"add_{add}")(value)
    writer.add_vocab_size(50)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, w in hf_tensors().items():  # intermediate 24, where the metadata says 20
        stem = name.removesuffix(".weight")
        layer = stem.split(".")[2] if stem.startswith("model.layers.") else None
        gguf = f"blk.{layer}.{names[stem.split('.', 3)[3]]}" if layer else names[stem]
        writer.add_tensor(gguf + ".weight", w.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    message = refusal(path)
    assert "mlp.gate_proj.weight has shape [24, 16]" in message and "intermediate_size=20" in message, message
