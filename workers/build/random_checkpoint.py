"""`meshserve random-checkpoint`: a random-weight Hugging Face Llama checkpoint of a named shape, so
anyone can reproduce a benchmark without a download. Written tensor by tensor, so the writer stays
small however big the checkpoint is.

The default shape (hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632, vocab 32000) is about 1.1B
parameters. Each tensor is generated, written and dropped before the next one, so writing needs
memory for one tensor only, however big the checkpoint is.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from meshserve.errors import UserError
from meshserve.workers.build.safetensors_io import StreamingWriter

SHAPES = {  # the architecture of each model, with random weights
    "llama-3-8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256),
    "llama-3-70b": dict(hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=28672, vocab=128256),
    "tinyllama-1b": dict(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000),
    "debug-tiny": dict(hidden=64, layers=4, heads=4, kv_heads=2, intermediate=96, vocab=256),
}
_SIZE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def shape_config(name: str, dtype: str = "bfloat16", max_position_embeddings: int = 8192) -> dict:
    """The Hugging Face config.json of a named shape; an unknown name is refused with the known ones."""
    if name not in SHAPES:
        raise UserError(f"unknown shape {name!r}; known shapes: {', '.join(sorted(SHAPES))}")
    return hf_config(**SHAPES[name], dtype=dtype, max_position_embeddings=max_position_embeddings)


def hf_config(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
              dtype: str = "bfloat16", max_position_embeddings: int = 8192) -> dict:
    """The Hugging Face config.json of an untied Llama of these sizes."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
        "vocab_size": vocab, "max_position_embeddings": max_position_embeddings, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "rope_scaling": None, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": False, "initializer_range": 0.02,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": dtype,
    }


def llama_tensors(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
                  vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """(Hugging Face name, [out, in] shape) of every tensor of an untied Llama, in file order."""
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (hidden,)),
                (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
                (p + "self_attn.k_proj.weight", (kv, hidden)),
                (p + "self_attn.v_proj.weight", (kv, hidden)),
                (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
                (p + "post_attention_layernorm.weight", (hidden,)),
                (p + "mlp.gate_proj.weight", (intermediate, hidden)),
                (p + "mlp.up_proj.weight", (intermediate, hidden)),
                (p + "mlp.down_proj.weight", (hidden, intermediate))]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _random(shape, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:  # norm weights: around 1, as in a trained model
        return (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
    t = torch.randn(shape, generator=gen)
    return t.mul_(0.02).to(dtype)


def write_random_llama(directory, hidden: int = 2048, layers: int = 22, heads: int = 32, kv_heads: int = 4,
                       intermediate: int = 5632, vocab: int = 32000, dtype: torch.dtype = torch.float32,
                       shard_bytes: int = 1 << 30, seed: int = 0, max_position_embeddings: int = 8192) -> dict:
    """Write config.json, model-XXXXX-of-YYYYY.safetensors shards and their index into directory.

    Returns {"parameters": ..., "bytes": tensor bytes, "tensor_bytes": {name: bytes}, "files": [...]}.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = llama_tensors(hidden, layers, heads, kv_heads, intermediate, vocab)
    item = _SIZE_BYTES[dtype]

    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    filled = 0
    for name, shape in tensors:
        nbytes = _numel(shape) * item
        if shards[-1] and filled + nbytes > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append((name, shape))
        filled += nbytes
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    gen = torch.Generator().manual_seed(seed)
    for fname, shard in zip(files, shards):
        with StreamingWriter(str(directory / fname), [(n, dtype, s) for n, s in shard]) as writer:
            for name, shape in shard:
                tensor = _random(shape, dtype, gen)
                writer.write(name, tensor)
                del tensor

    total = sum(_numel(s) for _, s in tensors)
    tensor_bytes = {n: _numel(s) * item for n, s in tensors}
    index = {"metadata": {"total_size": total * item},
             "weight_map": {n: f for f, shard in zip(files, shards) for n, _ in shard}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = hf_config(hidden, layers, heads, kv_heads, intermediate, vocab, _NAMES[dtype], max_position_embeddings)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return {"parameters": total, "bytes": total * item, "tensor_bytes": tensor_bytes, "files": files}
